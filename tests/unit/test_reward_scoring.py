"""One reward-scoring rule everywhere (actors/reward.py `reward_inputs`): a response is scored with exactly one
closing EOS. A response cut at max_new_tokens scores the same as that response with EOS written out, whether it
goes through the reward role (a Rollout), the list API the RM job and eval use (`score_sequences`), the text path
of RM accuracy (`proxy_scores`), or the held-out evaluation (`compare_models`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from actors.base import sample_rollout
from actors.reward import RewardSpec, RewardWorker, close_response, reward_inputs, score_sequences
from jobs.rlhf.evaluation import compare_models, proxy_scores
from jobs.rlhf.sampling import sample_seed
from models.checkpoint import save_checkpoint
from models.config import GPTConfig
from models.generation import SamplingParams
from models.gpt import GPT
from models.heads import RewardModel
from models.tokenizer import Tokenizer

EOS = 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, GPT, RewardModel, Path]:
    tok = Tokenizer.train(["The sweet love of a happy heart. " * 20, "A sad grief and bitter woe. " * 20], 300)
    cfg = GPTConfig.from_name("nano", vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    lm, rm = GPT(cfg).eval(), RewardModel(cfg).eval()
    path = save_checkpoint(rm, tmp_path_factory.mktemp("rm") / "checkpoint", kind="reward", tokenizer=tok)
    return tok, lm, rm, path


def test_close_response_appends_one_eos_only_when_missing() -> None:
    assert close_response([5, 6], EOS) == [5, 6, EOS]
    assert close_response([5, 6, EOS], EOS) == [5, 6, EOS]
    assert close_response([], EOS) == [EOS]


def test_reward_inputs_left_and_right_padding() -> None:
    # row 0: left-padded prompt, response cut (no EOS) and filling the width; row 1: ended with EOS, then padding
    ids = torch.tensor([[9, 3, 4, 5, 6], [3, 4, 7, EOS, 9]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    out, out_mask = reward_inputs(ids, mask, EOS)
    assert out.tolist() == [[9, 3, 4, 5, 6, EOS], [3, 4, 7, EOS, 9, EOS]]
    assert out_mask.tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]


def test_truncated_and_finished_responses_score_the_same_everywhere(setup, tmp_path: Path) -> None:
    tok, lm, rm, path = setup
    prompts = ["The sweet", "A sad grief and", "Love"]
    # 4 new tokens: an untrained model rarely samples EOS that early, so rows are cut (asserted below)
    rollout = sample_rollout(lm, [tok.encode(p) for p in prompts], [0, 1, 2], [1, 2, 3],
                             SamplingParams(max_new_tokens=4), EOS, 0, "")
    responses = [rollout.response_ids[b][rollout.action_mask[b].bool()].tolist() for b in range(3)]
    assert any(r[-1] != EOS for r in responses), "the test needs a truncated response"
    explicit = score_sequences(rm, [[*tok.encode(p), *close_response(r, EOS)] for p, r in zip(prompts, responses)],
                               EOS)
    # 1. the reward role, on the rollout as sampled
    worker = RewardWorker(RewardSpec(checkpoint=str(path), eos_id=EOS))
    torch.testing.assert_close(worker.scores(rollout), explicit, rtol=0, atol=1e-5)
    # 2. the list API without the closing EOS
    bare = [[*tok.encode(p), *(r[:-1] if r[-1] == EOS else r)] for p, r in zip(prompts, responses)]
    torch.testing.assert_close(score_sequences(rm, bare, EOS), explicit, rtol=0, atol=1e-5)
    # 3. the held-out evaluation's proxy score (same prompts, same seeds as the rollout above)
    comparison = compare_models({"m": lm}, tok, prompts, SamplingParams(max_new_tokens=4), seed=0, reward_model=rm)
    again = [comparison.proxy["m"][i] for i in range(3)]
    seeds = [sample_seed(0, "heldout", i, 0) for i in range(3)]
    rerolled = sample_rollout(lm, [tok.encode(p) for p in prompts], [0, 1, 2], seeds, SamplingParams(max_new_tokens=4),
                              EOS, 0, "")
    torch.testing.assert_close(torch.tensor(again), worker.scores(rerolled), rtol=0, atol=1e-5)
    # 4. the text path (RM accuracy on comparisons files): text responses, EOS appended by encode_example
    texts = [tok.decode(r[:-1] if r[-1] == EOS else r) for r in responses]
    reencoded = score_sequences(rm, [[*tok.encode(p), *tok.encode(t), EOS] for p, t in zip(prompts, texts)], EOS)
    torch.testing.assert_close(torch.tensor(proxy_scores(rm, tok, prompts, texts)), reencoded, rtol=0, atol=1e-5)
