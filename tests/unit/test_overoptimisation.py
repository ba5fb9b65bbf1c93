"""Issue 17 (reward over-optimisation): the diversity metrics against hand-counted examples, the reward role's
shaping (repetition penalty, clip, batch normalisation, a conservative ensemble) against the formulas worked by
hand on its own component scores, an ensemble checkpoint that loads and scores, the PPO config that expands it,
the stop rule on hand-made signal sequences, and the Gao-style report plot. Tiny random models, no training."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from actors.base import sample_rollout
from actors.reward import RewardComponent, RewardError, RewardShaping, RewardSpec, RewardWorker
from jobs.config import ConfigError, from_dict
from jobs.report import plot_overoptimisation
from jobs.rl.config import PPOJobConfig, role_specs
from jobs.rl.mitigation import MitigationConfig, StopRule
from jobs.rl.monitor import Monitor
from models.checkpoint import save_checkpoint
from models.config import GPTConfig
from models.diversity import distinct_n, repeated_ngrams, repetition_rate, word_ids
from models.ensemble import conservative_score, ensemble_members, load_ensemble, write_ensemble
from models.generation import SamplingParams
from models.gpt import GPT
from models.heads import RewardModel
from models.tokenizer import Tokenizer


# --- metrics ------------------------------------------------------------------------------------------------------
def test_distinct_and_repetition_hand_counted() -> None:
    a = "love the love the love".split()  # bigrams (love the)(the love)(love the)(the love)
    b = "sweet love".split()  # (sweet love)
    assert distinct_n([a, b], 1) == 3 / 7  # love, the, sweet of 7 words
    assert distinct_n([a, b], 2) == 3 / 5  # 3 distinct of 5 bigrams
    assert repetition_rate([a], 2) == 2 / 4  # 2 of a's 4 bigrams repeat an earlier one of a
    assert repetition_rate([a, b], 2) == 2 / 5
    assert repetition_rate([a, a], 2) == 4 / 8  # repeats across sequences do not count (unlike distinct-n)
    assert repetition_rate([["x"]], 2) == 0.0 and distinct_n([["x"]], 2) == 0.0
    with pytest.raises(ValueError, match="n: must be >= 1"):
        repetition_rate([a], 0)


def test_repeated_ngrams_on_tokens_matches_the_word_count_per_row() -> None:
    ids = torch.tensor([[1, 2, 1, 2, 1, 9], [3, 4, 5, 6, 0, 0], [5, 6, 7, 7, 7, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    got = repeated_ngrams(ids, mask, 2)
    # the naive count on each row's masked tokens, row by row
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    assert_close(got, torch.tensor([repetition_rate([r], 2) for r in rows]))
    assert got.tolist() == pytest.approx([2 / 4, 0.0, 2 / 5])  # row 2: (7 7) three times = 2 repeats of 5
    # across rows: row 1's (5 6) and row 2's (5 6) are shared, so each counts once more
    across = repeated_ngrams(ids, mask, 2, across_rows=True)
    assert across.tolist() == pytest.approx([2 / 4, 1 / 3, 3 / 5])
    assert repeated_ngrams(ids[:, :1], mask[:, :1], 2).tolist() == [0.0, 0.0, 0.0]  # no bigram at all


def test_word_ids_count_the_evaluators_words() -> None:
    texts = [" love the love the", "O love the day\n", "", "day"]
    ids, mask = word_ids(texts)
    assert ids.shape == (4, 4) and mask.sum(1).tolist() == [4, 4, 0, 1]
    assert ids[0, :4].tolist() == [0, 1, 0, 1] and ids[1, :4].tolist() == [2, 0, 1, 3] and ids[3, 0] == 3
    # the per-row penalty on word ids, against the count written out on the split words
    within = repeated_ngrams(ids, mask, 2)
    assert_close(within, torch.tensor([repetition_rate([t.split()], 2) for t in texts]))
    across = repeated_ngrams(ids, mask, 2, across_rows=True)
    # row 0: (love the) is in row 1, (the love) repeats nothing, (love the) again → 2/3; row 1: (love the) → 1/3
    assert across.tolist() == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0])
    assert word_ids([])[0].shape == (0, 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summed_batch_repeats_are_each_rows_share_of_distinct2(seed: int) -> None:
    """reduction="sum" with across_rows: per row, how many fewer repeated bigrams (total − distinct, the numerator
    of 1 − distinct-2) the batch has without that row — checked by leaving each row out of `distinct_n`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4, (6, 7), generator=g)  # a 4-word vocabulary: bigrams collide within and across rows
    lengths = torch.randint(0, 8, (6,), generator=g)
    mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
    rows = [r[:int(k)].tolist() for r, k in zip(ids, lengths)]

    def repeats(seqs: list[list[int]]) -> float:
        total = sum(max(len(s) - 1, 0) for s in seqs)
        return total - distinct_n(seqs, 2) * total

    got = repeated_ngrams(ids, mask, 2, across_rows=True, reduction="sum")
    want = [repeats(rows) - repeats(rows[:i] + rows[i + 1:]) for i in range(len(rows))]
    assert got.tolist() == pytest.approx(want)
    count = torch.clamp(lengths - 1, min=0).float()
    assert_close(got, repeated_ngrams(ids, mask, 2, across_rows=True) * count)  # the mean × the row's n-grams
    with pytest.raises(ValueError, match="reduction: 'mean' or 'sum'"):
        repeated_ngrams(ids, mask, 2, reduction="max")  # type: ignore[arg-type]


