"""A small DeepSpeed training-engine builder for one process of a torch.distributed world.

Used by the PPO policy and value workers (actors/policy.py, actors/value.py), which live in their own
data-parallel world formed by cluster/worker_group.py, and meant to be shared with the Ray Train jobs.

What it fixes, and why (ENVIRONMENT.md, "DeepSpeed on CPU"):
- the client optimizer is `torch.optim.AdamW`: DeepSpeed's FusedAdam / DeepSpeedCPUAdam JIT-compile C++ for
  ~100 s and ~2 GB on a CPU box, torch's AdamW needs nothing and gives the same update;
- the `deepspeed_shm_comm` op is marked incompatible before `initialize`, otherwise DeepSpeed JIT-builds it
  (~90 s) though only its inference path uses it;
- precision: fp32 on CPU (bf16 works there but is 3–4× slower on AVX2-only cores), bf16 on GPU;
- ZeRO stage 0–3 and gradient clipping come from the spec, so a worker never touches DeepSpeed's config dict.

`torch.distributed` must already be initialised (the worker group does it with a FileStore or TCP rendezvous);
DeepSpeed then adopts that process group instead of probing MPI or env:// (which would bind a TCPStore on every
interface).

Checkpoints are DeepSpeed's own directory format (`save_dir/tag/…`, one file per rank for sharded optimizer
state), because it is the one format that round-trips every ZeRO stage and precision; they hold trusted state
written by the run itself. Model weights for users go out as Hugging Face directories (models/checkpoint.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

Precision = Literal["auto", "fp32", "bf16"]


class EngineError(ValueError):
    """An engine spec value is invalid; the message names the field."""


@dataclass(frozen=True)
class EngineSpec:
    """Optimizer + DeepSpeed settings of one trainable model. All fields are plain values (no config objects)."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    zero_stage: int = 0  # 0 = plain data parallel; 1/2/3 shard optimizer state / gradients / parameters
    grad_clip: float = 1.0  # global gradient-norm clip; 0 = off
    precision: Precision = "auto"  # auto = bf16 on GPU, fp32 on CPU
    micro_batch_size: int = 1  # rows per rank per optimizer step; DeepSpeed only records it

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise EngineError(f"lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise EngineError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise EngineError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.grad_clip < 0:
            raise EngineError(f"grad_clip: must be >= 0 (0 = off), got {self.grad_clip}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise EngineError(f"precision: must be auto, fp32 or bf16, got {self.precision!r}")
        if self.micro_batch_size < 1:
            raise EngineError(f"micro_batch_size: must be >= 1, got {self.micro_batch_size}")


def resolve_precision(precision: Precision, use_gpu: bool | None = None) -> Literal["fp32", "bf16"]:
    """`auto` → bf16 with CUDA, fp32 without (bf16 on CPU is correct but 3–4× slower on AVX2 cores)."""
    if precision != "auto":
        return precision
    gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    return "bf16" if gpu else "fp32"


def ds_config(spec: EngineSpec, world_size: int, use_gpu: bool | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for `spec` (no accumulation: the caller steps after every backward)."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": spec.micro_batch_size * world_size,
        "zero_optimization": {"stage": spec.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if spec.grad_clip > 0:
        cfg["gradient_clipping"] = spec.grad_clip
    if resolve_precision(spec.precision, use_gpu) == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def skip_cpu_jit_ops() -> None:
    """Mark the shm_comm op incompatible so `deepspeed.initialize` does not JIT-compile it (ENVIRONMENT.md)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(model: nn.Module, spec: EngineSpec) -> Any:
    """Wrap `model` in a DeepSpeed engine with a torch AdamW client optimizer. Returns the engine.

    Call after `torch.distributed` is initialised, on every rank of the world, collectively.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("build_engine: torch.distributed is not initialised (form the worker group's world first)")
    skip_cpu_jit_ops()
    import deepspeed

    # DeepSpeed reads these even when the process group exists; they are never used to open a socket here.
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    params = [p for p in model.parameters() if p.requires_grad]
    # No weight decay on biases, LayerNorm gains and embeddings' positions is the GPT-2 convention; for PPO the
    # default decay is 0, so one group keeps the optimizer state layout trivially identical across ZeRO stages.
    optimizer = torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=ds_config(spec, dist.get_world_size()), dist_init_required=False)
    return engine


def save_engine(engine: Any, directory: str | Path, tag: str, client_state: dict[str, Any] | None = None) -> None:
    """Collective: every rank writes its part of `directory/tag/` (model, optimizer, client state)."""
    engine.save_checkpoint(str(directory), tag=tag, client_state={"raygpt": client_state or {}}, save_latest=False)


def load_engine(engine: Any, directory: str | Path, tag: str) -> dict[str, Any]:
    """Collective: restore model + optimizer state saved by `save_engine`; returns the client state."""
    path = Path(directory) / tag
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: engine checkpoint does not exist")
    load_path, client_state = engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"{path}: DeepSpeed could not load this checkpoint")
    return dict((client_state or {}).get("raygpt", {}))


def global_token_scale(mask: torch.Tensor) -> float:
    """Collective: the factor that turns this rank's token-mean loss into its share of the token mean over the
    whole data-parallel minibatch: world · n_local / n_global.

    DeepSpeed averages gradients over ranks, i.e. weighs every rank's mean equally; with variable-length responses
    that over-weighs the tokens of short-response ranks. Scaling each rank's loss by this factor makes the averaged
    gradient that of the global token mean (veRL's "token-mean" aggregation across DP). 1.0 on a single rank."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return 1.0
    local = mask.bool().sum().to(torch.float64).reshape(1).cpu()
    total = local.clone()
    dist.all_reduce(total)
    return float(world * local / total.clamp_min(1.0))


def full_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """Collective under ZeRO / bf16 (every rank must call): the full fp32 weights of the engine's module on CPU, with
    models/ parameter names (tied weights listed under each name). Plain parameters are read directly."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    # With ZeRO > 0 or bf16 the fp32 master copy lives (partitioned) in the optimizer: gather it.
    sharded = engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled()
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        full = safe_get_full_fp32_param(p) if sharded else None
        out[name] = (full if full is not None else p.detach()).float().cpu().clone()
    for name, b in module.named_buffers():
        out[name] = b.detach().float().cpu().clone()
    return out
