"""The online RL job's algorithm wiring, without Ray (CPU, seconds):

- config: `algorithm`, `group_size`, the value role, composed rewards — bad input is a ConfigError naming the field,
  raised while the config is built (before anything starts); the --dry-run plan shows the placement without a
  value role for critic-free algorithms; each algorithm's loss settings reach the policy's spec;
- `finalize` with the group estimators equals `compute_advantages` on the assembled batch (independent of how the
  batch was sharded), and GRPO's reward carries no KL (KL is its loss term);
- sampling G responses per prompt with a shared prefill gives the rows of sampling each prompt G times;
- the reward role composes a reward model and a function with weights and reports each component.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from actors.base import sample_rollout
from actors.reward import RewardComponent, RewardSpec, RewardWorker
from actors.rollout import Rollout, finalize
from jobs.config import ConfigError, from_dict
from jobs.rl.config import PPOJobConfig, plan, role_specs
from models.advantages import AdvantageInputs, compute_advantages, kl_penalty
from models.checkpoint import save_checkpoint
from models.config import GPTConfig
from models.generation import SamplingParams
from models.gpt import GPT
from models.heads import RewardModel
from models.tokenizer import Tokenizer

FN = "jobs.data.tasks.positive_verse:PositiveVerseTask"


def cfg(**fields: Any) -> PPOJobConfig:
    return from_dict(PPOJobConfig, {"reward_model": "/nonexistent/rm", **fields})


# --- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "field"), [
    ({"algorithm": "a2c"}, "algorithm"),
    ({"algorithm": "grpo", "group_size": 1}, "group_size"),
    ({"algorithm": "rloo"}, "group_size"),  # group_size defaults to 1
    ({"algorithm": "grpo", "group_size": 4, "placement": {"replicas": {"value": 1}}}, "placement.replicas.value"),
    ({"algorithm": "rloo", "group_size": 2, "placement": {"layout": "disaggregated", "replicas": {"value": 2}}},
     "placement.replicas.value"),
    ({"algorithm": "ppo", "placement": {"replicas": {"value": 0}}}, "placement.replicas.value"),
    ({"reward_model": None, "reward_function": "no_such_module_xyz:fn"}, "reward_function"),
    ({"reward_model": None, "rewards": [{"model": "/m"}, {"function": "jobs.data.tasks:no_such_fn"}]},
     "rewards[1].function"),
    ({"reward_model": None, "rewards": [{"model": "/m", "function": FN}]}, "rewards[0]"),
    ({"reward_model": "/other/rm", "rewards": [{"model": "/m"}]}, "rewards"),
    ({"reward_model": None, "rewards": [{"model": "/a"}, {"model": "/b", "name": "rm_0"}]}, "rewards"),
    ({"algorithm": "grpo", "group_size": 3, "batch_size": 5}, "batch_size"),  # 15 responses, minibatch 8
])
def test_bad_input_is_a_config_error_naming_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg(**fields)
    assert str(e.value).startswith(field), str(e.value)


def test_critic_free_algorithms_place_no_value_role_and_the_plan_shows_it() -> None:
    for algorithm, g in (("grpo", 4), ("rloo", 2), ("reinforce_pp", 1)):
        c = cfg(algorithm=algorithm, group_size=g, batch_size=8)
        assert "value" not in c.placement_spec().roles
        text = plan(c)
        assert "value[" not in text and "no value role" in text and "policy[0]" in text
    ppo = cfg()
    assert ppo.placement_spec().roles["value"].replicas == 1 and "value[0]" in plan(ppo)


def test_each_algorithm_reaches_the_policy_loss_it_names() -> None:
    def update(c: PPOJobConfig) -> Any:
        return role_specs(c, 0, "/tok.json", 1, 0).policy.update

    grpo = cfg(algorithm="grpo", group_size=4, batch_size=8)
    assert grpo.kl_in_loss and update(grpo).loss_agg == "seq-mean-token-mean" and update(grpo).kl_estimator == "k3"
    dr = cfg(algorithm="grpo", group_size=4, batch_size=8, sampling={"max_new_tokens": 20},
             loss={"agg": "seq-mean-token-sum-norm", "group_scale": "none"})
    assert update(dr).loss_agg == "seq-mean-token-sum-norm" and update(dr).max_response_len == 20
    dapo = cfg(algorithm="grpo", group_size=4, batch_size=8, loss={"agg": "token-mean", "clip_high": 0.28})
    assert (update(dapo).loss_agg, update(dapo).clip_high, update(dapo).clip_low) == ("token-mean", 0.28, None)
    for name, g in (("ppo", 1), ("rloo", 2), ("reinforce_pp", 1)):
        c = cfg(algorithm=name, group_size=g, batch_size=8)
        assert not c.kl_in_loss and update(c).loss_agg == "token-mean" and update(c).max_response_len is None


def test_reward_shorthands_and_composed_rewards() -> None:
    one = cfg(reward_model="/x/rm").reward_components()
    assert one == [RewardComponent("rm", str(Path("/x/rm")), None, 1.0)]
    two = cfg(reward_model=None, rewards=[{"model": "/x/rm"}, {"function": FN, "weight": 0.5}]).reward_components()
    assert [(c.name, c.checkpoint, c.function, c.weight) for c in two] == [
        ("rm", "/x/rm", None, 1.0), ("PositiveVerseTask", None, FN, 0.5)]
    # value_init defaults to the first reward model of the composed reward
    c = cfg(reward_model=None, rewards=[{"function": FN}, {"model": "/x/rm2"}])
    assert role_specs(c, 0, "/tok.json", 1, 1).value.checkpoint == "/x/rm2"


# --- advantages over the assembled batch ----------------------------------------------------------------------
def grouped_rollouts(seed: int, prompts: int, g: int, t: int = 6) -> tuple[list[Rollout], list, list]:
    """Shards of a batch of prompts × g rows (row index = global row), with reference log-probs and scores."""
    gen = torch.Generator().manual_seed(seed)
    b = prompts * g
    lens = torch.randint(1, t + 1, (b,), generator=gen)
    mask = (torch.arange(t)[None] < lens[:, None]).long()
    lp = torch.where(mask.bool(), -torch.rand(b, t, generator=gen) * 3, 0.0)
    ref = torch.where(mask.bool(), lp + 0.3 * torch.randn(b, t, generator=gen), 0.0)
    whole = Rollout(prompt_ids=torch.randint(1, 50, (b, 3), generator=gen), prompt_mask=torch.ones(b, 3).long(),
                    response_ids=torch.where(mask.bool(), torch.randint(1, 50, (b, t), generator=gen), 0),
                    action_mask=mask, old_logprobs=lp, row_index=torch.arange(b), weight_version=1,
                    weight_checksum="c")
    scores = torch.randn(b, generator=gen)
    # Shards of whole groups, handed over in a shuffled order: finalize restores the global row order.
    cut = [0, g, 3 * g, b]
    shards = [whole.select(range(a, z)) for a, z in zip(cut, cut[1:])][::-1]
    return shards, [ref[s.row_index] for s in shards], [scores[s.row_index] for s in shards]


@pytest.mark.parametrize(("estimator", "kl_in_reward"), [("grpo", False), ("rloo", True), ("reinforce_pp", True)])
def test_finalize_runs_the_named_estimator_on_the_whole_batch(estimator: str, kl_in_reward: bool) -> None:
    g = 4
    shards, refs, scores = grouped_rollouts(1, prompts=5, g=g)
    stats, (out,) = finalize(shards, refs, scores, None, beta=0.1, kl_estimator="k1", gamma=1.0, lam=0.95,
                             whiten_advantages=True, splits=[2], estimator=estimator, group_size=g,
                             kl_in_reward=kl_in_reward)
    batch = Rollout.concat(out)
    assert batch.row_index.tolist() == list(range(5 * g)) and batch.values is None
    full = Rollout.concat(shards)
    order = torch.argsort(full.row_index)
    lp, ref = full.old_logprobs[order], torch.cat(refs)[order]
    mask = full.action_mask[order]
    kl = torch.where(mask.bool(), kl_penalty(lp, ref, "k1"), 0.0)
    want = compute_advantages(estimator, AdvantageInputs(
        scores=torch.cat(scores)[order], mask=mask, kl=kl if kl_in_reward else None,
        kl_coef=0.1 if kl_in_reward else 0.0, group_size=g))
    assert_close(batch.advantages, want.advantages)
    assert_close(batch.rewards, want.rewards)
    if not kl_in_reward:  # GRPO: the reward is the score alone, on the last token
        assert_close(batch.rewards.sum(1), torch.cat(scores)[order])
        assert stats["non_score_reward"] == 0.0
    assert ("return_mean" in stats) == (estimator == "reinforce_pp") and "value_mean" not in stats


# --- sampling groups with a shared prefill ---------------------------------------------------------------------
def test_group_sampling_with_shared_prefill_equals_repeating_the_prompts() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("nano")).eval()
    prompts, g = [[5, 6, 7], [9], [3, 4]], 3
    seeds = [100 + i for i in range(len(prompts) * g)]
    sp = SamplingParams(max_new_tokens=6)
    shared = sample_rollout(model, prompts, range(9), seeds, sp, 0, 0, "", n=g)
    repeated = sample_rollout(model, [p for p in prompts for _ in range(g)], range(9), seeds, sp, 0, 0, "")
    for name in ("prompt_ids", "prompt_mask", "response_ids", "action_mask", "row_index"):
        assert torch.equal(getattr(shared, name), getattr(repeated, name)), name
    assert_close(shared.old_logprobs, repeated.old_logprobs, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="row indices and seeds"):
        sample_rollout(model, prompts, range(3), seeds[:3], sp, 0, 0, "", n=g)


# --- composed rewards -------------------------------------------------------------------------------------------
def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A rule reward for the test: the response's length in characters."""
    return [float(len(r)) for r in responses]


