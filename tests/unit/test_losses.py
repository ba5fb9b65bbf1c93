"""models/losses.py against naive loops and hand-worked cases (no Ray, CPU, ~1 s)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from models.losses import (
    aggregate_loss,
    entropy_from_logits,
    kwise_ranking_loss,
    lm_loss,
    pairwise_accuracy,
    policy_loss,
    ranked_pairs,
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


# --- policy-loss variants: aggregation, DAPO clip-higher, KL loss term ------------------------------------------


def naive_policy_loss(logp, old, adv, mask, clip_low, clip_high, loss_agg, max_len, kl_coef, ref):
    """Token by token with Python floats: ℓ = max(−Aρ, −A·clip(ρ, 1−ε_l, 1+ε_h)) + β·k3, then the aggregation."""
    b, t = mask.shape
    rows = []
    for i in range(b):
        row = []
        for s in range(t):
            if mask[i, s]:
                rho = math.exp(float(logp[i, s]) - float(old[i, s]))
                a = float(adv[i, s])
                loss = max(-a * rho, -a * min(max(rho, 1 - clip_low), 1 + clip_high))
                log_r = float(ref[i, s]) - float(logp[i, s])
                row.append(loss + kl_coef * (math.exp(log_r) - log_r - 1))
        rows.append(row)
    if loss_agg == "token-mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if loss_agg == "seq-mean-token-mean":
        return sum(sum(r) / len(r) if r else 0.0 for r in rows) / b
    return sum(sum(r) for r in rows) / (b * max_len)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("seed,b,t,clip_low,clip_high,kl_coef", [
    (0, 4, 7, 0.2, 0.2, 0.0), (1, 6, 5, 0.2, 0.28, 0.0), (2, 3, 11, 0.1, 0.3, 0.04), (3, 8, 4, 0.2, 0.28, 0.5),
])  # fmt: skip
def test_policy_loss_variants_match_naive_loop_on_cpu(loss_agg, seed, b, t, clip_low, clip_high, kl_coef):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, t + 1, (b,), generator=gen)  # includes empty rows
    lengths[0] = t
    mask = torch.arange(t)[None, :] < lengths[:, None]
    logp = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 2
    old = logp + 0.3 * torch.randn(b, t, generator=gen, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(b, t, generator=gen, dtype=torch.float64)
    adv = torch.randn(b, t, generator=gen, dtype=torch.float64)
    max_len = t + 2
    loss, m = policy_loss(logp, old, adv, mask, 0.2, clip_low=clip_low, clip_high=clip_high, loss_agg=loss_agg,
                          max_response_len=max_len, kl_coef=kl_coef, ref_logprobs=ref)  # fmt: skip
    expected = naive_policy_loss(logp, old, adv, mask, clip_low, clip_high, loss_agg, max_len, kl_coef, ref)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    ratio = (logp - old).exp()
    low = ((ratio < 1 - clip_low) & (adv < 0))[mask].double().mean()
    high = ((ratio > 1 + clip_high) & (adv > 0))[mask].double().mean()
    assert m["clipfrac_low"].item() == pytest.approx(low.item()) and m["clipfrac_high"].item() == pytest.approx(
        high.item()
    )
    assert m["clipfrac"].item() == pytest.approx((low + high).item())  # A ≠ 0: clipped ⇔ low or high
    assert ("kl" in m) == (kl_coef != 0)


def test_policy_loss_defaults_are_ppo_on_cpu():
    """Explicit PPO settings give the same numbers (bit for bit) as the call sites' 5-argument form."""
    gen = torch.Generator().manual_seed(5)
    logp, old, adv = (torch.randn(4, 6, generator=gen) for _ in range(3))
    mask = torch.rand(4, 6, generator=gen) > 0.3
    base, m0 = policy_loss(logp, old, adv, mask, 0.2)
    explicit, m1 = policy_loss(logp, old, adv, mask, 0.2, clip_low=0.2, clip_high=0.2, loss_agg="token-mean",
                               kl_coef=0.0, ref_logprobs=torch.zeros(4, 6))  # fmt: skip
    assert torch.equal(base, explicit) and all(torch.equal(m0[k], m1[k]) for k in m0)
    assert "kl" not in m0


def test_dapo_clip_higher_hand_worked_on_cpu():
    """DAPO §3.1: a low-probability token with A > 0 may grow to ρ = 1 + ε_high, further than 1 + ε_low."""
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.25, 0.75]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    # symmetric ε = 0.2: token 0 clipped at 1.2 (−1.2); token 1: A<0, ρ=0.75 < 0.8 → clipped at 0.8 (+0.8)
    loss, m = policy_loss(new, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2) and m["clipfrac"].item() == 1.0
    # clip_high = 0.28: token 0 is inside [0.8, 1.28] → −1.25, and its gradient flows: d(−ρ)/dlogπ / 2 = −0.625
    loss, m = policy_loss(new, old, adv, mask, 0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((-1.25 + 0.8) / 2)
    assert m["clipfrac_high"].item() == 0.0 and m["clipfrac_low"].item() == 0.5
    loss.backward()
    assert_close(new.grad, torch.tensor([[-0.625, 0.0]]))


def test_aggregate_loss_hand_worked_on_cpu():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # row 2 is empty
    assert aggregate_loss(per_token, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(per_token, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4 + 0) / 3)
    assert aggregate_loss(per_token, mask, "seq-mean-token-sum-norm", 5).item() == pytest.approx(10 / (3 * 5))


def test_policy_loss_bad_settings_raise_on_cpu():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="loss_agg"):
        policy_loss(x, x, x, x, 0.2, loss_agg="sum")
    with pytest.raises(ValueError, match="max_response_len"):
        policy_loss(x, x, x, x, 0.2, loss_agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="max_response_len: 2 is shorter"):
        policy_loss(x, x, x, x, 0.2, loss_agg="seq-mean-token-sum-norm", max_response_len=2)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(x, x, x, x, 0.2, kl_coef=0.1)
    with pytest.raises(ValueError, match="clip_high"):
        policy_loss(x, x, x, x, 0.2, clip_high=-0.1)


