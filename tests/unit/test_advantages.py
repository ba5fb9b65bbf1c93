"""models/advantages.py against naive loops, closed forms and properties (no Ray, CPU, ~2 s)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from models.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdaptiveKLController,
    AdvantageInputs,
    FixedKLController,
    compute_advantages,
    discounted_returns,
    gae,
    get_estimator,
    grpo_advantages,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
    per_token_rewards,
    reinforce_pp_advantages,
    rloo_advantages,
    sequence_rewards,
    whiten,
)
from models.masked import masked_mean, masked_var


def right_padded_mask(gen: torch.Generator, b: int, t: int) -> torch.Tensor:
    """(B, T) bool: each row valid on a random-length prefix of 1..T tokens (right-padded responses)."""
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    return torch.arange(t)[None, :] < lengths[:, None]


def naive_gae(rewards, values, mask, gamma, lam):
    """Textbook GAE, one row and one step at a time, on each row's valid prefix (right-padded mask)."""
    b, t = rewards.shape
    adv = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        length = int(mask[i].sum())
        last = 0.0
        for s in reversed(range(length)):
            next_value = float(values[i, s + 1]) if s + 1 < length else 0.0  # episode ends after the last token
            delta = float(rewards[i, s]) + gamma * next_value - float(values[i, s])
            last = delta + gamma * lam * last
            adv[i, s] = last
    ret = torch.where(mask, adv + values.double(), torch.zeros((), dtype=torch.float64))
    return adv, ret


@pytest.mark.parametrize("seed,gamma,lam", list(itertools.product([0, 1, 2], [1.0, 0.99, 0.9], [1.0, 0.95, 0.5])))
def test_gae_matches_naive_loop_on_cpu(seed, gamma, lam):
    gen = torch.Generator().manual_seed(seed)
    b, t = 6, 11
    mask = right_padded_mask(gen, b, t)
    rewards = torch.randn(b, t, generator=gen, dtype=torch.float64)
    values = torch.randn(b, t, generator=gen, dtype=torch.float64)
    # Garbage at padded positions must not matter.
    rewards_dirty = torch.where(mask, rewards, torch.full_like(rewards, 1e6))
    values_dirty = torch.where(mask, values, torch.full_like(values, -1e6))
    adv, ret = gae(rewards_dirty, values_dirty, mask, gamma, lam)
    adv_ref, ret_ref = naive_gae(rewards, values, mask, gamma, lam)
    assert_close(adv, adv_ref)
    assert_close(ret, ret_ref)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value_on_cpu():
    gen = torch.Generator().manual_seed(3)
    b, t = 5, 9
    mask = right_padded_mask(gen, b, t)
    rewards = torch.randn(b, t, generator=gen, dtype=torch.float64) * mask
    values = torch.randn(b, t, generator=gen, dtype=torch.float64) * mask
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    reward_to_go = rewards.flip(1).cumsum(1).flip(1)  # Σ_{s≥t} r_s (padded rewards are 0)
    assert_close(adv, (reward_to_go - values) * mask)
    assert_close(ret, reward_to_go * mask)


def test_gae_lambda_zero_is_one_step_td_on_cpu():
    gen = torch.Generator().manual_seed(4)
    rewards = torch.randn(3, 6, generator=gen)
    values = torch.randn(3, 6, generator=gen)
    mask = torch.ones(3, 6, dtype=torch.bool)
    adv, _ = gae(rewards, values, mask, 0.9, 0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(3, 1)], dim=1)
    assert_close(adv, rewards + 0.9 * next_values - values)


def test_gae_steps_over_interior_masked_positions_on_cpu():
    """A hole in the mask behaves as if the masked token were not there (compress → GAE → scatter back)."""
    gen = torch.Generator().manual_seed(5)
    rewards = torch.randn(1, 8, generator=gen, dtype=torch.float64)
    values = torch.randn(1, 8, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, 0.97, 0.9)
    idx = mask[0].nonzero().flatten()
    dense_mask = torch.ones(1, idx.numel(), dtype=torch.bool)
    adv_ref, ret_ref = naive_gae(rewards[:, idx], values[:, idx], dense_mask, 0.97, 0.9)
    assert_close(adv[:, idx], adv_ref)
    assert_close(ret[:, idx], ret_ref)
    assert (adv[~mask] == 0).all()


def test_gae_rejects_mismatched_shapes_on_cpu():
    with pytest.raises(ValueError, match="shapes"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 1.0, 1.0)


