"""Bounded-staleness asynchronous RL (`max_staleness`, jobs/rl/staleness.py): the decoupled policy loss against
a per-token loop and TRL 1.12.0's own token-truncated importance sampling statements, the staleness bound, the
config errors, the stage clock and the in-flight rollout files."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from torch.testing import assert_close
from trl_source import trl_block, trl_without_vllm

from actors.base import RolloutMeta
from actors.rollout import Rollout
from jobs.config import ConfigError, from_dict
from jobs.rl.config import PPOJobConfig, role_specs
from jobs.rl.controller import check_weights
from jobs.rl.staleness import (
    STALENESS_CORRECTION,
    StageClock,
    StaleWeightsError,
    check_config,
    check_staleness,
    load_rollouts,
    save_rollouts,
)
from models.losses import policy_loss


def batch(seed: int, b: int = 6, t: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)  # proximal π_old
    behaviour = old + 0.8 * torch.randn(b, t, generator=g, dtype=torch.float64)  # stale π_behav: weights up to e^2
    return {"logp": logp, "old": old, "behaviour": behaviour, "mask": mask,
            "adv": torch.randn(b, t, generator=g, dtype=torch.float64),
            "ref": logp + 0.5 * torch.randn(b, t, generator=g, dtype=torch.float64)}


# --- the loss -------------------------------------------------------------------------------------------------
def test_on_policy_behaviour_gives_the_plain_loss_bit_for_bit() -> None:
    x = batch(0)
    plain, m0 = policy_loss(x["logp"], x["old"], x["adv"], x["mask"], 0.2)
    same, m1 = policy_loss(x["logp"], x["old"], x["adv"], x["mask"], 0.2, behaviour_logprobs=x["old"].clone())
    assert torch.equal(plain, same)
    assert m1["behaviour_weight"] == 1.0 and m1["behaviour_capped"] == 0.0
    assert all(torch.equal(m0[k], m1[k]) for k in m0)


@pytest.mark.parametrize("cap", [3.0, 1.2])
def test_decoupled_loss_equals_a_per_token_loop(cap: float) -> None:
    """Hilton et al. 2021 / AReaL eq. 5 written out token by token: w = min(π_old/π_behav, cap),
    ℓ = w·max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = π_θ/π_old, token mean over the mask; gradient included."""
    x, eps = batch(1), 0.2
    logp = x["logp"].clone().requires_grad_(True)
    loss, m = policy_loss(logp, x["old"], x["adv"], x["mask"], eps, behaviour_logprobs=x["behaviour"],
                          behaviour_cap=cap)
    (grad,) = torch.autograd.grad(loss, logp)

    ref_logp = x["logp"].clone().requires_grad_(True)
    total, n, weights, capped = 0.0, 0, [], 0
    for b in range(ref_logp.shape[0]):
        for t in range(ref_logp.shape[1]):
            if not x["mask"][b, t]:
                continue
            raw = math.exp(float(x["old"][b, t] - x["behaviour"][b, t]))
            w = min(raw, cap)
            rho = torch.exp(ref_logp[b, t] - x["old"][b, t])
            a = x["adv"][b, t]
            total = total + w * torch.max(-a * rho, -a * torch.clamp(rho, 1 - eps, 1 + eps))
            n, capped = n + 1, capped + (raw > cap)
            weights.append(w)
    want = total / n
    (want_grad,) = torch.autograd.grad(want, ref_logp)
    assert_close(loss, want)
    assert_close(grad, want_grad)
    assert m["behaviour_weight"].item() == pytest.approx(sum(weights) / n, rel=1e-12)
    assert m["behaviour_capped"].item() == pytest.approx(capped / n, rel=1e-6)  # a float32 fraction
    assert capped > 0 and min(weights) < 1  # both sides of the truncation are exercised


with warnings.catch_warnings(), trl_without_vllm():
    warnings.simplefilter("ignore")
    from trl.trainer import grpo_trainer as trl_grpo

GRPO = trl_grpo.GRPOTrainer
TRL_IS_RATIO = trl_block(  # TRL's importance weight of the sampler's log-probs (vLLM) against the trainer's
    GRPO._generate_and_score_completions,
    "mask = completion_mask if tool_mask is None else completion_mask * tool_mask",
    'if self.vllm_importance_sampling_mode in ["sequence_truncate", "token_truncate"]:')
TRL_LOSS = trl_block(GRPO._compute_loss, 'advantages = inputs["advantages"]',
                     'if self.loss_type in ["grpo", "bnpo", "dr_grpo", "dapo"')


@pytest.mark.parametrize(("loss_type", "agg"), [("bnpo", "token-mean"), ("grpo", "seq-mean-token-mean")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_decoupled_loss_matches_trl_token_truncated_importance_sampling(loss_type: str, agg: Any, beta: float
                                                                       ) -> None:
    """TRL 1.12 GRPOTrainer with vllm_importance_sampling_mode="token_truncate": the trainer's recomputed
    log-probs are π_old (proximal), the sampler's are π_behav — our decoupled objective with the same cap."""
    from test_trl_parity_grpo import run, stub

    x, cap = batch(2), 3.0
    self = stub(loss_type=loss_type, beta=beta, epsilon_low=0.2, epsilon_high=0.2, use_vllm=True,
                vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="token_truncate",
                vllm_importance_sampling_clip_min=None, vllm_importance_sampling_clip_max=cap)
    ratio = run(TRL_IS_RATIO, trl_grpo, self=self, completion_mask=x["mask"], tool_mask=None,
                old_per_token_logps=x["old"], sampling_per_token_logps=x["behaviour"])["vllm_importance_sampling_ratio"]
    adv = x["adv"][:, 0]  # GRPO: one advantage per response
    logp_trl = x["logp"].clone().requires_grad_(True)
    inputs = {"advantages": adv, "old_per_token_logps": x["old"], "ref_per_token_logps": x["ref"],
              "num_items_in_batch": x["mask"].sum(), "importance_sampling_ratio": ratio}
    ns = run(TRL_LOSS, trl_grpo, self=self, inputs=inputs, per_token_logps=logp_trl, mask=x["mask"],
             entropy_mask=None, entropies=torch.rand_like(x["logp"]))
    (trl_grad,) = torch.autograd.grad(ns["loss"], logp_trl)

    logp = x["logp"].clone().requires_grad_(True)
    loss, _ = policy_loss(logp, x["old"], adv[:, None], x["mask"], 0.2, loss_agg=agg, kl_coef=beta,
                          ref_logprobs=x["ref"], behaviour_logprobs=x["behaviour"], behaviour_cap=cap)
    (grad,) = torch.autograd.grad(loss, logp)
    assert_close(loss, ns["loss"])
    assert_close(grad, trl_grad)
    assert (ratio[x["mask"].bool()] == cap).any()  # the truncation is exercised


