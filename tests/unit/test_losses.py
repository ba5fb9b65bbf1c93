"""models/losses.py against naive loops and hand-worked cases (no Ray, CPU, ~1 s)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from models.losses import (
    entropy_from_logits,
    kwise_ranking_loss,
    lm_loss,
    pairwise_accuracy,
    policy_loss,
    value_loss,
)


def random_rankings(gen: torch.Generator, n: int, k: int) -> torch.Tensor:
    return torch.stack([torch.randperm(k, generator=gen) for _ in range(n)])


def naive_kwise(rewards: torch.Tensor, ranking: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per prompt: mean over the C(K,2) pairs (w ranked above l) of −log σ(r_w − r_l); then mean over prompts."""
    per_prompt, correct, total = [], 0, 0
    for n in range(rewards.shape[0]):
        order = ranking[n].tolist()  # order[j] = index of the j-th best response
        pair_losses = []
        for i, j in itertools.combinations(range(len(order)), 2):  # i < j → order[i] preferred over order[j]
            margin = rewards[n, order[i]] - rewards[n, order[j]]
            pair_losses.append(-torch.log(torch.sigmoid(margin)))
            correct += int(margin > 0)
            total += 1
        assert len(pair_losses) == math.comb(len(order), 2)
        per_prompt.append(torch.stack(pair_losses).mean())
    return torch.stack(per_prompt).mean(), correct / total


@pytest.mark.parametrize("k", range(2, 10))
def test_kwise_loss_equals_mean_of_pairwise_losses_on_cpu(k):
    gen = torch.Generator().manual_seed(k)
    rewards = torch.randn(5, k, generator=gen, dtype=torch.float64)
    ranking = random_rankings(gen, 5, k)
    loss, metrics = kwise_ranking_loss(rewards, ranking)
    loss_ref, acc_ref = naive_kwise(rewards, ranking)
    assert_close(loss, loss_ref)
    assert metrics["accuracy"].item() == pytest.approx(acc_ref)
    assert pairwise_accuracy(rewards, ranking).item() == pytest.approx(acc_ref)


@pytest.mark.parametrize("k", [2, 4, 9])
def test_kwise_loss_gradient_reaches_all_k_rewards_on_cpu(k):
    gen = torch.Generator().manual_seed(10 + k)
    rewards = torch.randn(3, k, generator=gen, dtype=torch.float64, requires_grad=True)
    ranking = random_rankings(gen, 3, k)
    loss, _ = kwise_ranking_loss(rewards, ranking)
    loss.backward()
    assert (rewards.grad != 0).all()
    # The best response is pushed up, the worst down.
    rows = torch.arange(3)
    assert (rewards.grad[rows, ranking[:, 0]] < 0).all() and (rewards.grad[rows, ranking[:, -1]] > 0).all()
    # Gradient matches the naive loss's gradient too.
    r2 = rewards.detach().clone().requires_grad_(True)
    naive_kwise(r2, ranking)[0].backward()
    assert_close(rewards.grad, r2.grad)


def test_kwise_k2_is_bradley_terry_on_cpu():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    ranking = random_rankings(gen, 7, 2)
    rows = torch.arange(7)
    r_w, r_l = rewards[rows, ranking[:, 0]], rewards[rows, ranking[:, 1]]
    loss, _ = kwise_ranking_loss(rewards, ranking)
    assert_close(loss, (-torch.log(torch.sigmoid(r_w - r_l))).mean())
    # Hand-worked: r_w − r_l = log 3 → σ = 3/4 → loss = −log(3/4) = log(4/3).
    loss, m = kwise_ranking_loss(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[1, 0]]))
    assert loss.item() == pytest.approx(math.log(4 / 3))
    assert m["accuracy"].item() == 1.0


def test_kwise_loss_invariant_to_response_order_on_cpu():
    """Shuffling the K responses together with the ranking indices changes nothing."""
    gen = torch.Generator().manual_seed(1)
    rewards = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    ranking = random_rankings(gen, 4, 6)
    perm = torch.randperm(6, generator=gen)  # new position p holds old response perm[p]
    inverse = torch.argsort(perm)
    loss_a, _ = kwise_ranking_loss(rewards, ranking)
    loss_b, _ = kwise_ranking_loss(rewards[:, perm], inverse[ranking])
    assert_close(loss_a, loss_b)


@pytest.mark.parametrize(
    "ranking,match",
    [
        (torch.tensor([[0, 1, 2], [0, 0, 2]]), "row 1 is not a permutation"),  # duplicate
        (torch.tensor([[2, 1, 0], [0, 1, 2], [0, 1, 3]]), "row 2 is not a permutation"),  # out of range
        (torch.tensor([[-1, 1, 2]]), "row 0 is not a permutation"),  # negative
        (torch.tensor([[0], [0]]), "K=1"),  # K < 2
        (torch.tensor([[0.0, 1.0, 2.0]]), "integer"),
    ],
)
def test_kwise_invalid_rankings_raise_on_cpu(ranking, match):
    with pytest.raises(ValueError, match=match):
        kwise_ranking_loss(torch.zeros(ranking.shape), ranking)


def test_kwise_shape_mismatch_raises_on_cpu():
    with pytest.raises(ValueError, match="shapes"):
        kwise_ranking_loss(torch.zeros(2, 3), torch.tensor([[0, 1], [1, 0]]))


