"""`raygpt dpo`'s data and objective without Ray (jobs/rlhf/preference.py), and distinct-n (jobs/rlhf/evaluation.py):

- a K-wise comparison gives its C(K,2) pairs, the RM's pairs, chosen = the better-ranked response;
- a comparisons file without rankings is a ConfigError naming `comparisons` and the missing column;
- the pair batch's sequence log-probs equal a naive per-pair sum of response-token log-probs under the same model,
  whatever the padding, and the loss fed to the engine equals models.dpo's on those log-probs;
- distinct-n against hand-counted n-grams.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from jobs.config import ConfigError
from jobs.data.examples import encode_example
from jobs.rlhf.preference import Pair, load_pairs, pair_batch, pair_logprobs, preference_loss_fn, reference_logprobs
from models.config import GPTConfig
from models.diversity import distinct_n
from models.dpo import preference_loss
from models.gpt import GPT
from models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(["The sweet love of a happy heart. " * 20, "A sad grief and bitter woe. " * 20], 300)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_kwise_ranking_gives_all_pairs_chosen_first(tok: Tokenizer, tmp_path: Path) -> None:
    rows = [{"prompt": "The sweet", "responses": ["love", "woe", "heart"], "ranking": [2, 0, 1]},
            {"prompt": "A sad", "responses": ["grief", "happy"], "ranking": [1, 0]}]
    pairs, counts = load_pairs(write_jsonl(tmp_path / "c.jsonl", rows), tok, max_tokens=48)
    assert counts == {"comparisons": 2, "dropped_too_long": 0, "pairs": 4}

    def enc(prompt: str, response: str) -> tuple[list[int], list[int]]:
        return encode_example(tok, prompt, response)

    # ranking [2, 0, 1]: heart ≻ love ≻ woe → (heart, love), (heart, woe), (love, woe)
    want = [("The sweet", "heart", "love"), ("The sweet", "heart", "woe"), ("The sweet", "love", "woe"),
            ("A sad", "happy", "grief")]
    assert pairs == [Pair(enc(p, c)[0], enc(p, c)[1], enc(p, r)[1]) for p, c, r in want]
    assert all(p.chosen[-1] == tok.eos_id for p in pairs)  # responses end with EOS, as for SFT and the RM


def test_comparisons_without_rankings_are_refused_naming_the_column(tok: Tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "norank.jsonl", [{"prompt": "a", "responses": ["x", "y"]}])
    with pytest.raises(ConfigError, match=r"^comparisons: .*row 0.*'ranking'"):
        load_pairs(path, tok, max_tokens=48)


def test_pair_logprobs_equal_a_naive_sum_and_the_loss_is_models_dpo(tok: Tokenizer) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("nano", vocab_size=tok.vocab_size)).eval()
    g = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(1, tok.vocab_size, (n,), generator=g).tolist()

    pairs = [Pair(ids(3), ids(4) + [0], ids(1) + [0]), Pair(ids(1), ids(2) + [0], ids(6) + [0]),
             Pair(ids(5), ids(1) + [0], ids(2) + [0])]

    def naive(prompt: list[int], response: list[int]) -> float:
        seq = torch.tensor([prompt + response])
        logp = torch.log_softmax(model(seq[:, :-1]).float(), -1)[0].detach()
        return sum(float(logp[len(prompt) - 1 + t, response[t]]) for t in range(len(response)))

    with torch.no_grad():
        chosen, rejected = pair_logprobs(model, pair_batch(pairs, pad_id=0))
        ref_c, ref_r = reference_logprobs(model, pairs, pad_id=0, batch_size=2)  # batching must not matter
    assert_close(chosen, torch.tensor([naive(p.prompt, p.chosen) for p in pairs]), rtol=1e-5, atol=1e-5)
    assert_close(rejected, torch.tensor([naive(p.prompt, p.rejected) for p in pairs]), rtol=1e-5, atol=1e-5)
    assert_close(torch.from_numpy(ref_c), chosen, rtol=1e-5, atol=1e-5)

    shifted_c, shifted_r = ref_c - 0.3, ref_r + 0.2  # a reference that differs from the policy
    batch = pair_batch(pairs, 0, shifted_c, shifted_r)
    lengths_c = torch.tensor([len(p.chosen) for p in pairs])
    lengths_r = torch.tensor([len(p.rejected) for p in pairs])
    for loss_type in ("sigmoid", "ipo"):
        with torch.no_grad():
            loss, metrics = preference_loss_fn(loss_type, 0.5, model, batch)
            want, want_m = preference_loss(loss_type, chosen, rejected, torch.from_numpy(shifted_c),
                                           torch.from_numpy(shifted_r), 0.5, lengths_c, lengths_r)
        assert_close(loss, want, rtol=1e-5, atol=1e-6)
        assert metrics.keys() == want_m.keys() == {"reward_chosen", "reward_rejected", "reward_margin", "accuracy"}


def test_distinct_n_hand_counted() -> None:
    a, b = "the cat the cat".split(), "the dog".split()
    # bigrams: (the,cat) (cat,the) (the,cat) | (the,dog) → 3 distinct of 4
    assert distinct_n([a, b], 2) == 3 / 4
    # unigrams: the cat the cat the dog → {the, cat, dog} of 6
    assert distinct_n([a, b], 1) == 3 / 6
    assert distinct_n([["x"]], 2) == 0.0  # no bigram at all
    assert distinct_n([["a", "b", "c"]], 3) == 1.0
    with pytest.raises(ValueError, match="n: must be >= 1"):
        distinct_n([a], 0)


def test_dpo_config_errors_name_the_field(tmp_path: Path) -> None:
    from jobs.config import from_dict
    from jobs.dpo import DPOConfig, comparison_files

    with pytest.raises(ConfigError, match=r"^loss: must be one of \['sigmoid', 'ipo'\]"):
        from_dict(DPOConfig, {"loss": "hinge"})
    with pytest.raises(ConfigError, match=r"^beta: must be > 0"):
        from_dict(DPOConfig, {"beta": 0.0})
    with pytest.raises(ConfigError, match=r"^comparisons: no such file or directory"):
        comparison_files(from_dict(DPOConfig, {"comparisons": str(tmp_path / "missing")}))
    with pytest.raises(ConfigError, match=r"^comparisons: .* has no train.parquet"):
        comparison_files(from_dict(DPOConfig, {"comparisons": str(tmp_path)}))
    (tmp_path / "train.parquet").touch()
    (tmp_path / "heldout.parquet").touch()
    assert comparison_files(from_dict(DPOConfig, {"comparisons": str(tmp_path)})) == (
        tmp_path / "train.parquet", tmp_path / "heldout.parquet")