# --- the bound ------------------------------------------------------------------------------------------------
def test_staleness_bound_accepts_up_to_k_versions_and_refuses_the_rest() -> None:
    known = {3: "c3", 4: "c4", 5: "c5"}
    meta = lambda v, c=None: RolloutMeta(2, v, c or f"c{v}", 10)  # noqa: E731
    check_staleness([meta(5), meta(4), meta(3)], known, 5, 2)
    with pytest.raises(StaleWeightsError, match=r"^weight_version: rollout shard 1 .*version 3.*max_staleness=1"):
        check_staleness([meta(5), meta(3)], known, 5, 1)
    with pytest.raises(StaleWeightsError, match="^weight_version"):  # newer than the policy: not ours
        check_staleness([meta(6, "c6")], known, 5, 2)
    with pytest.raises(StaleWeightsError, match=r"^weight_checksum: rollout shard 0 claims weights version 4"):
        check_staleness([meta(4, "other")], known, 5, 2)
    with pytest.raises(StaleWeightsError, match="none recorded"):  # a version whose checksum was never seen
        check_staleness([meta(3)], {5: "c5"}, 5, 2)
    # k = 0 is the synchronous check the controller has always made
    from actors.policy import WeightsInfo

    check_weights([meta(5)], WeightsInfo(5, "c5"))
    with pytest.raises(StaleWeightsError, match="^weight_version"):
        check_weights([meta(4)], WeightsInfo(5, "c5"))


