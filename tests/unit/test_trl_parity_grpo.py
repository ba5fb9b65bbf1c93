"""Peer check: our critic-free RL math equals TRL 1.12.0's GRPOTrainer and RLOOTrainer on random inputs.

TRL computes advantages and losses inline in `_generate_and_score_completions` and `_compute_loss`; the tests cut
those statements out of the installed source (tests/unit/trl_source.py) and execute them, with the trainer's module
globals (torch, nanstd, nanmin, …) and a stub `self` holding only the attributes the statements read, on the same
float64 tensors we give our functions. Single process, no gradient accumulation (`Identity` accelerator).

Mapping (asserted below; TRL name → ours):
  GRPO advantages, scale_rewards group|none|batch → `grpo_advantages(R, G, scale, eps=1e-4)` / registry "grpo"
  loss_type grpo    → policy_loss(loss_agg="seq-mean-token-mean")
  loss_type dr_grpo → policy_loss(loss_agg="seq-mean-token-sum-norm", max_response_len=max_completion_length)
  loss_type dapo    → policy_loss(loss_agg="token-mean", clip_high=epsilon_high)  (num_items_in_batch = Σ mask)
  loss_type bnpo    → policy_loss(loss_agg="token-mean")
  beta > 0          → policy_loss(kl_coef=beta, ref_logprobs=…, kl_estimator="k3")  (KL as a loss term)
  RLOO advantages (k1 KL in the reward, leave-one-out) → registry "rloo" with kl = k1(old, ref), kl_coef = beta
  RLOO loss (sequence-level ratio of summed log-probs) → policy_loss on (B, 1) sequence log-probs, mask of ones
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close
from trl_source import Identity, trl_block, trl_without_vllm

from models.advantages import (
    AdvantageInputs,
    compute_advantages,
    grpo_advantages,
    kl_penalty,
    rloo_advantages,
    sequence_rewards,
)
from models.losses import policy_loss
from models.masked import masked_sum

trl = pytest.importorskip("trl")
with warnings.catch_warnings(), trl_without_vllm():
    warnings.simplefilter("ignore")
    from trl.trainer import grpo_trainer as trl_grpo
    from trl.trainer import rloo_trainer as trl_rloo

GRPO = trl_grpo.GRPOTrainer
RLOO = trl_rloo.RLOOTrainer
GRPO_ADVANTAGES = trl_block(
    GRPO._generate_and_score_completions,
    "unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)",
    "advantages = torch.nan_to_num(advantages, nan=0.0)",
)
GRPO_LOSS = trl_block(  # advantages → per-token loss (+ β·k3) → aggregation by loss_type → clip/KL metrics
    GRPO._compute_loss, 'advantages = inputs["advantages"]', 'if self.loss_type in ["grpo", "bnpo", "dr_grpo", "dapo"'
)
RLOO_ADVANTAGES = trl_block(
    RLOO._generate_and_score_completions,
    "unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)",
    "advantages = torch.nan_to_num(advantages, nan=0.0)",
)
RLOO_LOSS = trl_block(
    RLOO._compute_loss,
    "logps = (per_token_logps * completion_mask).sum(1)",
    'self._metrics[mode]["clip_ratio/region_mean"].append(',
)


def test_trl_version_is_the_pinned_peer():
    assert trl.__version__ == "1.12.0"


def run(code, module, **names):
    """Execute TRL statements with the trainer module's globals plus `names`; return the namespace."""
    ns = dict(vars(module))
    ns.update(gather=Identity().gather, **names)
    exec(code, ns)
    return ns


def stub(**attrs) -> SimpleNamespace:
    """A trainer `self` with only what the statements read (single process, train mode, no extras switched on)."""
    base = dict(
        accelerator=Identity(), model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        _metrics={"train": defaultdict(list)}, off_policy_mask_threshold=None, importance_sampling_level="token",
        use_vllm=False, _entropy_bonus_enabled=False, aux_loss_enabled=False, reward_clip_range=None,
        multi_objective_aggregation="sum_then_normalize", reward_weights=torch.ones(1, dtype=torch.float64),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
    )  # fmt: skip
    base.update(attrs)
    return SimpleNamespace(**base)


def random_batch(seed: int, prompts: int, group: int, t: int):
    """Right-padded (B, T) batch, B = prompts·group, ≥ 1 token per row; group 0 has equal rewards (std 0)."""
    gen = torch.Generator().manual_seed(seed)
    b = prompts * group
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    lengths[0] = t
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    scores = torch.randn(b, generator=gen, dtype=torch.float64)
    scores[:group] = 0.7
    logp = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3
    return SimpleNamespace(
        b=b, mask=mask, scores=scores,
        logp=logp,
        old=logp + 0.3 * torch.randn(b, t, generator=gen, dtype=torch.float64),
        ref=logp + 0.5 * torch.randn(b, t, generator=gen, dtype=torch.float64),
        entropies=torch.rand(b, t, generator=gen, dtype=torch.float64),
    )  # fmt: skip


@pytest.mark.parametrize("scale", ["group", "none", "batch"])
@pytest.mark.parametrize("seed,prompts,group", [(0, 3, 4), (1, 5, 2), (2, 2, 8)])
def test_grpo_advantages_match_trl_on_cpu(scale, seed, prompts, group):
    x = random_batch(seed, prompts, group, 6)
    ns = run(GRPO_ADVANTAGES, trl_grpo, self=stub(scale_rewards=scale), rewards_per_func=x.scores[:, None].clone(),
             num_generations=group, device="cpu")  # fmt: skip
    trl_adv = ns["advantages"]
    assert_close(grpo_advantages(x.scores, group, scale), trl_adv)
    out = compute_advantages("grpo", AdvantageInputs(x.scores, x.mask, torch.zeros(x.b, 6, dtype=torch.float64),
                                                     group_size=group, scale=scale))  # fmt: skip
    assert_close(out.advantages, torch.where(x.mask.bool(), trl_adv[:, None], 0.0))
    assert (trl_adv[:group] == 0).all()  # the all-equal group: 0, not NaN, on both sides


