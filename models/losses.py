"""Training losses: LM cross-entropy, the K-wise reward-model ranking loss, PPO's clipped policy and value losses.

Pure functions of tensors (shapes in each docstring); scalars passed explicitly; masks explicit (0/1 or bool,
0 = ignored); no `.item()`, so metrics come back as 0-d tensors the caller reduces when it logs.
Loss reductions are token means over the whole batch (Σ over valid tokens / number of valid tokens).

References
- Radford et al. 2018/2019 (GPT, GPT-2): next-token cross-entropy.
- Ouyang et al. 2022 (InstructGPT) eq. 1: K-wise ranking loss; eq. 2: PPO-ptx objective.
- Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7: clipped surrogate objective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.masked import masked_mean

Metrics = dict[str, torch.Tensor]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy, mean over the tokens where loss_mask is 1 (all tokens when None).

    ALIGNMENT: the caller passes already-shifted targets — targets[b, t] is the token that FOLLOWS position t,
    i.e. the one logits[b, t] predicts (for input ids x: logits = model(x)[:, :-1], targets = x[:, 1:]).
    Nothing is shifted here. Masked positions are ignored entirely; their target may be any integer (padding,
    −100, …). Used by pretraining (mask = not padding), SFT (mask = response tokens only) and PPO-ptx.
    logits: (B, T, V); targets: (B, T) long; loss_mask: (B, T) or None → scalar.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"shapes: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}; expected (B, T, V) and (B, T)"
        )
    if loss_mask is not None and loss_mask.shape != targets.shape:
        raise ValueError(f"shapes: loss_mask {tuple(loss_mask.shape)} != targets {tuple(targets.shape)}")
    if loss_mask is not None:
        # Replace ignored targets by a valid index so out-of-range padding ids cannot make cross_entropy fail.
        targets = torch.where(loss_mask.bool(), targets, torch.zeros_like(targets))
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets)
    return nll.mean() if loss_mask is None else masked_mean(nll, loss_mask)


def validate_ranking(ranking: torch.Tensor) -> None:
    """Raise ValueError unless ranking (N, K), K ≥ 2, holds a permutation of 0..K−1 in every row (names the row)."""
    if ranking.dim() != 2:
        raise ValueError(f"ranking: expected shape (N, K), got {tuple(ranking.shape)}")
    n, k = ranking.shape
    if k < 2:
        raise ValueError(f"ranking: K={k} responses per prompt; a ranking needs K >= 2 (every row)")
    if ranking.dtype.is_floating_point or ranking.dtype == torch.bool:
        raise ValueError(f"ranking: expected an integer tensor of response indices, got {ranking.dtype}")
    expected = torch.arange(k, device=ranking.device)
    bad = (ranking.sort(dim=1).values != expected).any(dim=1).nonzero().flatten()
    if bad.numel():
        row = int(bad[0])
        raise ValueError(
            f"ranking: row {row} is not a permutation of 0..{k - 1}: {ranking[row].tolist()}"
            f" ({bad.numel()} bad row(s) of {n})"
        )


def pairwise_accuracy(rewards: torch.Tensor, ranking: torch.Tensor) -> torch.Tensor:
    """Fraction of the C(K,2) pairs per prompt where the preferred response scores strictly higher (0-d).

    rewards: (N, K); ranking: (N, K) as in `kwise_ranking_loss`.
    """
    return (_pair_margins(rewards, ranking) > 0).float().mean()


def _pair_margins(rewards: torch.Tensor, ranking: torch.Tensor) -> torch.Tensor:
    """r_w − r_l for every pair (w ranked above l): (N, K) → (N, C(K,2))."""
    ordered = rewards.gather(1, ranking.long())  # (N, K): ordered[n, j] = reward of the j-th best response
    k = rewards.shape[1]
    better, worse = torch.triu_indices(k, k, offset=1, device=rewards.device)  # all i < j: i ranked above j
    return ordered[:, better] - ordered[:, worse]


def kwise_ranking_loss(rewards: torch.Tensor, ranking: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """InstructGPT eq. 1: loss = −1/C(K,2) · Σ_{(w≻l)} log σ(r_w − r_l), averaged over prompts.

    All C(K,2) comparisons of one prompt form ONE batch element (K reward-model forward passes yield them all),
    which is what keeps the RM from overfitting to correlated pairs (Ouyang et al. 2022, §3.5).
    rewards: (N, K) scalar RM outputs, rewards[n, i] for response i of prompt n.
    ranking: (N, K) integer, ranking[n, j] = index of the j-th best response (row = permutation of 0..K−1), K ≥ 2.
    Returns (loss scalar, {"accuracy": pairwise accuracy, "margin": mean r_w − r_l}). Raises ValueError naming
    the first row that is not a permutation.
    """
    if rewards.shape != ranking.shape:
        raise ValueError(f"shapes: rewards {tuple(rewards.shape)} != ranking {tuple(ranking.shape)}; expected (N, K)")
    validate_ranking(ranking)
    margins = _pair_margins(rewards, ranking)  # (N, C(K,2))
    loss = -F.logsigmoid(margins).mean(dim=1).mean()
    with torch.no_grad():
        metrics = {"accuracy": (margins > 0).float().mean(), "margin": margins.mean()}
    return loss, metrics


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), negated to a loss, token mean over valid tokens.

    ρ_t = exp(logπ_θ − logπ_old);  loss = mean_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε, 1+ε)).
    logprobs (with grad), old_logprobs, advantages, mask: (B, T) → (loss scalar, metrics).
    Metrics (0-d, no grad): "clipfrac" = fraction of valid tokens where the clipped term is the active one
    (strictly larger loss); "approx_kl" = masked mean of ½(logπ_θ − logπ_old)² — the k2 estimator of
    KL(π_old‖π_θ), as TRL's PPO logs it (TRL averages over padding too; we average over valid tokens only);
    "ratio" = masked mean of ρ.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss: ½·mean_t max((V_t − R_t)², (clip(V_t, V_old−ε, V_old+ε) − R_t)²).

    The value-clipping of OpenAI baselines' PPO2 / Ziegler et al.'s lm-human-preferences, as TRL does it.
    values (with grad), old_values (rollout-time values), returns: (B, T); mask: (B, T) → (loss scalar, metrics).
    Metrics (0-d, no grad): "vf_clipfrac" = fraction of valid tokens where the clipped term is strictly larger;
    "value_error" = masked mean of (V − R)² (unclipped squared error).
    """
    clipped_values = torch.clamp(values, old_values - clip_eps, old_values + clip_eps)
    err_unclipped = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(err_unclipped, err_clipped), mask)
    with torch.no_grad():
        metrics = {
            "vf_clipfrac": masked_mean((err_clipped > err_unclipped).float(), mask),
            "value_error": masked_mean(err_unclipped, mask),
        }
    return loss, metrics


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) along the last axis: (..., V) → (...).

    H = logsumexp(z) − Σ softmax(z)·z, which avoids log(0) for tokens with vanishing probability.
    """
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
