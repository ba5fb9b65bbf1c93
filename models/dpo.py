"""Offline preference optimisation: DPO (sigmoid) and IPO losses, K-wise rankings → pairs, sequence log-probs.

Pure functions of tensors; P = number of (chosen, rejected) pairs in the batch. The log-probs are sequence
log-probs log π(y|x) = Σ_t log π(y_t | x, y_<t) over the response tokens (`sequence_logprobs`), under the policy
being trained and under the frozen reference (computed once, before training).

References
- Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model", eq. 7
  (loss) and its implicit reward r̂ = β·log π/π_ref.
- Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences" (IPO), eq. 17.
- Ouyang et al. 2022 (InstructGPT) §3.5: a K-wise ranking yields C(K,2) comparisons (`models.losses.ranked_pairs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from models.generation import token_logprobs
from models.losses import Metrics, ranked_pairs, validate_ranking
from models.masked import masked_sum

DPOLossType = Literal["sigmoid", "ipo"]


def ranking_to_pairs(ranking: Sequence[int]) -> list[tuple[int, int]]:
    """One K-wise ranking (ranking[j] = index of the j-th best response) → its C(K,2) (chosen, rejected) pairs.

    The same enumeration as the reward model's loss (`models.losses.ranked_pairs`), so DPO and the RM learn from the
    same comparisons of a comparisons file. Raises ValueError (field `ranking`) unless it is a permutation of 0..K−1,
    K >= 2. Example: [2, 0, 1] → [(2, 0), (2, 1), (0, 1)].
    """
    tensor = torch.as_tensor([list(ranking)], dtype=torch.long) if len(ranking) else torch.zeros(1, 0, dtype=torch.long)
    validate_ranking(tensor)
    chosen, rejected = ranked_pairs(tensor)
    return list(zip(chosen[0].tolist(), rejected[0].tolist()))


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log π(y|x) = Σ_t mask_t · log softmax(logits_t)[targets_t]: logits (B, T, V), targets, mask (B, T) → (B,).

    ALIGNMENT as in `models.losses.lm_loss`: targets are already shifted (logits[b, t] predicts targets[b, t]);
    mask is 1 on response tokens only (prompt and padding excluded). fp32 (`models.generation.token_logprobs`).
    Masked targets may be any integer (they are replaced before the gather, so padding ids cannot index out of range).
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2] or mask.shape != targets.shape:
        raise ValueError(
            f"shapes: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}, mask {tuple(mask.shape)}; "
            "expected (B, T, V), (B, T), (B, T)"
        )
    safe = torch.where(mask.bool(), targets, torch.zeros_like(targets))
    return masked_sum(token_logprobs(logits, safe), mask, dim=-1)


def _check(beta: float, *logps: torch.Tensor) -> None:
    if not beta > 0:
        raise ValueError(f"beta: must be > 0, got {beta}")
    shape = logps[0].shape
    if len(shape) != 1 or any(x.shape != shape for x in logps):
        shapes = ", ".join(str(tuple(x.shape)) for x in logps)
        raise ValueError(f"shapes: the four log-prob tensors must be equal (P,) vectors, got {shapes}")


def _metrics(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float) -> Metrics:
    """DPO's implicit rewards r̂ = β·log π/π_ref (Rafailov et al. 2023), as TRL logs them (means over pairs)."""
    with torch.no_grad():
        chosen, rejected = beta * chosen_logratio, beta * rejected_logratio
        return {
            "reward_chosen": chosen.mean(),
            "reward_rejected": rejected.mean(),
            "reward_margin": (chosen - rejected).mean(),
            "accuracy": (chosen > rejected).float().mean(),
        }


def dpo_sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, Metrics]:
    """DPO (Rafailov et al. 2023, eq. 7): mean over pairs of −log σ(β·(Δ_c − Δ_r)), Δ = log π(y|x) − log π_ref(y|x).

    No label smoothing (the Bradley-Terry labels are taken as certain). Inputs: (P,) sequence log-probs; beta > 0.
    Returns (loss, metrics): "reward_chosen", "reward_rejected" (mean β·log π/π_ref), "reward_margin" (their mean
    difference), "accuracy" (fraction of pairs whose chosen implicit reward is strictly higher).
    """
    _check(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    return loss, _metrics(chosen, rejected, beta)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """IPO (Azar et al. 2023, eq. 17 with τ = beta): mean over pairs of (h − 1/(2β))², h = Δ_c − Δ_r, Δ = log π/π_ref.

    IPO regresses the log-ratio gap to a finite target instead of pushing it to infinity, so it does not overfit
    deterministic preferences. With chosen_lengths / rejected_lengths ((P,) response-token counts) each Δ is
    divided by its length first — the per-token form the IPO authors' results use (as TRL does); without them, Δ is
    the sequence sum as in eq. 17. Metrics as `dpo_sigmoid_loss` (implicit rewards from the unnormalised Δ).
    """
    _check(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("chosen_lengths: give both chosen_lengths and rejected_lengths, or neither")
    h_chosen, h_rejected = chosen, rejected
    if chosen_lengths is not None and rejected_lengths is not None:
        if chosen_lengths.shape != chosen.shape or rejected_lengths.shape != chosen.shape:
            raise ValueError(f"chosen_lengths: expected (P,) = {tuple(chosen.shape)}, got "
                             f"{tuple(chosen_lengths.shape)} and {tuple(rejected_lengths.shape)}")
        h_chosen = chosen / chosen_lengths.clamp_min(1).to(chosen.dtype)
        h_rejected = rejected / rejected_lengths.clamp_min(1).to(chosen.dtype)
    loss = ((h_chosen - h_rejected - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, _metrics(chosen, rejected, beta)


PREFERENCE_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo")


def preference_loss(
    loss_type: DPOLossType,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """The loss named by the config's `loss_type` ("sigmoid" | "ipo"); lengths are used by "ipo" only."""
    if loss_type not in PREFERENCE_LOSS_TYPES:
        raise ValueError(f"loss_type: unknown preference loss {loss_type!r}; expected one of {PREFERENCE_LOSS_TYPES}")
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if loss_type == "ipo":
        return ipo_loss(*logps, beta, chosen_lengths, rejected_lengths)
    return dpo_sigmoid_loss(*logps, beta)