GRPO_CASES = {
    # loss_type: (scale_rewards, our loss_agg, epsilon_high)
    "grpo": ("group", "seq-mean-token-mean", 0.2),
    "dr_grpo": ("none", "seq-mean-token-sum-norm", 0.2),
    "dapo": ("group", "token-mean", 0.28),
    "bnpo": ("group", "token-mean", 0.2),
}


@pytest.mark.parametrize("loss_type", list(GRPO_CASES))
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_loss_and_gradient_match_trl_on_cpu(loss_type, beta, seed):
    scale, loss_agg, eps_high = GRPO_CASES[loss_type]
    group, t, max_len = 4, 7, 9  # max_completion_length > padded T: Dr. GRPO's normaliser is the constant
    x = random_batch(seed, 3, group, t)
    adv = grpo_advantages(x.scores, group, scale)
    logp_trl = x.logp.clone().requires_grad_(True)
    inputs = {"advantages": adv, "old_per_token_logps": x.old, "ref_per_token_logps": x.ref,
              "num_items_in_batch": x.mask.sum()}
    self = stub(loss_type=loss_type, beta=beta, epsilon_low=0.2, epsilon_high=eps_high, max_completion_length=max_len)
    ns = run(GRPO_LOSS, trl_grpo, self=self, inputs=inputs, per_token_logps=logp_trl, mask=x.mask,
             entropy_mask=None, entropies=x.entropies)  # fmt: skip
    (trl_grad,) = torch.autograd.grad(ns["loss"], logp_trl)

    logp = x.logp.clone().requires_grad_(True)
    loss, m = policy_loss(logp, x.old, adv[:, None], x.mask, 0.2, clip_high=eps_high, loss_agg=loss_agg,
                          max_response_len=max_len, kl_coef=beta, ref_logprobs=x.ref)  # fmt: skip
    (grad,) = torch.autograd.grad(loss, logp)
    assert_close(loss, ns["loss"])
    assert_close(grad, trl_grad)
    logged = self._metrics["train"]
    assert m["clipfrac_low"].item() == pytest.approx(logged["clip_ratio/low_mean"][0], abs=1e-12)
    assert m["clipfrac_high"].item() == pytest.approx(logged["clip_ratio/high_mean"][0], abs=1e-12)
    assert m["clipfrac"].item() == pytest.approx(logged["clip_ratio/region_mean"][0], abs=1e-12)
    assert logged["clip_ratio/region_mean"][0] > 0  # the clip is exercised, not vacuous
    if beta:
        assert m["kl"].item() == pytest.approx(logged["kl"][0], rel=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("seed,prompts,group", [(0, 3, 4), (1, 4, 2), (2, 2, 6)])
def test_rloo_advantages_match_trl_on_cpu(beta, seed, prompts, group):
    t = 8
    x = random_batch(seed, prompts, group, t)
    ns = run(RLOO_ADVANTAGES, trl_rloo, self=stub(beta=beta, normalize_advantages=False),
             rewards_per_func=x.scores[:, None].clone(), num_generations=group, device="cpu",
             old_per_token_logps=x.old, ref_per_token_logps=x.ref, completion_mask=x.mask)  # fmt: skip
    trl_adv = ns["advantages"]
    kl = torch.where(x.mask.bool(), kl_penalty(x.old, x.ref, "k1"), 0.0)  # RLOO's paper and TRL: k1, in the reward
    assert_close(rloo_advantages(sequence_rewards(x.scores, kl, x.mask, beta), group), trl_adv)
    out = compute_advantages("rloo", AdvantageInputs(x.scores, x.mask, kl, kl_coef=beta, group_size=group))
    assert_close(out.advantages, torch.where(x.mask.bool(), trl_adv[:, None], 0.0))


@pytest.mark.parametrize("eps_high", [0.2, 0.28])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rloo_sequence_level_loss_matches_trl_on_cpu(eps_high, seed):
    group, t = 4, 6
    x = random_batch(seed, 3, group, t)
    adv = rloo_advantages(x.scores, group)
    old = x.logp + 0.15 * torch.randn(x.b, t, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    old_logps = (old * x.mask).sum(1)
    logp_trl = x.logp.clone().requires_grad_(True)
    self = stub(epsilon_low=0.2, epsilon_high=eps_high)
    ns = run(RLOO_LOSS, trl_rloo, self=self, per_token_logps=logp_trl, completion_mask=x.mask,
             inputs={"old_logps": old_logps, "advantages": adv}, entropies=x.entropies)  # fmt: skip
    (trl_grad,) = torch.autograd.grad(ns["loss"], logp_trl)

    logp = x.logp.clone().requires_grad_(True)
    seq = masked_sum(logp, x.mask, dim=-1)[:, None]  # (B, 1) sequence log-probs: one ratio per response
    loss, m = policy_loss(seq, old_logps[:, None], adv[:, None], torch.ones(x.b, 1), 0.2, clip_high=eps_high)
    (grad,) = torch.autograd.grad(loss, logp)
    assert_close(loss, ns["loss"])
    assert_close(grad, trl_grad)
    logged = self._metrics["train"]
    assert m["clipfrac"].item() == pytest.approx(logged["clip_ratio/region_mean"][0], abs=1e-12)
    assert logged["clip_ratio/region_mean"][0] > 0