def test_kl_loss_term_gradient_on_cpu():
    """The k3 term's gradient w.r.t. logπ is β·(1 − π_ref/π) per token (÷ token count): 0 at π = π_ref, pulling
    logπ down where π > π_ref and up where π < π_ref."""
    gen = torch.Generator().manual_seed(6)
    logp = torch.randn(3, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    ref = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    mask = torch.ones(3, 4)
    zero_adv = torch.zeros(3, 4, dtype=torch.float64)
    loss, m = policy_loss(logp, logp.detach(), zero_adv, mask, 0.2, kl_coef=0.1, ref_logprobs=ref)
    loss.backward()
    assert_close(logp.grad, 0.1 * (1 - torch.exp(ref - logp.detach())) / 12)
    lp = logp.detach()
    assert m["kl"].item() == pytest.approx(float((torch.exp(ref - lp) - (ref - lp) - 1).mean()))
    on_ref, _ = policy_loss(ref, ref, zero_adv, mask, 0.2, kl_coef=0.1, ref_logprobs=ref)
    assert on_ref.item() == 0.0


def test_sequence_level_ratio_on_policy_is_reinforce_on_cpu():
    """(B, 1) sequence log-probs + mask of ones (TRL's RLOO form): on-policy the gradient is −A_b/B · ∇Σ_t logπ,
    the REINFORCE estimator of Ahmadian et al. 2024 §3."""
    gen = torch.Generator().manual_seed(7)
    token_logp = torch.randn(5, 6, generator=gen, dtype=torch.float64).requires_grad_(True)
    mask = torch.rand(5, 6, generator=gen) > 0.3
    adv = torch.randn(5, generator=gen, dtype=torch.float64)
    seq = torch.where(mask, token_logp, 0.0).sum(1, keepdim=True)
    loss, _ = policy_loss(seq, seq.detach(), adv[:, None], torch.ones(5, 1), 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert_close(token_logp.grad, torch.where(mask, -adv[:, None] / 5, 0.0))


@pytest.mark.parametrize("k", range(2, 8))
def test_ranked_pairs_enumerate_all_pairs_in_rank_order_on_cpu(k):
    gen = torch.Generator().manual_seed(k)
    ranking = random_rankings(gen, 3, k)
    chosen, rejected = ranked_pairs(ranking)
    for n in range(3):
        order = ranking[n].tolist()
        expected = [(order[i], order[j]) for i, j in itertools.combinations(range(k), 2)]
        assert list(zip(chosen[n].tolist(), rejected[n].tolist())) == expected


def test_log_softmax_at_equals_autograd_through_log_softmax_gather_and_the_entropy_formula():
    """The one-pass log-prob/entropy function against the textbook ops it replaces: values, and gradients of any
    mix of the two outputs (double precision, torch's gradcheck and a comparison with autograd of the plain ops)."""
    from models.sampling import log_softmax_at, token_logprobs_and_entropy

    gen = torch.Generator().manual_seed(5)
    z = torch.randn(2, 3, 11, generator=gen, dtype=torch.float64) * 3
    a = torch.randint(0, 11, (2, 3), generator=gen)
    ga, gh = (torch.randn(2, 3, generator=gen, dtype=torch.float64) for _ in range(2))

    def plain(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(x, -1)
        return logp.gather(-1, a.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)

    for weights in ((1.0, 0.0), (0.0, 1.0), (1.0, 1.0)):
        x1, x2 = z.clone().requires_grad_(), z.clone().requires_grad_()
        lp1, h1 = log_softmax_at(x1, a, entropy=True)
        lp2, h2 = plain(x2)
        assert_close(lp1, lp2)
        assert_close(h1, h2)
        ((weights[0] * ga * lp1).sum() + (weights[1] * gh * h1).sum()).backward()
        ((weights[0] * ga * lp2).sum() + (weights[1] * gh * h2).sum()).backward()
        assert_close(x1.grad, x2.grad)
    assert torch.autograd.gradcheck(lambda x: log_softmax_at(x, a, entropy=True), (z.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda x: log_softmax_at(x, a)[0], (z.clone().requires_grad_(),))
    lp32, h32 = token_logprobs_and_entropy(z.half(), a)  # fp32 whatever the logits' dtype
    assert lp32.dtype == h32.dtype == torch.float32