def test_reward_role_composes_weighted_components_and_reports_each(tmp_path: Path) -> None:
    tok = Tokenizer.train(["The sweet love of a happy heart. " * 20, "A sad grief and bitter woe. " * 20], 300)
    tok_path = tmp_path / "tokenizer.json"
    tok.save(tok_path)
    mcfg = GPTConfig.from_name("nano", vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    rm_dir = save_checkpoint(RewardModel(mcfg), tmp_path / "rm", kind="reward", tokenizer=tok)
    lm = GPT(mcfg).eval()
    rollout = sample_rollout(lm, [tok.encode("The sweet"), tok.encode("A sad")], [0, 1], [1, 2],
                             SamplingParams(max_new_tokens=5), tok.eos_id, 0, "")
    parts = (RewardComponent("rm", str(rm_dir)), RewardComponent("len", function=f"{__name__}:length_reward",
                                                                   weight=0.5))
    worker = RewardWorker(RewardSpec(components=parts, tokenizer=str(tok_path), eos_id=tok.eos_id))
    rm_only = RewardWorker(RewardSpec(checkpoint=str(rm_dir), eos_id=tok.eos_id)).scores(rollout)
    from actors.reward import decode_rollout

    lengths = torch.tensor(length_reward(*decode_rollout(rollout, tok.decode, tok.eos_id)))
    meta, scores = worker.score(rollout)
    assert_close(scores, rm_only + 0.5 * lengths)
    named = {k: meta.components[k] for k in ("rm", "len")}  # besides the batch's text statistics (issue 17)
    assert named == pytest.approx({"rm": float(rm_only.mean()), "len": float(lengths.mean())})
    assert meta.mean == pytest.approx(float(scores.mean()))