def test_policy_loss_hand_worked_on_cpu():
    eps = 0.2
    old = torch.zeros(1, 5)
    # ratios 1.5, 0.5, 0.5, 1.1, 3.0 (the last token is padding)
    new = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.1, 3.0]])).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -2.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, m = policy_loss(new, old, adv, mask, eps)
    # token 0: A=+1, ρ=1.5: −1.5 vs −clip(1.5)=−1.2 → max −1.2 (clipped)
    # token 1: A=+1, ρ=0.5: −0.5 vs −0.8 → max −0.5 (unclipped)
    # token 2: A=−2, ρ=0.5: 1.0 vs 2·0.8=1.6 → max 1.6 (clipped: pessimistic bound)
    # token 3: A=−1, ρ=1.1: 1.1 vs 1.1 → 1.1 (inside the trust region: not clipped)
    # mean over the 4 valid tokens: (−1.2 − 0.5 + 1.6 + 1.1) / 4 = 1.0 / 4 = 0.25
    assert loss.item() == pytest.approx(0.25)
    assert m["clipfrac"].item() == pytest.approx(0.5)
    logs = [math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.1)]
    assert m["approx_kl"].item() == pytest.approx(0.5 * sum(x * x for x in logs) / 4)
    loss.backward()
    # d/dlogπ of −A·ρ is −A·ρ on unclipped tokens; clipped tokens and padding get 0; ÷ 4 valid tokens.
    # token 1: −1·0.5/4 = −0.125; token 3: +1·1.1/4 = 0.275
    assert_close(new.grad, torch.tensor([[0.0, -0.125, 0.0, 0.275, 0.0]]))


def test_policy_loss_on_policy_is_minus_mean_advantage_on_cpu():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(4, 6, generator=gen)
    adv = torch.randn(4, 6, generator=gen)
    mask = torch.ones(4, 6)
    loss, m = policy_loss(logp, logp, adv, mask, 0.2)  # ρ = 1 everywhere
    assert_close(loss, -adv.mean())
    assert m["clipfrac"].item() == 0.0 and m["approx_kl"].item() == 0.0


def test_value_loss_hand_worked_on_cpu():
    eps = 0.2
    values = torch.tensor([[1.0, 1.0, -1.0, 5.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.9, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, -0.5, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, m = value_loss(values, old, returns, mask, eps)
    # token 0: clip(1.0, 0.3, 0.7) = 0.7; (1−2)² = 1.00 vs (0.7−2)² = 1.69 → 1.69 (clipped)
    # token 1: clip(1.0, 0.7, 1.1) = 1.0; (1−0)² = 1.00 vs 1.00 → 1.00 (equal: not counted as clipped)
    # token 2: clip(−1.0, −0.2, 0.2) = −0.2; (−1+0.5)² = 0.25 vs (−0.2+0.5)² = 0.09 → 0.25 (unclipped)
    # loss = ½ · (1.69 + 1.00 + 0.25) / 3 = ½ · 0.98 = 0.49
    assert loss.item() == pytest.approx(0.49)
    assert m["vf_clipfrac"].item() == pytest.approx(1 / 3)
    assert m["value_error"].item() == pytest.approx((1.0 + 1.0 + 0.25) / 3)
    loss.backward()
    # token 0's active term is clipped (constant in v) → 0; token 1: ½·2·(1−0)/3 = 1/3; token 2: ½·2·(−0.5)/3
    assert_close(values.grad, torch.tensor([[0.0, 1 / 3, -0.5 / 3, 0.0]]))


def naive_lm_loss(logits, targets, mask):
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if mask[b, t]:
                total += -torch.log_softmax(logits[b, t].double(), dim=-1)[targets[b, t]].item()
                count += 1
    return total / count


def test_lm_loss_matches_naive_loop_on_cpu():
    gen = torch.Generator().manual_seed(0)
    b, t, v = 3, 7, 11
    logits = torch.randn(b, t, v, generator=gen)
    targets = torch.randint(0, v, (b, t), generator=gen)
    mask = torch.rand(b, t, generator=gen) > 0.4
    assert lm_loss(logits, targets, mask).item() == pytest.approx(naive_lm_loss(logits, targets, mask), rel=1e-5)
    assert_close(lm_loss(logits, targets), F.cross_entropy(logits.reshape(-1, v), targets.reshape(-1)))


def test_lm_loss_ignores_targets_at_masked_positions_on_cpu():
    """SFT prompt masking: changing the prompt-token targets (or padding them with −100) changes nothing."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 8, 13, generator=gen, requires_grad=True)
    targets = torch.randint(0, 13, (2, 8), generator=gen)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, 3:] = True  # positions 0..2 are the prompt
    changed = targets.clone()
    changed[:, :3] = torch.randint(0, 13, (2, 3), generator=gen)
    padded = targets.clone()
    padded[:, :3] = -100
    base = lm_loss(logits, targets, mask)
    assert_close(lm_loss(logits, changed, mask), base)
    assert_close(lm_loss(logits, padded, mask), base)
    base.backward()
    assert (logits.grad[:, :3] == 0).all() and (logits.grad[:, 3:] != 0).any()
    # ...while changing a response-token target does change it.
    changed[0, 5] = (targets[0, 5] + 1) % 13
    assert lm_loss(logits, changed, mask).item() != pytest.approx(base.item())


def test_lm_loss_rejects_misaligned_shapes_on_cpu():
    with pytest.raises(ValueError, match="shapes"):
        lm_loss(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))


def test_entropy_from_logits_on_cpu():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 9, generator=gen, dtype=torch.float64)
    p = logits.softmax(-1)
    assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))
    assert_close(entropy_from_logits(torch.zeros(2, 5)), torch.full((2,), math.log(5)))  # uniform → log V
    peaked = torch.tensor([[0.0, -1e4, -1e4]])
    assert_close(entropy_from_logits(peaked), torch.zeros(1))  # no NaN from 0·log 0