# --- the reward role's shaping -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("overopt")
    tok = Tokenizer.train(["The sweet love of a happy heart. " * 20, "A sad grief and bitter woe. " * 20], 300)
    cfg = GPTConfig.from_name("nano", vocab_size=tok.vocab_size)
    rms = []
    for seed in range(3):  # three members "trained with different seeds": here, three random initialisations
        torch.manual_seed(seed)
        rms.append(save_checkpoint(RewardModel(cfg), root / f"rm{seed}" / "checkpoint", kind="reward",
                                   tokenizer=tok))
    torch.manual_seed(0)
    lm = GPT(cfg).eval()
    p = tok.encode("The sweet")
    rollout = sample_rollout(lm, [p, p], [0, 1], [1, 2], SamplingParams(max_new_tokens=6), tok.eos_id, 0, "")
    a, b, c = tok.encode(" love")[0], tok.encode(" heart")[0], tok.encode(" happy")[0]
    # same prompt; row 0 loops "love heart love heart …", row 1 does not repeat (no EOS: both cut at 6 tokens)
    resp = torch.tensor([[a, b, a, b, a, b], [a, b, c, tok.encode(" of")[0], tok.encode(" sad")[0], a]])
    rollout = rollout.replace(response_ids=resp, action_mask=torch.ones_like(resp))
    return {"tok": tok, "rms": rms, "rollout": rollout, "root": root}


def worker(tiny: dict, shaping: RewardShaping, members: int = 1) -> RewardWorker:
    parts = tuple(RewardComponent(f"rm_{i}", str(tiny["rms"][i])) for i in range(members))
    return RewardWorker(RewardSpec(components=parts, eos_id=tiny["tok"].eos_id, shaping=shaping))


def test_repetition_penalty_lowers_the_reward_of_a_repetitive_response(tiny: dict) -> None:
    rollout = tiny["rollout"]
    plain = worker(tiny, RewardShaping()).scores(rollout)
    penalised = worker(tiny, RewardShaping(repetition_coef=2.0)).scores(rollout)
    # row 0's bigrams: (love heart)(heart love)(love heart)(heart love)(love heart): 3 of 5 repeat
    assert_close(penalised, plain - 2.0 * torch.tensor([3 / 5, 0.0]))
    assert penalised[0] < plain[0] and penalised[1] == plain[1]
    longer = worker(tiny, RewardShaping(length_coef=0.1)).scores(rollout)
    assert_close(longer, plain - 0.1 * 6)


