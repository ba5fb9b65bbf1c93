"""models/dpo.py against naive per-pair loops, hand-worked values and the RM's K-wise loss (no Ray, CPU, ~1 s)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from models.dpo import dpo_sigmoid_loss, ipo_loss, preference_loss, ranking_to_pairs, sequence_logprobs
from models.losses import kwise_ranking_loss


def random_logps(seed: int, pairs: int):
    gen = torch.Generator().manual_seed(seed)
    return [-torch.rand(pairs, generator=gen, dtype=torch.float64) * 40 for _ in range(4)]


def naive(loss_type, pc, pr, rc, rr, beta, lc=None, lr=None):
    """Per pair with Python floats: DPO eq. 7 / IPO eq. 17 (log-ratios per token when lengths are given)."""
    losses, margins, correct = [], [], 0
    for i in range(len(pc)):
        dc, dr = float(pc[i] - rc[i]), float(pr[i] - rr[i])
        if loss_type == "sigmoid":
            losses.append(-math.log(1 / (1 + math.exp(-beta * (dc - dr)))))
        else:
            hc, hr = (dc / float(lc[i]), dr / float(lr[i])) if lc is not None else (dc, dr)
            losses.append((hc - hr - 1 / (2 * beta)) ** 2)
        margins.append(beta * dc - beta * dr)
        correct += beta * dc > beta * dr
    n = len(pc)
    return sum(losses) / n, sum(margins) / n, correct / n


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("seed,pairs,beta", [(0, 1, 0.1), (1, 7, 0.5), (2, 16, 0.05)])
def test_preference_losses_match_naive_loop_on_cpu(loss_type, seed, pairs, beta):
    pc, pr, rc, rr = random_logps(seed, pairs)
    loss, m = preference_loss(loss_type, pc, pr, rc, rr, beta)
    ref_loss, ref_margin, ref_acc = naive(loss_type, pc, pr, rc, rr, beta)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    assert m["reward_margin"].item() == pytest.approx(ref_margin, rel=1e-12, abs=1e-12)
    assert m["accuracy"].item() == pytest.approx(ref_acc)
    assert m["reward_chosen"].item() == pytest.approx(float((beta * (pc - rc)).mean()))
    assert m["reward_rejected"].item() == pytest.approx(float((beta * (pr - rr)).mean()))


@pytest.mark.parametrize("seed", [0, 1])
def test_ipo_length_normalised_matches_naive_loop_on_cpu(seed):
    pc, pr, rc, rr = random_logps(seed, 9)
    gen = torch.Generator().manual_seed(100 + seed)
    lc, lr = torch.randint(1, 30, (9,), generator=gen), torch.randint(1, 30, (9,), generator=gen)
    loss, _ = ipo_loss(pc, pr, rc, rr, 0.1, lc, lr)
    assert loss.item() == pytest.approx(naive("ipo", pc, pr, rc, rr, 0.1, lc, lr)[0], rel=1e-12)
    assert loss.item() != pytest.approx(ipo_loss(pc, pr, rc, rr, 0.1)[0].item())  # the lengths matter


def test_dpo_hand_worked_on_cpu():
    zero = torch.zeros(3, dtype=torch.float64)
    # Policy = reference: every implicit reward is 0, σ(0) = ½ → loss log 2, no pair "correct" (ties are not).
    loss, m = dpo_sigmoid_loss(zero, zero, zero, zero, 0.1)
    assert loss.item() == pytest.approx(math.log(2)) and m["accuracy"].item() == 0.0
    # Δ_c − Δ_r = 10 with β = 0.1 → −log σ(1) = log(1 + e^{−1}); rewards 0.1·Δ.
    pc, pr = torch.tensor([-5.0], dtype=torch.float64), torch.tensor([-20.0], dtype=torch.float64)
    rc, rr = torch.tensor([-10.0], dtype=torch.float64), torch.tensor([-15.0], dtype=torch.float64)
    loss, m = dpo_sigmoid_loss(pc, pr, rc, rr, 0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert m["reward_chosen"].item() == pytest.approx(0.5) and m["reward_rejected"].item() == pytest.approx(-0.5)
    assert m["reward_margin"].item() == pytest.approx(1.0) and m["accuracy"].item() == 1.0
    # IPO's minimum sits at Δ_c − Δ_r = 1/(2β) = 5 (a finite target), not at +∞: 10 overshoots by 5 → 25.
    assert ipo_loss(pc, pr, rc, rr, 0.1)[0].item() == pytest.approx(25.0)
    assert ipo_loss(pc, pr + 5, rc, rr, 0.1)[0].item() == pytest.approx(0.0)


def test_dpo_gradient_raises_chosen_lowers_rejected_on_cpu():
    pc, pr, rc, rr = random_logps(3, 5)
    pc, pr = pc.requires_grad_(True), pr.requires_grad_(True)
    dpo_sigmoid_loss(pc, pr, rc, rr, 0.1)[0].backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    # d/dΔ_c of −log σ(β(Δ_c − Δ_r)) = −β·σ(−β(Δ_c − Δ_r)), ÷ P pairs
    z = 0.1 * ((pc - rc) - (pr - rr)).detach()
    assert_close(pc.grad, -0.1 * torch.sigmoid(-z) / 5)
    assert_close(pr.grad, 0.1 * torch.sigmoid(-z) / 5)


def test_preference_loss_bad_input_raises_on_cpu():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss("hinge", x, x, x, x, 0.1)
    with pytest.raises(ValueError, match="beta"):
        preference_loss("sigmoid", x, x, x, x, 0.0)
    with pytest.raises(ValueError, match="shapes"):
        preference_loss("ipo", x, x, x, torch.zeros(2), 0.1)
    with pytest.raises(ValueError, match="chosen_lengths"):
        ipo_loss(x, x, x, x, 0.1, chosen_lengths=torch.ones(3))


@pytest.mark.parametrize("k", range(2, 8))
def test_ranking_to_pairs_is_all_ordered_pairs_on_cpu(k):
    gen = torch.Generator().manual_seed(k)
    ranking = torch.randperm(k, generator=gen).tolist()
    pairs = ranking_to_pairs(ranking)
    assert len(pairs) == math.comb(k, 2)
    assert pairs == [(ranking[i], ranking[j]) for i, j in itertools.combinations(range(k), 2)]
    assert ranking_to_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]


def test_ranking_to_pairs_are_the_reward_models_comparisons_on_cpu():
    """Bradley-Terry on the pairs, averaged, is exactly InstructGPT's K-wise loss for that prompt: DPO and the RM
    learn from the same comparisons."""
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(1, 6, generator=gen, dtype=torch.float64)
    ranking = torch.randperm(6, generator=gen)
    pairs = ranking_to_pairs(ranking.tolist())
    bt = torch.stack([-torch.nn.functional.logsigmoid(rewards[0, c] - rewards[0, r]) for c, r in pairs]).mean()
    assert_close(bt, kwise_ranking_loss(rewards, ranking[None])[0])


@pytest.mark.parametrize("bad,match", [([0, 0, 1], "not a permutation"), ([1], "K=1"), ([], "K=0"), ([0, 2], "row 0")])
def test_ranking_to_pairs_rejects_bad_rankings_on_cpu(bad, match):
    with pytest.raises(ValueError, match=f"ranking: .*{match}"):
        ranking_to_pairs(bad)


def test_sequence_logprobs_matches_naive_loop_on_cpu():
    gen = torch.Generator().manual_seed(4)
    b, t, v = 3, 6, 11
    logits = torch.randn(b, t, v, generator=gen)
    targets = torch.randint(0, v, (b, t), generator=gen)
    mask = torch.rand(b, t, generator=gen) > 0.4
    expected = [
        sum(float(torch.log_softmax(logits[i, s].double(), -1)[targets[i, s]]) for s in range(t) if mask[i, s])
        for i in range(b)
    ]
    assert_close(sequence_logprobs(logits, targets, mask), torch.tensor(expected, dtype=torch.float32))
    with pytest.raises(ValueError, match="shapes"):
        sequence_logprobs(logits, targets[:, :-1], mask)
