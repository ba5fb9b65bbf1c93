"""models/advantages.py against naive loops, closed forms and properties (no Ray, CPU, ~1 s)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.testing import assert_close

from models.advantages import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
    per_token_rewards,
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
