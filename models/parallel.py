"""Megatron-style tensor parallelism for the GPT (Shoeybi et al. 2019, "Megatron-LM", §3).

Within one tensor-parallel group of `world` ranks:

- MLP: c_fc is column-parallel (each rank holds inner_dim/world output rows, GELU applies locally), c_proj is
  row-parallel (each rank multiplies its slice of the inner dimension; one all-reduce sums the partial outputs).
  One all-reduce forward, one backward per MLP (Megatron §3, Fig. 3a).
- Attention: c_attn is column-parallel by heads — rank r holds the q, k and v rows of heads
  [r·h/world, (r+1)·h/world) — so attention runs on local heads with no communication; c_proj is row-parallel
  (Fig. 3b). `models.gpt.CausalSelfAttention` infers its local head count from c_attn's output width.
- Embedding: vocab-parallel (rank r holds vocabulary rows [r·V/world, (r+1)·V/world); out-of-range ids give 0;
  an all-reduce completes the lookup). The LM head multiplies by the same (tied) shard and all-gathers the
  vocabulary slices, so callers get full logits and the one LM loss (models/losses.py) applies unchanged
  (Megatron fuses a vocab-parallel cross-entropy instead; that would be a second loss formula here).
- LayerNorms, position embeddings and the biases of row-parallel layers are replicated; their gradients are
  identical on every rank of the group, because every all-reduce in the forward has an identity backward and
  vice versa (the f/g operators of Megatron §3).

Sharded parameters carry `tensor_model_parallel = True` so DeepSpeed's gradient-norm computation counts
each shard once and replicated parameters once per group (deepspeed.runtime.utils.is_model_parallel_parameter).

`shard_model(model, group, rank, world)` converts a GPT / RewardModel / ValueModel in place;
`gather_state_dict(local_sd, cfg, group, world)` reassembles the full (unsharded) state dict. One table
(`shard_spec`) says how each parameter is split, for both directions.

Pure torch (torch.distributed), no ray, no deepspeed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


# --- the communication operators (Megatron's f and g) ------------------------------------------------------------
class _CopyToGroup(torch.autograd.Function):
    """f: identity forward, all-reduce backward (the input is replicated; each rank adds its gradient share)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """g: all-reduce forward (sum the partial results), identity backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        x = x.contiguous()  # all_reduce is in place; never modify an autograd-saved input
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dimension forward; keep this rank's slice of the gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.group, ctx.rank, ctx.size = group, rank, x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad[..., ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size].contiguous(), None


def copy_to_group(x: Tensor, group: Any) -> Tensor:
    return _CopyToGroup.apply(x, group)


def reduce_from_group(x: Tensor, group: Any) -> Tensor:
    return _ReduceFromGroup.apply(x, group)


def gather_last_dim(x: Tensor, group: Any) -> Tensor:
    return _GatherLastDim.apply(x, group)


def _mark(p: nn.Parameter, dim: int) -> nn.Parameter:
    p.tensor_model_parallel = True  # read by DeepSpeed's grad-norm (is_model_parallel_parameter)
    p.partition_dim = dim
    return p


# --- layers -----------------------------------------------------------------------------------------------------
class ColumnParallelLinear(nn.Module):
    """y_local = x W_localᵀ + b_local with W split by output rows. x: (..., in) replicated → (..., out/world)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, group: Any) -> None:
        super().__init__()
        self.group = group
        self.weight = _mark(nn.Parameter(weight.detach().clone()), 0)
        self.bias = _mark(nn.Parameter(bias.detach().clone()), 0) if bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(copy_to_group(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = Σ_ranks x_local W_localᵀ + b with W split by input columns. x: (..., in/world) → (..., out) replicated."""

    def __init__(self, weight: Tensor, bias: Tensor | None, group: Any) -> None:
        super().__init__()
        self.group = group
        self.weight = _mark(nn.Parameter(weight.detach().clone()), 1)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None  # replicated

    def forward(self, x: Tensor) -> Tensor:
        y = reduce_from_group(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Token embedding with vocabulary rows [start, start + V/world) on this rank. ids (B, T) → (B, T, C)."""

    def __init__(self, weight: Tensor, start: int, group: Any) -> None:
        super().__init__()
        self.group, self.start = group, start
        self.weight = _mark(nn.Parameter(weight.detach().clone()), 0)

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_group(out, self.group)


class VocabParallelLMHead(nn.Module):
    """Logits over the full vocabulary from a vocabulary-sharded weight (tied to the embedding shard or its own):
    h (B, T, C) replicated → (B, T, V) replicated."""

    def __init__(self, weight: nn.Parameter, group: Any) -> None:
        super().__init__()
        self.group = group
        self.weight = weight

    def forward(self, h: Tensor) -> Tensor:
        return gather_last_dim(F.linear(copy_to_group(h, self.group), self.weight), self.group)


# --- how each parameter is split (both directions use this table) -----------------------------------------------
def shard_spec(name: str) -> tuple[int, bool] | None:
    """(dimension split across ranks, whether it is the fused q/k/v projection) for a sharded parameter of the
    GPT naming; None for a replicated one."""
    if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
        return 0, True
    if name.endswith(("mlp.c_fc.weight", "mlp.c_fc.bias")):
        return 0, False
    if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
        return 1, False
    if name in ("transformer.wte.weight", "lm_head.weight"):
        return 0, False
    return None


def shard_tensor(full: Tensor, name: str, rank: int, world: int) -> Tensor:
    """This rank's part of the full parameter `name` (the full tensor itself if replicated)."""
    spec = shard_spec(name)
    if spec is None:
        return full
    dim, qkv = spec
    if qkv:  # rows are [q; k; v], each split by heads
        return torch.cat([part.chunk(world, dim=0)[rank] for part in full.chunk(3, dim=0)], dim=0)
    if full.shape[dim] % world:
        raise ValueError(f"{name}: dimension {dim} of size {full.shape[dim]} is not divisible by {world} ranks")
    return full.chunk(world, dim=dim)[rank]


def unshard_tensor(parts: list[Tensor], name: str) -> Tensor:
    """Inverse of `shard_tensor`: the full parameter from every rank's part (rank order)."""
    spec = shard_spec(name)
    if spec is None:
        return parts[0]
    dim, qkv = spec
    if qkv:
        return torch.cat([torch.cat([p.chunk(3, dim=0)[i] for p in parts], dim=0) for i in range(3)], dim=0)
    return torch.cat(parts, dim=dim)


def shard_model(model: nn.Module, group: Any, rank: int, world: int) -> nn.Module:
    """Replace `model`'s layers (in place) by their tensor-parallel shards; returns `model`.

    `model` has `.transformer` (models.gpt.GPTModel) and optionally `.lm_head` (GPT) — GPT, RewardModel and
    ValueModel all qualify (the scalar `score` head stays replicated). Every rank must start from identical
    weights (same seed or the same checkpoint)."""
    cfg = model.config
    if cfg.n_head % world or cfg.inner_dim % world or cfg.vocab_size % world:
        raise ValueError(f"tensor parallel: n_head={cfg.n_head}, inner_dim={cfg.inner_dim} and "
                         f"vocab_size={cfg.vocab_size} must all be divisible by {world}")
    body = model.transformer
    for i, block in enumerate(body.h):
        prefix = f"transformer.h.{i}."
        for parent, child, cls in ((block.attn, "c_attn", ColumnParallelLinear),
                                   (block.attn, "c_proj", RowParallelLinear),
                                   (block.mlp, "c_fc", ColumnParallelLinear),
                                   (block.mlp, "c_proj", RowParallelLinear)):
            lin: nn.Linear = getattr(parent, child)
            kind = "attn" if parent is block.attn else "mlp"
            w = shard_tensor(lin.weight.data, f"{prefix}{kind}.{child}.weight", rank, world)
            b = lin.bias.data if lin.bias is not None else None
            if b is not None and cls is ColumnParallelLinear:
                b = shard_tensor(b, f"{prefix}{kind}.{child}.bias", rank, world)
            setattr(parent, child, cls(w, b, group))
    tied = getattr(cfg, "tie_embeddings", True) and hasattr(model, "lm_head") and \
        model.lm_head.weight is body.wte.weight
    vocab_local = cfg.vocab_size // world
    body.wte = VocabParallelEmbedding(shard_tensor(body.wte.weight.data, "transformer.wte.weight", rank, world),
                                      rank * vocab_local, group)
    if hasattr(model, "lm_head"):
        if tied:
            weight = body.wte.weight
        else:
            weight = _mark(nn.Parameter(shard_tensor(model.lm_head.weight.data, "lm_head.weight", rank, world)), 0)
        model.lm_head = VocabParallelLMHead(weight, group)
    return model


def gather_state_dict(local: dict[str, Tensor], cfg: Any, group: Any, world: int,
                      device: torch.device | None = None) -> dict[str, Tensor]:
    """Collective over `group`: the full state dict (GPT naming, CPU) from each rank's sharded one."""
    out: dict[str, Tensor] = {}
    for name in sorted(local):  # same order on every rank
        t = local[name]
        if shard_spec(name) is None:
            out[name] = t
            continue
        x = t.to(device) if device is not None else t
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        out[name] = unshard_tensor([p.cpu() for p in parts], name)
    return out