def test_repetition_penalty_on_words_decodes_the_responses(tiny: dict) -> None:
    rollout, tok = tiny["rollout"], tiny["tok"]
    spec = RewardSpec(components=(RewardComponent("rm", str(tiny["rms"][0])),), eos_id=tok.eos_id,
                      tokenizer=str(tiny["root"] / "rm0" / "checkpoint" / "tokenizer.json"),
                      shaping=RewardShaping(repetition_coef=2.0, repetition_across=True, repetition_unit="word"))
    plain = worker(tiny, RewardShaping()).scores(rollout)
    words = [tok.decode(r.tolist()).split() for r in rollout.response_ids]
    assert words[0] == ["love", "heart"] * 3 and words[1][:2] == ["love", "heart"]
    # row 0: (love heart) is also in row 1, (heart love) is not, then 3 repeats of its own → 4/5; row 1: 1/5
    assert_close(RewardWorker(spec).scores(rollout), plain - 2.0 * torch.tensor([4 / 5, 1 / 5]))
    summed = replace(spec, shaping=replace(spec.shaping, repetition_reduction="sum"))
    assert_close(RewardWorker(summed).scores(rollout), plain - 2.0 * torch.tensor([4.0, 1.0]))  # the counts
    with pytest.raises(RewardError, match="repetition_unit: a penalty on words needs a tokenizer"):
        RewardSpec(checkpoint=str(tiny["rms"][0]), shaping=RewardShaping(repetition_coef=1.0, repetition_unit="word"))
    # the job config: the word unit hands the reward role the tokenizer; a bad value names its field
    cfg = from_dict(PPOJobConfig, {"reward_model": str(tiny["rms"][0]), "mitigation": {
        "repetition_penalty": 1.0, "repetition_unit": "word", "repetition_reduction": "sum"}})
    reward = role_specs(cfg, tok.eos_id, "tok.json", 1, 1).reward
    assert reward.tokenizer == "tok.json" and reward.shaping.repetition_reduction == "sum"
    for key, bad in (("repetition_unit", "char"), ("repetition_reduction", "max")):
        with pytest.raises(ConfigError, match=key):
            from_dict(MitigationConfig, {key: bad})


def test_clip_normalise_and_conservative_ensemble_by_hand(tiny: dict) -> None:
    rollout = tiny["rollout"]
    w = worker(tiny, RewardShaping(ensemble=True, ensemble_k=1.5, normalize="batch", clip=0.5), members=3)
    parts = w.component_scores(rollout)
    m = torch.stack([parts[f"rm_{i}"] for i in range(3)])  # (3, 2)
    mean = m.mean(0)
    std = ((m - mean) ** 2).mean(0).sqrt()  # population std over members
    lcb = mean - 1.5 * std
    whitened = (lcb - lcb.mean()) / (((lcb - lcb.mean()) ** 2).mean().sqrt() + 1e-6)
    assert_close(w.scores(rollout), whitened.clamp(-0.5, 0.5))
    meta, _ = w.score(rollout)
    assert meta.components["ensemble_std"] == pytest.approx(float(std.mean()), rel=1e-5)
    assert meta.components["repetition"] == pytest.approx(3 / 10)  # mean of (3/5, 0)
    with pytest.raises(RewardError, match="at least two"):
        worker(tiny, RewardShaping(ensemble=True), members=1)