def test_kl_estimators_on_cpu():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(64, 33, generator=gen) * 3
    logp_ref = torch.randn(64, 33, generator=gen) * 3
    assert (kl_k3(logp, logp_ref) >= 0).all()
    assert (kl_k2(logp, logp_ref) >= 0).all()
    assert (kl_k1(logp, logp_ref) < 0).any()  # k1 is unbiased but not pointwise non-negative
    for fn in (kl_k1, kl_k2, kl_k3):
        assert_close(fn(logp, logp), torch.zeros_like(logp))
    for kind, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        assert_close(kl_penalty(logp, logp_ref, kind), fn(logp, logp_ref))
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(logp, logp_ref, "k4")


def test_kl_estimators_unbiased_for_categorical_on_cpu():
    """k1 and k3 are unbiased for KL(π‖π_ref) (expectation under π): check exactly by summing over a vocabulary."""
    gen = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(50, generator=gen, dtype=torch.float64), 0)
    logp_ref = torch.log_softmax(torch.randn(50, generator=gen, dtype=torch.float64), 0)
    true_kl = (logp.exp() * (logp - logp_ref)).sum()
    assert_close((logp.exp() * kl_k1(logp, logp_ref)).sum(), true_kl)
    assert_close((logp.exp() * kl_k3(logp, logp_ref)).sum(), true_kl)


def test_whiten_masked_mean_zero_var_one_on_cpu():
    gen = torch.Generator().manual_seed(2)
    mask = right_padded_mask(gen, 8, 12)
    x = torch.randn(8, 12, generator=gen, dtype=torch.float64) * 5 + 3
    x = torch.where(mask, x, torch.full_like(x, 1e9))  # padding garbage must not move the statistics
    w = whiten(x, mask)
    assert_close(masked_mean(w, mask), torch.tensor(0.0, dtype=torch.float64), atol=1e-9, rtol=0)
    assert_close(masked_var(w, mask), torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (w[~mask] == 0).all()
    # shift_mean=False keeps the mean, only rescales.
    w2 = whiten(x, mask, shift_mean=False)
    assert_close(masked_mean(w2, mask), masked_mean(x, mask))
    # masked stats equal naive stats of the selected entries
    assert_close(masked_mean(x, mask), x[mask].mean())
    assert_close(masked_var(x, mask), x[mask].var())
    assert_close(masked_var(x, mask, unbiased=False), x[mask].var(unbiased=False))


def test_masked_mean_dim_and_empty_on_cpu():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 0.0]))  # empty row → 0, not NaN
    assert_close(masked_mean(x, torch.zeros_like(mask)), torch.tensor(0.0))


def test_per_token_rewards_score_on_last_valid_token_only_on_cpu():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, -0.5, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    score = torch.tensor([2.0, -3.0, 7.0])
    r = per_token_rewards(score, kl, mask, beta=0.1)
    expected = torch.tensor(
        [
            [-0.01, -0.02, -0.03, -0.04 + 2.0],  # full row: score on position 3
            [-0.05, 0.05 - 3.0, 0.0, 0.0],  # length 2: score on position 1; padded KL ignored
            [0.0, 0.0, 0.0, 0.0],  # empty row: nothing (score dropped)
        ]
    )
    assert_close(r, expected)
    # Random right-padded batch: Σ_t r_t = score − β Σ_valid KL, and the score sits exactly at length−1.
    gen = torch.Generator().manual_seed(7)
    mask = right_padded_mask(gen, 10, 7)
    kl = torch.rand(10, 7, generator=gen, dtype=torch.float64)
    score = torch.randn(10, generator=gen, dtype=torch.float64)
    r = per_token_rewards(score, kl, mask, beta=0.05)
    assert_close(r.sum(1), score - 0.05 * (kl * mask).sum(1))
    lengths = mask.sum(1)
    rows = torch.arange(10)
    assert_close(r[rows, lengths - 1], score - 0.05 * kl[rows, lengths - 1])


def test_adaptive_kl_controller_direction_on_cpu():
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10_000)
    assert ctl.update(current_kl=12.0, n_steps=256) > 0.1  # KL too high → stronger penalty
    # error clipped at +0.2: β = 0.1 · (1 + 0.2 · 256 / 10000)
    assert ctl.beta == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10_000)
    assert ctl.update(current_kl=3.0, n_steps=256) < 0.1  # KL too low → weaker penalty
    assert ctl.beta == pytest.approx(0.1 * (1 - 0.2 * 256 / 10_000))  # e = 3/6 − 1 = −0.5 → clipped to −0.2
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10_000)
    assert ctl.update(current_kl=6.6, n_steps=100) == pytest.approx(0.1 * (1 + 0.1 * 100 / 10_000))  # unclipped
    assert AdaptiveKLController(0.1, 6.0, 10_000).update(6.0, 100) == pytest.approx(0.1)  # on target: no change
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 1000) == 0.05 and fixed.update(0.0, 1000) == 0.05
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, 0.0, 10_000)