# --- config ---------------------------------------------------------------------------------------------------
def cfg(**fields: Any) -> PPOJobConfig:
    return from_dict(PPOJobConfig, {"reward_model": "/nonexistent/rm", **fields})


@pytest.mark.parametrize(("fields", "field"), [
    ({"max_staleness": -1}, "max_staleness"),
    ({"max_staleness": 1}, "max_staleness"),  # no rollout workers: the policy samples, nothing can overlap
    ({"max_staleness": 1, "placement": {"replicas": {"rollout": 1}}, "loss": {"behaviour_cap": 0.5}},
     "loss.behaviour_cap"),
])
def test_bad_staleness_input_is_a_config_error_naming_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg(**fields)
    assert str(e.value).startswith(field + ":"), str(e.value)


def test_an_algorithm_without_a_correction_is_refused_and_every_online_one_has_one() -> None:
    from jobs.rl.config import ALGORITHMS

    assert set(STALENESS_CORRECTION) == set(ALGORITHMS)  # a new algorithm must decide before it may run async
    with pytest.raises(ConfigError, match="^max_staleness: algorithm 'a2c' has no importance correction"):
        check_config(1, 3.0, "rollout", "a2c")
    check_config(0, 3.0, "policy", "a2c")  # synchronous: nothing to correct
    for algorithm, g in (("ppo", 1), ("grpo", 4), ("rloo", 2), ("reinforce_pp", 1)):
        c = cfg(algorithm=algorithm, group_size=g, batch_size=8, max_staleness=2,
                placement={"replicas": {"rollout": 1}})
        assert role_specs(c, 0, "/tok.json", 1, 1).policy.update.behaviour_cap == 3.0
    assert role_specs(cfg(), 0, "/tok.json", 1, 1).policy.update.behaviour_cap is None  # k = 0: on-policy loss


# --- clock and files ------------------------------------------------------------------------------------------
def test_stage_clock_records_each_stage_span_beside_its_duration() -> None:
    clock = StageClock()
    clock["score"] = 0.5
    start, end = clock.spans["score"]
    assert clock["score"] == 0.5 and end - start == pytest.approx(0.5, abs=1e-3) and end <= clock.now()
    clock["startup"] = 1.0
    assert set(clock.timeline()) == {"score"} and clock.timeline() == {}  # one iteration's spans, then reset


def test_in_flight_rollouts_round_trip_exactly_through_an_atomic_file(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    shards = [Rollout(prompt_ids=torch.randint(1, 50, (2, 3), generator=g), prompt_mask=torch.ones(2, 3).long(),
                      response_ids=torch.randint(1, 50, (2, 4), generator=g), action_mask=torch.ones(2, 4).long(),
                      old_logprobs=torch.randn(2, 4, generator=g), row_index=torch.arange(2) + 2 * i,
                      weight_version=7, weight_checksum="abc", engine="vllm", exact_logprobs=False)
              for i in range(2)]
    path = tmp_path / "rollouts" / "it-000008.npz"
    metas = save_rollouts(str(path), *shards)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    out = load_rollouts(str(path))
    assert list(out[:2]) == metas and metas[0] == RolloutMeta(2, 7, "abc", shards[0].nbytes())
    for a, b in zip(shards, out[2:]):
        assert (b.weight_version, b.weight_checksum, b.engine, b.exact_logprobs) == (7, "abc", "vllm", False)
        assert b.ref_logprobs is None and b.advantages is None
        for name in ("prompt_ids", "prompt_mask", "response_ids", "action_mask", "old_logprobs", "row_index"):
            assert torch.equal(getattr(a, name), getattr(b, name)) and getattr(a, name).dtype == getattr(b, name).dtype
