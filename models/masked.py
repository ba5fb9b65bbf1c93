"""Masked reductions shared by the losses and the advantage estimators — the one place they are defined.

A mask is a 0/1 (or bool) tensor broadcastable to the values; positions where it is 0 are ignored. Masked
positions are selected with `torch.where`, not multiplied by 0, so a NaN/inf sitting in a padding slot (e.g. a
log-prob filled with a sentinel) cannot leak into the result or its gradient.
"""

from __future__ import annotations

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ values over positions where mask is 1.

    values: (...); mask: same shape (0/1 or bool). dim=None → scalar; otherwise reduces that dim.
    """
    picked = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return picked.sum() if dim is None else picked.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of values over positions where mask is 1.

    Naive equivalent: `values[mask.bool()].mean()` (dim=None). values: (...); mask: same shape.
    A fully masked reduction returns 0 (the count is clamped to 1) instead of NaN, so an empty micro-batch
    contributes no gradient rather than poisoning the step.
    """
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp_min(1).to(values.dtype)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of values over positions where mask is 1 (scalar).

    Naive equivalent: `values[mask.bool()].var(unbiased=unbiased)`. Unbiased (Bessel, n/(n-1)) by default, as
    TRL's PPO does; with a single valid entry the correction is skipped (count clamped) instead of dividing by 0.
    """
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.bool().sum().to(values.dtype)
        var = var * n / (n - 1).clamp_min(1)
    return var
