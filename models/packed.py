"""oneDNN-packed linear layers for CPU decoding: a twin of a model whose `nn.Linear`s multiply with weights
reordered once into oneDNN's blocked layout (the layout `torch.compile`'s CPU backend uses for frozen weights),
everything else (embeddings, LayerNorms, biases) shared with the model.

Why: a decode step multiplies a few rows by every weight matrix; on this AVX-512 CPU oneDNN with packed weights
runs those skinny products 2–3× faster than MKL's sgemm on the row-major weight (docs/BENCHMARKS.md). The values
are the same product summed in another order (relative differences ~1e-6; log-probs still equal the trainer's
within 1e-5, tests/unit/test_native_engine.py).

The twin is cached per model and rebuilt when any parameter changes (its in-place version counter moves:
`load_state_dict`, an optimizer step), so a stale packed copy is never used.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import Tensor, nn

_TWINS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], nn.Module]] = weakref.WeakKeyDictionary()


def available(model: nn.Module) -> bool:
    """Packed weights apply to fp32 models on CPU with oneDNN (the CPU wheels ship it)."""
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32 and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    """y = x Wᵀ + b with W reordered for oneDNN (`torch.ops.mkldnn._reorder_linear_weight`)."""

    def __init__(self, linear: nn.Linear, rows_hint: int = 32) -> None:
        super().__init__()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _twin(module: nn.Module) -> nn.Module:
    clone = copy.copy(module)  # shares parameters and buffers; gets its own child table below
    clone._modules = {name: (PackedLinear(child) if isinstance(child, nn.Linear) else _twin(child))
                      for name, child in module._modules.items() if child is not None}
    return clone


def _key(model: nn.Module) -> tuple[int, ...]:
    return tuple(x for p in model.parameters() for x in (p.data_ptr(), p._version))


def packed_twin(model: nn.Module) -> nn.Module:
    """The model with every nn.Linear packed for oneDNN (cached until a parameter changes)."""
    key = _key(model)
    hit = _TWINS.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    twin = _twin(model).eval()
    _TWINS[model] = (key, twin)
    return twin


def invalidate(model: nn.Module) -> None:
    """Forget `model`'s packed twin. For weights written behind autograd's back — DeepSpeed ZeRO copies its
    updated partitions into the parameters through `.data`, which leaves their version counters unchanged, so
    the cache key above cannot see an optimizer step there."""
    _TWINS.pop(model, None)
