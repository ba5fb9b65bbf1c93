"""SFT and RM objectives as the jobs build them, against naive per-example computations: the response-only loss
mask (prompt targets change nothing), the K-wise batch (K forward passes per prompt, mixed K), the data order,
and the reward normalisation folded into the weights (checked in transformers too)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from actors.reward import score_sequences
from cluster.train.engine import lm_loss_fn
from cluster.train.loop import rank_rows
from jobs.data.examples import encode_example, rank_slice, rm_batch, sft_batch
from jobs.rlhf.reward_model import fold_reward_offset, rm_loss_fn
from models.config import GPTConfig
from models.gpt import GPT
from models.heads import RewardModel

CFG = GPTConfig.from_name("nano", vocab_size=97)
EXAMPLES = [([5, 6, 7], [8, 9, 0]), ([11], [12, 13, 14, 15, 0]), ([20, 21, 22, 23, 24], [25, 0])]


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).eval()


def test_sft_mask_covers_exactly_the_response_and_eos() -> None:
    b = sft_batch(EXAMPLES, pad_id=0)
    assert b["input_ids"].shape == b["targets"].shape == b["loss_mask"].shape == (3, 6)
    for i, (p, r) in enumerate(EXAMPLES):
        picked = b["targets"][i][b["loss_mask"][i].bool()].tolist()
        assert picked == r  # the masked targets are the response tokens incl. EOS, in order
        assert b["input_ids"][i, :len(p) + len(r) - 1].tolist() == (p + r)[:-1]


def test_prompt_targets_change_nothing_in_the_sft_loss() -> None:
    model = _model()
    b = sft_batch(EXAMPLES, pad_id=0)
    loss, _ = lm_loss_fn(model, b)
    prompt_pos = ~b["loss_mask"].bool()
    scrambled = {**b, "targets": torch.where(prompt_pos, torch.randint_like(b["targets"], 97), b["targets"])}
    assert bool(prompt_pos.any())
    torch.testing.assert_close(lm_loss_fn(model, scrambled)[0], loss, rtol=0, atol=0)
    # whereas a response target does matter (the test can fail)
    resp = b["targets"].clone()
    resp[0, 2] = (resp[0, 2] + 1) % 97
    assert not torch.equal(lm_loss_fn(model, {**b, "targets": resp})[0], loss)


def test_sft_loss_equals_naive_response_nll() -> None:
    model = _model()
    loss, _ = lm_loss_fn(model, sft_batch(EXAMPLES, pad_id=0))
    total, count = 0.0, 0
    with torch.no_grad():
        for p, r in EXAMPLES:  # unpadded, one sequence at a time
            seq = torch.tensor([p + r])
            logp = F.log_softmax(model(seq)[0].double(), -1)
            for j, tok in enumerate(r):
                total -= float(logp[len(p) - 1 + j, tok])
                count += 1
    assert math.isclose(float(loss.detach()), total / count, rel_tol=1e-5)


def test_encode_example_appends_eos() -> None:
    class Tok:
        eos_id = 0

        def encode(self, s: str) -> list[int]:
            return [ord(c) for c in s]

    assert encode_example(Tok(), "ab", "c") == ([97, 98], [99, 0])


def _naive_kwise(model: RewardModel, elements: list) -> torch.Tensor:
    per_prompt = []
    for seqs, ranking in elements:
        r = [model(torch.tensor([s]))[0] for s in seqs]  # one unpadded forward pass per response
        pairs = [(ranking[i], ranking[j]) for i, j in itertools.combinations(range(len(seqs)), 2)]
        per_prompt.append(torch.stack([-F.logsigmoid(r[w] - r[lo]) for w, lo in pairs]).mean())
    return torch.stack(per_prompt).mean()


def test_rm_loss_matches_naive_pairs_with_mixed_k() -> None:
    torch.manual_seed(1)
    rm = RewardModel(CFG)
    elements = [
        ([[1, 2, 3, 0], [1, 2, 0], [1, 4, 5, 6, 0]], [2, 0, 1]),
        ([[7, 8, 0], [7, 9, 9, 0]], [1, 0]),
        ([[3, 0], [3, 3, 0], [3, 4, 0], [3, 5, 5, 5, 0]], [0, 3, 1, 2]),
    ]
    calls: list[int] = []
    hook = rm.transformer.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    loss, metrics = rm_loss_fn(rm, rm_batch(elements, pad_id=0))
    hook.remove()
    assert calls == [3 + 2 + 4]  # exactly K sequences per prompt go through the model, none for padding slots
    torch.testing.assert_close(loss, _naive_kwise(rm, elements), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert rm.score.weight.grad is not None and bool(rm.score.weight.grad.abs().sum() > 0)
    # the logged accuracy and margin: per prompt over its C(K,2) pairs, then the mean over prompts
    with torch.no_grad():
        acc, margin = [], []
        for seqs, ranking in elements:
            r = [float(rm(torch.tensor([s]))[0]) for s in seqs]
            pairs = [(ranking[i], ranking[j]) for i, j in itertools.combinations(range(len(seqs)), 2)]
            acc.append(sum(r[w] > r[lo] for w, lo in pairs) / len(pairs))
            margin.append(sum(r[w] - r[lo] for w, lo in pairs) / len(pairs))
    assert 0 < sum(acc) / 3 < 1  # a random RM orders some pairs right and some wrong: both counts are exercised
    assert float(metrics["accuracy"]) == pytest.approx(sum(acc) / 3, abs=1e-6)
    assert float(metrics["margin"]) == pytest.approx(sum(margin) / 3, abs=1e-5)


def test_rm_batch_rejects_k_below_two() -> None:
    with pytest.raises(ValueError, match="K >= 2"):
        rm_batch([([[1, 0]], [0])], pad_id=0)


def test_step_rows_cover_each_epoch_once_and_shard_disjointly() -> None:
    n, rows, dp = 10, 2, 2  # 4 examples per step, 2 per rank
    stream = [i for s in range(5) for r in range(dp) for i in rank_rows(n, s, rows, 3, r, dp)]  # 20 = two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # a new permutation per epoch
    assert rank_rows(n, 3, rows, 3, 1, dp) == stream[14:16]  # a pure function of the step: exact resume
    assert rank_rows(n, 3, 4, 3, 0, 1) == stream[12:16]  # the same step on one rank: the same 4 examples
    assert rank_slice(stream[:4], 0, 2) + rank_slice(stream[:4], 1, 2) == stream[:4]


def test_fold_reward_offset_shifts_every_score(tmp_path: Path) -> None:
    from models.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(2)
    rm = RewardModel(CFG).eval()
    seqs = [[1, 2, 3, 0], [4, 5, 0], [6, 7, 8, 9, 10, 0]]
    before = score_sequences(rm, seqs, eos_id=0)
    offset = float(before.mean())
    fold_reward_offset(rm, offset)
    after = score_sequences(rm, seqs, eos_id=0)
    torch.testing.assert_close(after, before - offset, rtol=0, atol=1e-5)
    assert abs(float(after.mean())) < 1e-5
    path = save_checkpoint(rm, tmp_path / "rm", kind="reward")
    torch.testing.assert_close(score_sequences(load_checkpoint(path), seqs, 0), after)

    # the peer library sees the same normalised reward: GPT2ForSequenceClassification reads the score at the last
    # non-pad token; with pad_token_id unset and one unpadded sequence that is the final EOS, like ours.
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(path).eval()
    hf.config.pad_token_id = None
    with torch.no_grad():
        hf_scores = torch.stack([hf(torch.tensor([s])).logits[0, 0] for s in seqs])
    torch.testing.assert_close(hf_scores, after, rtol=1e-4, atol=1e-4)
