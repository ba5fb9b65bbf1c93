"""The one DeepSpeed layer: every trainable model of the project becomes a DeepSpeed engine here.

Used by the Ray Train jobs (cluster/train/engine.py: pretraining, SFT, reward model — with TP/PP on top) and by
the PPO policy and value actors (actors/policy.py, actors/value.py), which live in their own data-parallel world
formed by cluster/worker_group.py. One spec type (`EngineSpec` = `OptimConfig` + ZeRO stage + precision), one
rule for each of:

- parameter groups: AdamW's decoupled weight decay on matrices only; biases and LayerNorm gains are not decayed
  (GPT-3 §B "weight decay of 0.1", applied as in GPT-2/nanoGPT to ≥ 2-d weights only) — `param_groups`;
- precision: `auto` = bf16 on GPU, fp32 on CPU (bf16 is correct on CPU but 3–4× slower on AVX2-only cores) —
  `resolve_precision`;
- the optimizer: torch's AdamW as DeepSpeed's client optimizer (DeepSpeed's FusedAdam / DeepSpeedCPUAdam
  JIT-compile C++ for ~100 s and ~2 GB on a CPU box; torch's AdamW needs nothing and gives the same update), with
  linear warmup + cosine decay (models/schedules.py; a constant schedule is warmup 0 and floor 1.0) —
  `build_optimizer`;
- the DeepSpeed config dict — `ds_config`; the `deepspeed_shm_comm` op marked incompatible before `initialize`,
  otherwise DeepSpeed JIT-builds it (~90 s) though only its inference path uses it — `skip_cpu_jit_ops`;
- the full fp32 weights (ZeRO partitions / bf16 master copies gathered) — `full_state_dict`;
- checkpoints — `save_engine` / `load_engine`, and the conversion of a ZeRO checkpoint to DeepSpeed's universal
  format when the data-parallel size changes — `convert_to_universal`;
- collectives on the process group's device (cuda for nccl, cpu for gloo) — `collective_device`.

`torch.distributed` must already be initialised (by Ray Train, or by the worker group with a FileStore or TCP
rendezvous); DeepSpeed then adopts that process group instead of probing MPI or env:// (which would bind a
TCPStore on every interface).

Checkpoints are DeepSpeed's own directory format (`save_dir/tag/…`, one file per rank for sharded optimizer
state), because it is the one format that round-trips every ZeRO stage and precision; they hold trusted state
written by the run itself. Model weights for users go out as Hugging Face directories (models/checkpoint.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from models.config import ConfigError, field

Precision = Literal["auto", "fp32", "bf16"]


@dataclass
class OptimConfig:
    """AdamW + warmup/cosine schedule + batch shape (per data-parallel rank)."""

    lr: float = field(6e-4, help="peak learning rate (after warmup)")
    min_lr_ratio: float = field(0.1, help="cosine decays to lr·min_lr_ratio at max_steps (GPT-3 §B: 10%)")
    warmup_steps: int = field(10, help="linear warmup over this many optimizer steps")
    max_steps: int = field(100, help="optimizer steps in the run (the cosine reaches its floor here)")
    weight_decay: float = field(0.1, help="AdamW decoupled weight decay on matrices (not biases/LayerNorm)")
    betas: list[float] = field([0.9, 0.95], help="AdamW (beta1, beta2)")
    eps: float = field(1e-8, help="AdamW epsilon")
    grad_clip: float = field(1.0, help="clip the global gradient norm to this (0 = off)")
    micro_batch_size: int = field(8, help="sequences per micro-batch per data-parallel rank")
    grad_accum: int = field(1, help="micro-batches accumulated per optimizer step (pipeline: micro-batches in flight)")

    @classmethod
    def constant(cls, lr: float, weight_decay: float = 0.0, grad_clip: float = 1.0,
                 micro_batch_size: int = 1) -> OptimConfig:
        """A constant learning rate (no warmup, cosine floor = 1.0: the schedule factor is exactly 1 at every
        step), one micro-batch per step — what the PPO trainers use."""
        return cls(lr=lr, min_lr_ratio=1.0, warmup_steps=0, max_steps=1, weight_decay=weight_decay,
                   grad_clip=grad_clip, micro_batch_size=micro_batch_size, grad_accum=1)

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_steps < 1:
            raise ConfigError(f"max_steps: must be ≥ 1, got {self.max_steps}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ConfigError(f"warmup_steps: must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas: need two values in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise ConfigError("weight_decay/grad_clip/eps: must be ≥ 0 (eps > 0)")
        for name in ("micro_batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be ≥ 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class EngineSpec:
    """Everything DeepSpeed needs to know about one trainable model: the optimizer section, the ZeRO stage and
    the precision. The Ray Train engine makes one from `OptimConfig` + `ParallelConfig`; the PPO job makes one
    per trainer role (jobs/rl/config.py `role_specs`)."""

    optim: OptimConfig = dc_field(default_factory=lambda: OptimConfig.constant(1e-5))
    zero_stage: int = 0  # 0 = plain data parallel; 1/2/3 shard optimizer state / gradients / parameters
    precision: Precision = "auto"  # auto = bf16 on GPU, fp32 on CPU

    def __post_init__(self) -> None:
        self.optim.validate()
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision: must be auto, fp32 or bf16, got {self.precision!r}")


def resolve_precision(precision: Precision, use_gpu: bool | None = None) -> Literal["fp32", "bf16"]:
    """`auto` → bf16 with a GPU, fp32 without (bf16 on CPU is correct but 3–4× slower on AVX2 cores).
    `use_gpu=None` asks torch whether this process sees CUDA."""
    if precision != "auto":
        return precision
    gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    return "bf16" if gpu else "fp32"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: matrices (≥ 2-d: linear and embedding weights) decayed, vectors (biases, LayerNorm
    gains and shifts) not — GPT-3 §B's weight decay as GPT-2/nanoGPT apply it. Frozen parameters are left out,
    tied parameters appear once, empty groups are dropped (ZeRO flattens each group into one buffer)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():  # deduplicates tied parameters
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, optim: OptimConfig) -> tuple[torch.optim.Optimizer, Any]:
    """torch AdamW over `param_groups` and the warmup + cosine schedule as a LambdaLR factor of `optim.lr`."""
    from models.schedules import warmup_cosine

    # fused: one kernel per parameter for the whole AdamW formula (torch ≥ 2.4 on CPU and CUDA) — for small models
    # the step is otherwise ~1 kernel per parameter and formula term: 1.3 ms vs 3.7 ms (foreach) and 5.2 ms (the
    # per-parameter loop) for `tiny` on one core; equal to the loop within float rounding (2e-7 after 30 steps).
    opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas),
                            eps=optim.eps, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, 1.0, optim.warmup_steps, optim.max_steps, optim.min_lr_ratio))
    return opt, sched


def ds_config(spec: EngineSpec, dp_size: int, bf16: bool, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config dict: batch shape over `dp_size` data-parallel ranks, ZeRO stage, clipping, bf16."""
    o = spec.optim
    zero: dict[str, Any] = {"stage": spec.zero_stage}
    if spec.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition every parameter (what ZeRO-3 promises)
    return {
        "train_micro_batch_size_per_gpu": o.micro_batch_size,
        "gradient_accumulation_steps": o.grad_accum,
        "train_batch_size": o.micro_batch_size * o.grad_accum * dp_size,
        "gradient_clipping": o.grad_clip,  # 0 = off (DeepSpeed clips only when > 0)
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }


