"""Counter-based random numbers for per-row seeded sampling, vectorised over rows (no Python loop, no
`torch.Generator` per row).

A row's uniform at its decoding step t is a pure function u = U(seed, t) (Salmon et al. 2011, "Parallel random
numbers: as easy as 1, 2, 3": a counter-based generator is a keyed hash of a counter). So a row's sample depends
only on its own seed, its own step and its own distribution — never on its batch-mates, on its slot in the batch or
on the step at which a continuous-batching loop admitted it. The row index is folded into the seed by the caller
(`seeds=s` means row i uses s + i).

The hash is Wellons' `lowbias32` integer mixer applied in a chain over the 32-bit words of (step, seed); all
arithmetic stays exact in int64 (products are split in 16-bit limbs so nothing overflows), so CPU and GPU, any
batch size and any device give the same bits.

`sample_categorical` turns one uniform per row into a token by inverse-CDF over the filtered distribution (top-k,
then nucleus/top-p of Holtzman et al. 2020 on what top-k kept), which needs one cumulative sum per row instead of
one random number per vocabulary entry (Gumbel-max would hash B·V counters per step).
"""

from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_C1, _C2 = 0x7FEB352D, 0x846CA68B  # lowbias32 multipliers (Wellons, "Prospecting for hash functions", 2018)
_GOLDEN = 0x9E3779B9  # 2^32 / φ, separates the counter words


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x · c) mod 2^32 for 0 ≤ x < 2^32, exact in int64: split x into 16-bit halves so no product exceeds 2^48."""
    hi = ((x >> 16) * c) & 0xFFFF
    return ((hi << 16) + (x & 0xFFFF) * c) & _M32


def mix32(x: Tensor) -> Tensor:
    """lowbias32: a bijective avalanche mixer on 32-bit words held in int64 tensors (values in [0, 2^32))."""
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def uniform(seeds: Tensor, steps: Tensor | int) -> Tensor:
    """seeds (B,) int64 (any value; negative seeds use their two's-complement bits), steps (B,) or an int →
    (B,) float32 in [0, 1) with 24 random bits (the resolution of a float32 cumulative distribution)."""
    seeds = seeds.long()
    steps_t = torch.as_tensor(steps, dtype=torch.long, device=seeds.device).expand_as(seeds)
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    h = mix32((steps_t & _M32) ^ _GOLDEN)
    h = mix32(h ^ lo)
    h = mix32(h ^ hi ^ _GOLDEN)
    return (h >> 8).float() * (1.0 / (1 << 24))


def sample_categorical(scaled: Tensor, u: Tensor, top_k: int, top_p: float) -> Tensor:
    """Inverse-CDF sample of one token per row from softmax(scaled) restricted to the top-k, then to the nucleus
    of mass top_p of that renormalised top-k distribution (the most likely token is always kept).

    scaled (B, V) temperature-scaled logits; u (B,) uniforms in [0, 1) → tokens (B,) int64. Restricting and
    renormalising here is `filter_logits` followed by softmax, done on the sorted top-k only (cheap for small k).
    """
    V = scaled.size(-1)
    scaled = scaled.float()
    if 0 < top_k < V:
        values, order = torch.topk(scaled, top_k, dim=-1)  # sorted, descending
    elif top_p < 1.0:
        values, order = torch.sort(scaled, dim=-1, descending=True)
    else:
        values, order = scaled, None
    probs = torch.softmax(values, dim=-1)
    last = torch.full((probs.size(0), 1), probs.size(-1) - 1, dtype=torch.long, device=probs.device)
    if top_p < 1.0:
        # drop a token if the mass strictly before it already reaches top_p (as `filter_logits`); the kept
        # tokens are a prefix of the sorted order
        before = probs.cumsum(-1) - probs
        keep = before < top_p
        keep[..., 0] = True
        probs = probs * keep
        last = keep.sum(-1, keepdim=True) - 1
    cdf = probs.cumsum(-1)
    target = (u.to(cdf.device, torch.float32) * cdf[:, -1]).unsqueeze(-1)  # (B, 1); scaled by the kept mass
    # first index whose cdf exceeds the target; a target rounded up to the total falls on the last kept token
    idx = torch.minimum(torch.searchsorted(cdf, target, right=True), last)
    return (idx if order is None else order.gather(-1, idx)).squeeze(-1)