def test_kl_controller_state_dict_round_trip_on_cpu():
    a = AdaptiveKLController(0.2, 6.0, 10_000)
    for kl in (1.0, 9.0, 7.3, 2.2):
        a.update(kl, 64)
    b = AdaptiveKLController(1.0, 1.0, 1.0)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    assert b.update(8.0, 64) == a.update(8.0, 64)  # exact: same float ops from the same state
    f = FixedKLController(0.3)
    g = FixedKLController(0.0)
    g.load_state_dict(f.state_dict())
    assert g.beta == 0.3
    with pytest.raises(ValueError, match="kind"):
        g.load_state_dict(a.state_dict())


# --- critic-free estimators: GRPO, RLOO, REINFORCE++ and the registry --------------------------------------------


def naive_grpo(rewards: list[float], group: int, scale: str, eps: float) -> list[float]:
    """Shao et al. 2024 §4.1.2, one group at a time, with Python floats (unbiased std as TRL)."""

    def std(xs: list[float]) -> float:
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    out = []
    for g in range(len(rewards) // group):
        rs = rewards[g * group : (g + 1) * group]
        mean = sum(rs) / group
        denom = {"group": std(rs) + eps, "batch": std(rewards) + eps, "none": 1.0}[scale]
        out += [(r - mean) / denom for r in rs]
    return out


def naive_rloo(rewards: list[float], group: int) -> list[float]:
    """Ahmadian et al. 2024 eq. 6: r_i minus the mean of the OTHER responses of its group."""
    out = []
    for i, r in enumerate(rewards):
        g = i // group
        others = [rewards[j] for j in range(g * group, (g + 1) * group) if j != i]
        out.append(r - sum(others) / len(others))
    return out


def random_group_batch(seed: int, prompts: int, group: int, t: int):
    gen = torch.Generator().manual_seed(seed)
    b = prompts * group
    mask = right_padded_mask(gen, b, t)
    scores = torch.randn(b, generator=gen, dtype=torch.float64) * 2
    kl = torch.where(mask, torch.rand(b, t, generator=gen, dtype=torch.float64), 0.0)
    return mask, scores, kl


@pytest.mark.parametrize("scale", ["group", "none", "batch"])
@pytest.mark.parametrize("seed,prompts,group", [(0, 4, 2), (1, 3, 4), (2, 2, 7), (3, 1, 16)])
def test_grpo_advantages_match_naive_loop_on_cpu(scale, seed, prompts, group):
    _, scores, _ = random_group_batch(seed, prompts, group, 3)
    expected = torch.tensor(naive_grpo(scores.tolist(), group, scale, 1e-4), dtype=torch.float64)
    assert_close(grpo_advantages(scores, group, scale), expected)


@pytest.mark.parametrize("seed,prompts,group", [(0, 4, 2), (1, 3, 4), (2, 2, 7)])
def test_grpo_advantages_properties_on_cpu(seed, prompts, group):
    _, scores, _ = random_group_batch(seed, prompts, group, 3)
    for scale in ("group", "none", "batch"):
        adv = grpo_advantages(scores, group, scale).view(prompts, group)
        assert_close(adv.sum(1), torch.zeros(prompts, dtype=torch.float64), atol=1e-12, rtol=0)  # zero mean/group
    adv = grpo_advantages(scores, group, "group", eps=0.0).view(prompts, group)
    assert_close(adv.std(1), torch.ones(prompts, dtype=torch.float64))  # unit std per group (GRPO)
    # A per-prompt offset (prompt difficulty) cancels; "none" (Dr. GRPO) keeps the reward scale, "group" does not.
    shifted = scores + torch.arange(prompts, dtype=torch.float64).repeat_interleave(group) * 10
    assert_close(grpo_advantages(shifted, group, "none"), grpo_advantages(scores, group, "none"))
    assert_close(grpo_advantages(3 * scores, group, "none"), 3 * grpo_advantages(scores, group, "none"))
    assert_close(grpo_advantages(3 * scores, group, "group", eps=0.0), grpo_advantages(scores, group, "group", 0.0))
    # An all-equal group has nothing to learn from: Â = 0, not NaN.
    assert (grpo_advantages(torch.full((group,), 0.3, dtype=torch.float64), group) == 0).all()


@pytest.mark.parametrize("seed,prompts,group", [(0, 4, 2), (1, 3, 4), (2, 2, 7), (3, 1, 16)])
def test_rloo_advantages_match_naive_loop_on_cpu(seed, prompts, group):
    _, scores, _ = random_group_batch(seed, prompts, group, 3)
    expected = torch.tensor(naive_rloo(scores.tolist(), group), dtype=torch.float64)
    assert_close(rloo_advantages(scores, group), expected)


def test_rloo_baseline_excludes_self_on_cpu():
    """Moving r_i by δ moves Â_i by exactly δ (its baseline does not see r_i), each sibling's by −δ/(G−1), and
    leaves other prompts alone; per group Σ Â = 0 and Â = G/(G−1)·(r − mean)."""
    prompts, group, delta = 3, 5, 0.7
    _, scores, _ = random_group_batch(4, prompts, group, 3)
    base = rloo_advantages(scores, group)
    bumped = scores.clone()
    bumped[6] += delta  # prompt 1, response 1
    change = rloo_advantages(bumped, group) - base
    expected = torch.zeros_like(change)
    expected[5:10] = -delta / (group - 1)
    expected[6] = delta
    assert_close(change, expected)
    grouped = scores.view(prompts, group)
    assert_close(base.view(prompts, group).sum(1), torch.zeros(prompts, dtype=torch.float64), atol=1e-12, rtol=0)
    assert_close(base.view(prompts, group), group / (group - 1) * (grouped - grouped.mean(1, keepdim=True)))


def naive_reinforce_pp(scores, kl, mask, beta, gamma):
    """Hu 2025 §3, one row and one token at a time: r_t = −β·kl_t (+ score at the end), G_t = r_t + γ·G_{t+1},
    then (G − mean) / sqrt(var + 1e-8) over every valid token of the batch (unbiased var, as `whiten`)."""
    b, t = mask.shape
    returns = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        length = int(mask[i].sum())
        running = 0.0
        for s in reversed(range(length)):
            r = -beta * float(kl[i, s]) + (float(scores[i]) if s == length - 1 else 0.0)
            running = r + gamma * running
            returns[i, s] = running
    valid = [float(returns[i, s]) for i in range(b) for s in range(t) if mask[i, s]]
    mean = sum(valid) / len(valid)
    var = sum((v - mean) ** 2 for v in valid) / (len(valid) - 1)
    adv = torch.where(mask, (returns - mean) / math.sqrt(var + 1e-8), 0.0)
    return adv, returns


@pytest.mark.parametrize("seed,gamma,beta", [(0, 1.0, 0.05), (1, 0.99, 0.1), (2, 0.9, 0.0), (3, 1.0, 0.5)])
def test_reinforce_pp_matches_naive_loop_on_cpu(seed, gamma, beta):
    mask, scores, kl = random_group_batch(seed, 5, 2, 9)
    adv, returns, rewards = reinforce_pp_advantages(scores, kl, mask, beta, gamma)
    adv_ref, ret_ref = naive_reinforce_pp(scores, kl, mask, beta, gamma)
    assert_close(returns, ret_ref)
    assert_close(adv, adv_ref)
    assert_close(rewards, per_token_rewards(scores, kl, mask, beta))


def test_reinforce_pp_properties_on_cpu():
    mask, scores, kl = random_group_batch(5, 4, 3, 8)
    adv, returns, rewards = reinforce_pp_advantages(scores, kl, mask, 0.1, gamma=1.0)
    # γ = 1: the return before normalisation is the reward-to-go; at t = 0 it is the KL-shaped sequence reward.
    assert_close(returns, torch.where(mask, rewards.flip(1).cumsum(1).flip(1), 0.0))
    assert_close(returns[:, 0], sequence_rewards(scores, kl, mask, 0.1))
    # Global-batch normalisation: zero mean, unit variance over the valid tokens of the whole batch.
    assert_close(masked_mean(adv, mask), torch.tensor(0.0, dtype=torch.float64), atol=1e-12, rtol=0)
    assert_close(masked_var(adv, mask), torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (adv[~mask] == 0).all()
    assert_close(discounted_returns(rewards, mask, 1.0), returns)


@pytest.mark.parametrize("fn", [grpo_advantages, rloo_advantages])
def test_group_estimators_reject_bad_groups_on_cpu(fn):
    scores = torch.zeros(6)
    for bad in (1, 0, -2, 2.0, True):
        with pytest.raises(ValueError, match="group_size"):
            fn(scores, bad)
    with pytest.raises(ValueError, match="group_size: a batch of 6"):
        fn(scores, 4)
    with pytest.raises(ValueError, match="rewards"):
        fn(torch.zeros(6, 2), 2)


def test_registry_names_flags_and_errors_on_cpu():
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "rloo", "reinforce_pp"}
    assert [n for n, e in ADVANTAGE_ESTIMATORS.items() if e.needs_critic] == ["gae"]
    assert {n for n, e in ADVANTAGE_ESTIMATORS.items() if e.grouped} == {"grpo", "rloo"}
    with pytest.raises(ValueError, match="estimator: unknown"):
        get_estimator("ppo")
    for name in ("grpo", "rloo"):
        with pytest.raises(ValueError, match="group_size"):
            get_estimator(name, group_size=1)
    assert get_estimator("reinforce_pp", group_size=1).grouped is False
    mask, scores, kl = random_group_batch(0, 3, 4, 5)
    with pytest.raises(ValueError, match="group_size: a batch of 12"):
        compute_advantages("grpo", AdvantageInputs(scores, mask, kl, group_size=5))
    with pytest.raises(ValueError, match="values"):
        compute_advantages("gae", AdvantageInputs(scores, mask, kl))
    with pytest.raises(ValueError, match="shapes"):
        compute_advantages("rloo", AdvantageInputs(scores[:-1], mask, kl, group_size=4))
    with pytest.raises(ValueError, match="kl: kl_coef"):
        compute_advantages("reinforce_pp", AdvantageInputs(scores, mask, kl_coef=0.1))
    # No KL in the reward (GRPO with KL as a loss term): kl=None is the same as zeros.
    no_kl = compute_advantages("grpo", AdvantageInputs(scores, mask, group_size=4))
    zero_kl = compute_advantages("grpo", AdvantageInputs(scores, mask, torch.zeros_like(kl), group_size=4))
    assert torch.equal(no_kl.advantages, zero_kl.advantages)


@pytest.mark.parametrize("whiten_advantages", [True, False])
def test_registry_gae_is_todays_ppo_composition_on_cpu(whiten_advantages):
    """"gae" = per_token_rewards → gae → whiten, exactly what actors/rollout.py `finalize` composes today."""
    mask, scores, kl = random_group_batch(1, 4, 2, 7)
    values = torch.randn(8, 7, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    out = compute_advantages("gae", AdvantageInputs(scores, mask, kl, kl_coef=0.05, values=values, gamma=0.99,
                                                    lam=0.95, whiten_advantages=whiten_advantages))  # fmt: skip
    rewards = per_token_rewards(scores, kl, mask, 0.05)
    adv, ret = gae(rewards, values, mask, 0.99, 0.95)
    assert torch.equal(out.rewards, rewards) and torch.equal(out.returns, ret)
    assert torch.equal(out.advantages, whiten(adv, mask) if whiten_advantages else adv)


@pytest.mark.parametrize("name,fn", [("grpo", grpo_advantages), ("rloo", rloo_advantages)])
def test_registry_group_estimators_broadcast_the_sequence_advantage_on_cpu(name, fn):
    """Every valid token of response i carries Â_i of the KL-shaped sequence reward R_i = score_i − β·Σ_t kl_it."""
    mask, scores, kl = random_group_batch(2, 3, 4, 6)
    out = compute_advantages(name, AdvantageInputs(scores, mask, kl, kl_coef=0.2, group_size=4))
    per_response = fn(sequence_rewards(scores, kl, mask, 0.2), 4)
    assert_close(out.advantages, torch.where(mask, per_response[:, None], 0.0))
    assert out.returns is None
    assert_close(out.rewards.sum(1), scores - 0.2 * kl.sum(1))


def test_registry_reinforce_pp_on_cpu():
    mask, scores, kl = random_group_batch(3, 4, 2, 6)
    out = compute_advantages("reinforce_pp", AdvantageInputs(scores, mask, kl, kl_coef=0.1, gamma=0.95))
    adv, ret, rew = reinforce_pp_advantages(scores, kl, mask, 0.1, 0.95)
    assert torch.equal(out.advantages, adv) and torch.equal(out.returns, ret) and torch.equal(out.rewards, rew)