def skip_cpu_jit_ops() -> None:
    """Mark the shm_comm op incompatible so `deepspeed.initialize` does not JIT-compile it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def adopt_process_group() -> None:
    """Make deepspeed.comm wrap the existing torch.distributed world (collective-free; idempotent).

    DeepSpeed reads RANK/WORLD_SIZE/MASTER_* even when the process group exists; the defaults below are never used
    to open a socket (Ray Train sets its own values first)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("deepspeed_engine: torch.distributed is not initialised (form the world first)")
    skip_cpu_jit_ops()
    import deepspeed

    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    deepspeed.init_distributed(dist_backend=dist.get_backend())


def initialize(model: nn.Module, spec: EngineSpec, *, dp_size: int | None = None, use_gpu: bool | None = None,
               mpu: Any = None, load_universal: bool = False) -> Any:
    """Wrap `model` in a DeepSpeed engine (torch AdamW client optimizer + schedule). Returns the engine.

    Collective: call on every rank after `torch.distributed` is initialised. `dp_size` defaults to the world size
    (no tensor/pipeline parallelism); `mpu` is the topology object of cluster/distributed.py under TP."""
    import torch.distributed as dist

    adopt_process_group()
    import deepspeed

    bf16 = resolve_precision(spec.precision, use_gpu) == "bf16"
    opt, sched = build_optimizer(model, spec.optim)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, mpu=mpu, dist_init_required=False,
        config=ds_config(spec, dp_size or dist.get_world_size(), bf16, load_universal))
    if engine.dp_world_size == 1 and spec.zero_stage == 0 and mpu is None:
        # One data-parallel rank: DeepSpeed would still flatten every gradient into a bucket, all-reduce it with
        # itself, divide by 1 and copy it back after each backward — identical gradients at the cost of two
        # copies per step (benchmarks/ppo.py: the PPO trainers are single-rank by default).
        engine.enable_backward_allreduce = False
    return engine


