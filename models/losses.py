"""Training losses: LM cross-entropy, the K-wise reward-model ranking loss, the clipped policy loss (PPO, GRPO,
Dr. GRPO, DAPO, RLOO as parameters of one function) and the clipped value loss.

Pure functions of tensors (shapes in each docstring); scalars passed explicitly; masks explicit (0/1 or bool,
0 = ignored); no `.item()`, so metrics come back as 0-d tensors the caller reduces when it logs.
Loss reductions are token means over the whole batch (Σ over valid tokens / number of valid tokens) unless a
`loss_agg` says otherwise (`aggregate_loss`).

References
- Radford et al. 2018/2019 (GPT, GPT-2): next-token cross-entropy.
- Ouyang et al. 2022 (InstructGPT) eq. 1: K-wise ranking loss; eq. 2: PPO-ptx objective.
- Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7: clipped surrogate objective.
- Shao et al. 2024, "DeepSeekMath" §4.1 eq. 3: GRPO objective (per-sequence token mean, KL term with k3).
- Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO): constant normaliser.
- Yu et al. 2025, "DAPO" §3.1 (clip-higher: ε_low ≠ ε_high), §3.3 (token-level policy-gradient loss).
- Hilton et al. 2021 (decoupled PPO objective), Fu et al. 2025 "AReaL" §5 (its use for stale rollouts), Espeholt
  et al. 2018 "IMPALA" §4.1 (truncated importance weights).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from models.advantages import KLKind, kl_penalty
from models.masked import masked_mean, masked_sum
from models.sampling import log_softmax_at

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


def ranked_pairs(ranking: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All C(K,2) (preferred, dispreferred) response-index pairs of each K-wise ranking — the one pair enumeration.

    ranking: (N, K) integer, ranking[n, j] = index of the j-th best response. Returns (chosen, rejected), each
    (N, C(K,2)) long: pair p of row n compares rank positions i < j (in `torch.triu_indices` order: (0,1), (0,2), …,
    (K−2,K−1)), chosen[n, p] = ranking[n, i] is preferred over rejected[n, p] = ranking[n, j]. Used by the RM loss
    (InstructGPT eq. 1) and by DPO's pair construction (models/dpo.py). Does not validate: see `validate_ranking`.
    """
    k = ranking.shape[1]
    better, worse = torch.triu_indices(k, k, offset=1, device=ranking.device)  # all i < j: i ranked above j
    ranking = ranking.long()
    return ranking[:, better], ranking[:, worse]


def _pair_margins(rewards: torch.Tensor, ranking: torch.Tensor) -> torch.Tensor:
    """r_w − r_l for every pair (w ranked above l): (N, K) → (N, C(K,2))."""
    chosen, rejected = ranked_pairs(ranking)
    return rewards.gather(1, chosen) - rewards.gather(1, rejected)


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


LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LOSS_AGGS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregate_loss(
    per_token: torch.Tensor, mask: torch.Tensor, loss_agg: LossAgg = "token-mean", max_response_len: int | None = None
) -> torch.Tensor:
    """Reduce a per-token loss (B, T) under mask (B, T) to a scalar; the choice changes how tokens are weighted.

    - "token-mean": Σ_{b,t} ℓ / Σ mask — every valid token of the batch weighs the same (PPO as implemented by
      TRL/OpenRLHF; DAPO's token-level loss, Yu et al. 2025 §3.3; TRL loss_type "bnpo"/"dapo").
    - "seq-mean-token-mean": mean_b (Σ_t ℓ / |y_b|) — GRPO as written (Shao et al. 2024 eq. 3, TRL loss_type
      "grpo"): a token of a short response weighs more than one of a long response.
    - "seq-mean-token-sum-norm": Σ_{b,t} ℓ / (B · max_response_len) — Dr. GRPO (Liu et al. 2025, TRL
      loss_type "dr_grpo"): a constant normaliser, so no length bias; `max_response_len` is required (pass the
      sampler's max_new_tokens, not the padded T of this batch, or the normaliser changes between batches).
    A row with no valid token contributes 0 and still counts in B for the two sequence means.
    """
    if loss_agg == "token-mean":
        return masked_mean(per_token, mask)
    if loss_agg == "seq-mean-token-mean":
        return masked_mean(per_token, mask, dim=-1).mean()
    if loss_agg == "seq-mean-token-sum-norm":
        if max_response_len is None or max_response_len < 1:
            raise ValueError(
                f"max_response_len: loss_agg 'seq-mean-token-sum-norm' needs the constant normaliser "
                f"(the sampler's max_new_tokens, >= 1), got {max_response_len!r}"
            )
        if max_response_len < mask.shape[-1]:
            raise ValueError(
                f"max_response_len: {max_response_len} is shorter than the responses in this batch (T={mask.shape[-1]})"
            )
        return masked_sum(per_token, mask, dim=-1).mean() / max_response_len
    raise ValueError(f"loss_agg: unknown aggregation {loss_agg!r}; expected one of {LOSS_AGGS}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    *,
    clip_low: float | None = None,
    clip_high: float | None = None,
    loss_agg: LossAgg = "token-mean",
    max_response_len: int | None = None,
    kl_coef: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_estimator: KLKind = "k3",
    behaviour_logprobs: torch.Tensor | None = None,
    behaviour_cap: float = 3.0,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), negated to a loss; the one policy loss of every algorithm.

    ρ_t = exp(logπ_θ − logπ_old);  ℓ_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε_low, 1 + ε_high)) [+ β·KL_t];
    loss = aggregate_loss(ℓ, mask, loss_agg). Defaults (ε_low = ε_high = clip_eps, token mean, no KL term) are PPO.
    - clip_low / clip_high: DAPO's decoupled "clip-higher" (Yu et al. 2025 §3.1, e.g. 0.2 / 0.28); each defaults to
      clip_eps.
    - loss_agg / max_response_len: token-mean (PPO, DAPO), seq-mean-token-mean (GRPO), seq-mean-token-sum-norm
      (Dr. GRPO) — see `aggregate_loss`.
    - kl_coef / ref_logprobs / kl_estimator: KL to the reference as a loss term (GRPO, Shao et al. 2024 eq. 3-4,
      k3 estimator) instead of, or besides, KL in the reward (`models.advantages.per_token_rewards`). The
      per-token KL is taken at the current π_θ (it has a gradient) and aggregated like the surrogate, as TRL does.
    - behaviour_logprobs / behaviour_cap: off-policy (stale) samples, drawn by a behaviour policy π_behav some
      versions older than π_old (bounded-staleness asynchronous RL, `max_staleness`). The decoupled PPO objective
      (Hilton et al. 2021 "Batch size-invariance for policy optimization" §3; AReaL, Fu et al. 2025 eq. 5):
      π_old is the *proximal* policy (the trainer's weights when the update starts) that the ratio is clipped
      around, and the surrogate is reweighted by w_t = min(π_old/π_behav, behaviour_cap) — a truncated importance
      weight (IMPALA's ρ̄, Espeholt et al. 2018 §4.1; "truncated IS", Yao et al. 2025), a constant (no gradient).
      ℓ_t = w_t·max(…) [+ β·KL_t]: the KL term is not reweighted. This is TRL 1.12 GRPOTrainer's
      `vllm_importance_sampling_mode="token_truncate"` with `vllm_importance_sampling_clip_max = behaviour_cap`
      (default 3.0, TRL's). None = on-policy (π_behav = π_old): the plain loss, bit for bit.
    logprobs (with grad), old_logprobs, mask: (B, T); advantages: (B, T), or (B, 1) for one advantage per response
    (broadcast over its tokens); ref_logprobs: (B, T). A sequence-level ratio (TRL's RLOO) is the same call on
    (B, 1) sequence log-probs with a (B, 1) mask of ones.
    Returns (loss scalar, metrics). Metrics (0-d, no grad): "clipfrac" = fraction of valid tokens where the clipped
    term is the active one (strictly larger loss); "clipfrac_low" / "clipfrac_high" = fraction clipped at the lower
    bound with A < 0 / at the upper bound with A > 0 (TRL's clip_ratio/low_mean, high_mean); "approx_kl" = masked
    mean of ½(logπ_θ − logπ_old)² — the k2 estimator of KL(π_old‖π_θ), as TRL's PPO logs it (TRL averages over
    padding too; we average over valid tokens only); "ratio" = masked mean of ρ; "kl" = masked mean of the KL term's
    per-token estimate (only when kl_coef != 0); with behaviour_logprobs, "behaviour_weight" = masked mean of w and
    "behaviour_capped" = fraction of valid tokens whose weight was truncated.
    """
    low = clip_eps if clip_low is None else clip_low
    high = clip_eps if clip_high is None else clip_high
    for name, value in (("clip_low", low), ("clip_high", high)):
        if not value >= 0:
            raise ValueError(f"{name}: must be >= 0, got {value}")
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    per_token = torch.max(unclipped, clipped)
    weight = None
    if behaviour_logprobs is not None:
        if not behaviour_cap > 0:
            raise ValueError(f"behaviour_cap: must be > 0, got {behaviour_cap}")
        raw_weight = torch.exp(old_logprobs - behaviour_logprobs).detach()
        weight = torch.clamp(raw_weight, max=behaviour_cap)
        per_token = per_token * weight
    kl = None
    if kl_coef != 0:
        if ref_logprobs is None:
            raise ValueError("ref_logprobs: kl_coef != 0 puts KL(π‖π_ref) in the loss and needs reference log-probs")
        kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)
        per_token = per_token + kl_coef * kl
    loss = aggregate_loss(per_token, mask, loss_agg, max_response_len)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "clipfrac_low": masked_mean(((ratio < 1.0 - low) & (advantages < 0)).float(), mask),
            "clipfrac_high": masked_mean(((ratio > 1.0 + high) & (advantages > 0)).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl, mask)
        if weight is not None:
            metrics["behaviour_weight"] = masked_mean(weight, mask)
            metrics["behaviour_capped"] = masked_mean((raw_weight > behaviour_cap).float(), mask)
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

    H = logsumexp(z) − Σ softmax(z)·z, which avoids log(0) for tokens with vanishing probability
    (`models.sampling.log_softmax_at`, which also gives the log-prob of a token in the same pass).
    """
    return log_softmax_at(logits, torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device),
                          entropy=True)[1]