# --- the ensemble checkpoint ---------------------------------------------------------------------------------------
def test_ensemble_checkpoint_loads_and_scores(tiny: dict) -> None:
    first, *others = tiny["rms"]
    write_ensemble(first, others, seeds=[0, 1, 2])
    try:
        assert [p.resolve() for p in ensemble_members(first)] == [p.resolve() for p in tiny["rms"]]
        ens = load_ensemble(first)
        rollout = tiny["rollout"]
        ids, mask = rollout.input_ids, rollout.attention_mask
        each = torch.stack([RewardWorker(RewardSpec(checkpoint=str(p), eos_id=tiny["tok"].eos_id)).model(ids, mask)
                            for p in tiny["rms"]])
        with torch.no_grad():
            assert_close(ens(ids, mask), each)
        assert_close(conservative_score(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), 2.0), torch.tensor([0.0, 0.0]))
        # PPO: mitigation.ensemble expands the one reward model into its members
        cfg = from_dict(PPOJobConfig, {"reward_model": str(first), "mitigation": {"ensemble": True, "ensemble_k": 1}})
        comps = cfg.reward_components()
        assert [c.name for c in comps] == ["rm_0", "rm_1", "rm_2"]
        assert [Path(c.checkpoint or "").resolve() for c in comps] == [p.resolve() for p in tiny["rms"]]
    finally:
        (first / "ensemble.json").unlink()
    with pytest.raises(ConfigError, match="mitigation.ensemble"):
        from_dict(PPOJobConfig, {"reward_model": str(first), "mitigation": {"ensemble": True}}).reward_components()


# --- the stop rule ---------------------------------------------------------------------------------------------------
def test_stop_rule_fires_after_patience_on_kl_and_on_rising_disagreement() -> None:
    rule = StopRule(MitigationConfig(stop_kl=6.0, stop_patience=2))
    # over budget once, back under (streak reset), then twice in a row: fires on the second
    assert [rule.update({"kl": k}) is not None for k in (5.0, 6.5, 5.9, 6.1, 7.0)] == [False] * 4 + [True]
    rule = StopRule(MitigationConfig(ensemble=True, stop_disagreement=2.0, stop_patience=3))
    stds = [0.10, 0.15, 0.21, 0.25, 0.19, 0.22, 0.30, 0.40]  # > 2 × 0.10 at 0.21, 0.25 | 0.22, 0.30, 0.40
    fired = [rule.update({"kl": 1.0, "reward/ensemble_std": s}) for s in stds]
    assert [f is not None for f in fired] == [False] * 7 + [True]
    assert "disagreement" in (fired[-1] or "")
    assert StopRule(MitigationConfig()).update({"kl": 1e9}) is None  # off by default
    with pytest.raises(ConfigError, match="stop_disagreement: needs an ensemble"):
        from_dict(MitigationConfig, {"stop_disagreement": 2.0})


def test_monitor_ends_the_run_on_the_stop_rule_but_not_after_the_last_iteration() -> None:
    cfg = from_dict(PPOJobConfig, {"iterations": 5, "mitigation": {"stop_kl": 6.0, "stop_patience": 1}})
    never = lambda: pytest.fail("monitor.every=0 never asks for the weights")  # noqa: E731
    mon = Monitor(cfg, metrics=None)
    assert mon.step(0, {"kl": 5.0}, never) is False
    assert mon.step(1, {"kl": 6.5}, never) is True
    assert mon.summary() == {"stopped_at": 2, "stop_reason": "KL per response above mitigation.stop_kl=6 for 1 "
                                                            "iterations"}
    last = Monitor(cfg, metrics=None)
    assert last.step(4, {"kl": 9.0}, never) is False and last.summary() == {}  # the run ends there anyway


# --- the report's plot -----------------------------------------------------------------------------------------------
def test_overoptimisation_plot_from_metrics_rows(tmp_path: Path) -> None:
    rows = [{"step": i, "iteration": i, "kl": 0.5 * i, "gold_reward": 0.1 * i, "proxy_reward": 0.3 * i,
             "reward/distinct2_tokens": 0.9} for i in range(1, 5)]
    rows += [{"step": 2, "heldout_iteration": 2, "heldout_kl": 1.0, "heldout_gold": 0.3, "heldout_proxy": 0.5,
              "heldout_distinct2": 0.95, "heldout_sft_distinct2": 0.96, "heldout_repetition": 0.01}]
    final = {"ppo/kl": 2.2, "ppo/gold": 0.5, "ppo/proxy": 1.0, "ppo/distinct2": 0.93, "sft/distinct2": 0.96}
    path = plot_overoptimisation(rows, final, tmp_path / "o.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(rows)  # rows as metrics.jsonl holds them