def save_engine(engine: Any, directory: str | Path, tag: str, client_state: dict[str, Any] | None = None) -> None:
    """Collective: every rank writes its part of `directory/tag/` (model, optimizer, schedule, client state)."""
    engine.save_checkpoint(str(directory), tag=tag, client_state={"raygpt": client_state or {}}, save_latest=False)


def load_engine(engine: Any, directory: str | Path, tag: str) -> dict[str, Any]:
    """Collective: restore model + optimizer + schedule state saved by `save_engine`; returns the client state."""
    path = Path(directory) / tag
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: engine checkpoint does not exist")
    load_path, client_state = engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"{path}: DeepSpeed could not load this checkpoint")
    return dict((client_state or {}).get("raygpt", {}))


def convert_to_universal(tag_dir: str | Path, out_tag_dir: str | Path) -> None:
    """Convert one ZeRO checkpoint (`directory/tag`) into DeepSpeed's universal format at `out_tag_dir`, which
    loads at any data-parallel size (ZeRO partitions depend on it). Runs DeepSpeed's converter in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(tag_dir), "--output_folder", str(out_tag_dir), "--inject_missing_state",
                           "--num_extract_workers", "1", "--num_merge_workers", "1"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"checkpoint {tag_dir}: conversion to a universal checkpoint failed:\n"
                           f"{proc.stderr[-2000:]}")


def collective_device(group: Any = None) -> torch.device:
    """The device a collective of `group` takes its tensors on: the current CUDA device for nccl, else CPU."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_token_scale(mask: torch.Tensor, group: Any = None) -> float:
    """Collective: the factor that turns this rank's token-mean loss into its share of the token mean over the
    whole data-parallel minibatch: world · n_local / n_global.

    DeepSpeed averages gradients over ranks, i.e. weighs every rank's mean equally; with variable-length responses
    that over-weighs the tokens of short-response ranks. Scaling each rank's loss by this factor makes the averaged
    gradient that of the global token mean (veRL's "token-mean" aggregation across DP). 1.0 on a single rank."""
    import torch.distributed as dist

    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world == 1:
        return 1.0
    local = mask.bool().sum().to(device=collective_device(group), dtype=torch.float64).reshape(1)
    total = local.clone()
    dist.all_reduce(total, group=group)
    return float(world * local / total.clamp_min(1.0))


def full_state_dict(engine: Any, remove_duplicate: bool = False) -> dict[str, torch.Tensor]:
    """Collective under ZeRO / bf16 (every rank must call): the full fp32 weights of the engine's module on CPU,
    in the module's parameter names (with `remove_duplicate=False` a tied weight is listed under each of its names,
    as in `state_dict()`), plus its buffers.

    With ZeRO > 0 or bf16 the fp32 master copy lives (partitioned) in the optimizer: it is gathered, so the weights
    are the ones the optimizer updates, not a rounded bf16 copy. Under tensor/pipeline parallelism these are this
    rank's shard/stage; cluster/train/engine.py gathers those."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    sharded = engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled()
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters(remove_duplicate=remove_duplicate):
        full = safe_get_full_fp32_param(p) if sharded else None
        out[name] = (full if full is not None else p.detach()).float().cpu().clone()
    for name, b in module.named_buffers():
        out[name] = b.detach().float().cpu().clone()
    return out
