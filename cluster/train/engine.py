"""The training engine shared by pretraining, SFT and the reward model: Ray Train workers running DeepSpeed.

A job supplies a model and a per-micro-batch loss; the engine supplies everything else — the Ray Train launch,
the torch.distributed world (FileStore rendezvous on one machine), the DP × TP × PP topology, the DeepSpeed
engine (cluster/deepspeed_engine.py, the layer the PPO actors use too: ZeRO 0–3, gradient accumulation,
clipping, AdamW with decay on matrices only, warmup + cosine LR; fp32 on CPU, bf16 on GPU), exact-resume
checkpoints through `ray.train.report`, and the export of the final model as an HF GPT-2 directory. Config
sections live in cluster/train/config.py and are re-exported here.

Driver side (the job's `run(cfg)`):

    parallel.validate(); parallel.check_model(model_cfg)          # bad layouts fail before any worker starts
    result = launch(train_loop, {"cfg": cfg, ...}, parallel, run_dir, max_failures=cfg.failure.max_failures,
                    name="trainer_state", keep=cfg.checkpoint.keep)
    # metrics.jsonl in run_dir is written from the workers' reports (MetricsCallback) with a progress bar.

Worker side (`train_loop(loop_config)`, runs on every rank):

    ctx = init_worker(parallel, seed)                  # topology, TP/DP/PP groups, device, threads, seeds
    model = GPT(model_cfg)                             # same seed on every rank → identical initial weights
    engine = build_engine(model, optim, parallel, ctx, resume_from=cfg.checkpoint.resume_from,
                          faults=cfg.failure.plan(run_dir))   # failure.inject / failure.hold, if any
    # engine.state.step is 0, or the restored step (Ray's latest checkpoint after a failure, else resume_from)
    for step in range(engine.state.step, optim.max_steps):
        batch = {...}                                  # this DP rank's (micro_batch_size · grad_accum) rows
        metrics = engine.train_step(batch, loss_fn, tokens=n)   # loss_fn(model, micro_batch) -> (loss, metrics)
        engine.report(metrics, checkpoint=due)         # every rank saves, barrier, ray.train.report
    engine.export(run_dir / "checkpoint", tokenizer=...)   # gathers ZeRO-3 shards / TP shards / pipeline stages

`TrainEngine` wraps the DeepSpeed engine (`engine.ds`) and forwards unknown attributes to it, so
`engine.backward(loss)`, `engine.step()`, `engine.module` work as on a DeepSpeed engine.

Loss functions. `loss_fn(model, micro_batch) -> (loss, metrics)` where `model` is callable like the wrapped
module (it is the DeepSpeed engine) and `micro_batch` a dict of tensors already on the device; metrics are 0-d
tensors, averaged over micro-batches and data-parallel ranks. `lm_loss_fn` is the LM objective for batches
{"input_ids", "targets", optional "loss_mask"} (pretraining and SFT); `seq2seq_loss_fn` is T5's (span corruption
and text-to-text SFT). Pipeline parallelism runs only the LM objective on GPT models: DeepSpeed's PipelineModule
owns the forward pass, so the engine feeds it (input_ids, (targets, loss_mask)) and computes
`models.losses.lm_loss` on the last stage.

Exact resume. A checkpoint holds the DeepSpeed state (weights, optimizer, LR schedule), each rank's RNG state
and `trainer_state.json` (step, tokens, samples, the job's `extra` dict, the topology). Jobs derive the data
position from the step (`TokenDataset.batch_at(step, …)`), so N steps = N/2 steps + resume + N/2 steps. A
checkpoint saved at a different data-parallel size is converted to a DeepSpeed universal checkpoint first
(ZeRO partitions depend on the DP size); RNG and the data order then differ, so that resume is not bit-exact.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cluster.deepspeed_engine import EngineSpec, OptimConfig, collective_device, load_engine, save_engine
from cluster.deepspeed_engine import full_state_dict as ds_full_state_dict
from cluster.faults import FaultPlan
from cluster.train.config import (
    STATE_FILE,
    CheckpointConfig,
    FailureConfig,
    FineTuneParallelConfig,
    ParallelConfig,
)
from models.config import ConfigError
from models.files import write_json

# The job modules import the whole training API from here: the config sections are re-exported.
__all__ = ["OptimConfig", "ParallelConfig", "FineTuneParallelConfig", "CheckpointConfig", "FailureConfig",
           "WorkerContext", "init_worker", "TrainState", "TrainEngine", "build_engine", "lm_loss_fn",
           "seq2seq_loss_fn", "launch", "flops_per_token", "measure_peak_flops", "perplexity"]

Batch = dict[str, Tensor]
LossFn = Callable[[Any, Batch], tuple[Tensor, dict[str, Tensor]]]
DS_TAG = "ds"


# --- worker setup ---------------------------------------------------------------------------------------------
@dataclass
class WorkerContext:
    """This worker's place in the world (inside a Ray Train worker)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    parallel: ParallelConfig
    topology: Any  # cluster.distributed.Topology
    groups: Any  # cluster.distributed.ParallelState (DeepSpeed mpu)
    seed: int

    @property
    def dp_rank(self) -> int:
        return self.groups.data_rank

    @property
    def dp_size(self) -> int:
        return self.topology.dp


def init_worker(parallel: ParallelConfig, seed: int = 0) -> WorkerContext:
    """Topology + process groups + device + threads + the init seed (identical on all ranks)."""
    import torch.distributed as dist

    from cluster.distributed import ParallelState, Topology

    if not dist.is_initialized():
        raise RuntimeError("init_worker: call inside a Ray Train worker (torch.distributed is not initialised)")
    world, rank = dist.get_world_size(), dist.get_rank()
    topology = Topology.from_world(world, parallel.tensor, parallel.pipeline)
    groups = ParallelState(topology)
    if parallel.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(parallel.cpus_per_worker)
    _quiet_ray_train_logs()
    torch.manual_seed(seed)  # identical initial weights everywhere (TP shards and pipeline stages cut one model)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return WorkerContext(rank, world, local_rank, device, parallel, topology, groups, seed)


def _quiet_ray_train_logs() -> None:
    """Ray Train V2 logs every report (our reports carry up to log_every metrics rows) at INFO from a logger
    named after its source file; keep warnings only."""
    import logging

    try:
        from ray.train.v2._internal.execution import context, storage
    except ImportError:  # internal layout of another Ray version: keep its logs
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger(storage.__name__).setLevel(logging.WARNING)


def _dropout_seed(seed: int, data_rank: int, pipe_rank: int) -> int:
    # Data-parallel replicas see different data and need different dropout masks; tensor-parallel peers share
    # the seed because the dropout after their all-reduce acts on a replicated tensor and must agree.
    return (seed * 1_000_003 + data_rank * 7919 + pipe_rank * 104_729 + 1) % (2**63 - 1)


# --- the engine ------------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Counters that make a resume exact; `extra` is the job's own (JSON) state."""

    step: int = 0  # optimizer steps completed; the data position of pretraining
    tokens: int = 0  # tokens trained on, all ranks together
    samples: int = 0  # sequences trained on, all ranks together
    extra: dict[str, Any] = dc_field(default_factory=dict)


def lm_loss_fn(model: Any, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
    """The LM objective: batch {"input_ids" (B, T), "targets" (B, T), optional "loss_mask" (B, T)}."""
    from models.losses import lm_loss

    return lm_loss(model(batch["input_ids"]), batch["targets"], batch.get("loss_mask")), {}


def seq2seq_loss_fn(model: Any, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
    """The encoder-decoder (T5) objective, for span corruption and text-to-text fine-tuning alike: batch
    {"input_ids", "attention_mask" (B, S), "decoder_input_ids", "labels", "labels_mask" (B, T)} → token-mean
    cross-entropy over the target tokens (`models.span_corruption.seq2seq_loss`)."""
    from models.span_corruption import seq2seq_loss

    logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    return seq2seq_loss(logits, batch["labels"], batch["labels_mask"]), {}


def _pipe_lm_loss(logits: Tensor, labels: Tensor | tuple[Tensor, ...]) -> Tensor:
    from models.losses import lm_loss

    if isinstance(labels, (tuple, list)):
        return lm_loss(logits, labels[0], labels[1] if len(labels) > 1 else None)
    return lm_loss(logits, labels)


def _ray_checkpoint_dir(resume_from: str | None) -> tuple[Any, str | None]:
    """(Ray checkpoint or None, local directory or None): Ray's latest checkpoint of this run wins (a restart
    after a failure), else `resume_from`."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        return ckpt, None
    return None, resume_from


class TrainEngine:
    """A DeepSpeed engine plus the state a resume needs; see the module docstring."""

    def __init__(self, ds: Any, ctx: WorkerContext, optim: OptimConfig, model_cls: type, model_cfg: Any,
                 state: TrainState, pipeline: bool) -> None:
        self.ds, self.ctx, self.optim = ds, ctx, optim
        self.model_cls, self.model_cfg = model_cls, model_cfg
        self.state = state
        self.pipeline = pipeline
        self._rows: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:  # behave like the DeepSpeed engine for everything else
        return getattr(self.__dict__["ds"], name)

    @property
    def lr(self) -> float:
        return float(self.ds.optimizer.param_groups[0]["lr"]) if not self.pipeline else \
            float(self.ds.get_lr()[0])

    # -- training -------------------------------------------------------------------------------------------
    def _micro_batches(self, batch: Batch) -> list[Batch]:
        mbs, ga = self.optim.micro_batch_size, self.optim.grad_accum
        out = []
        for k, v in batch.items():
            if v.shape[0] != mbs * ga:
                raise ValueError(f"batch[{k!r}]: {v.shape[0]} rows, expected micro_batch_size × grad_accum = "
                                 f"{mbs} × {ga}")
        for i in range(ga):
            out.append({k: torch.as_tensor(v[i * mbs:(i + 1) * mbs]).to(self.ctx.device) for k, v in batch.items()})
        return out

    def train_step(self, batch: Batch, loss_fn: LossFn = lm_loss_fn, tokens: int | None = None) -> dict[str, float]:
        """One optimizer step on this rank's `batch` (micro_batch_size · grad_accum rows). Returns the loss and
        the loss_fn metrics averaged over micro-batches and data-parallel ranks, plus lr and grad_norm.
        `tokens`: tokens this rank trained on (default: numel of batch["input_ids"]), summed over DP ranks."""
        lr = self.lr
        micro = self._micro_batches(batch)
        self.ds.train()
        if self.pipeline:
            loss = self.ds.train_batch(iter(_pipe_items(micro)))
            sums: dict[str, Tensor] = {"loss": loss.detach().float().reshape(())}
            reduce_names: list[str] = []  # DeepSpeed already averaged the pipeline loss over DP ranks
        else:
            sums = {}
            for mb in micro:
                loss, metrics = loss_fn(self.ds, mb)
                self.ds.backward(loss)
                self.ds.step()
                for k, v in {"loss": loss, **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / len(micro)
            reduce_names = list(sums)
        out = self._dp_mean(sums, reduce_names)
        rows = next(iter(batch.values())).shape[0]
        n_tokens = tokens if tokens is not None else int(batch["input_ids"].numel()) if "input_ids" in batch else 0
        self.state.step += 1
        self.state.tokens += n_tokens * self.ctx.dp_size
        self.state.samples += rows * self.ctx.dp_size
        norm = self.ds.get_global_grad_norm() if hasattr(self.ds, "get_global_grad_norm") else None
        out["lr"] = lr
        if norm is not None:
            out["grad_norm"] = float(norm)
        return out

    @torch.no_grad()
    def evaluate(self, batches: list[Batch], loss_fn: LossFn = lm_loss_fn) -> dict[str, float]:
        """Mean loss (and loss_fn metrics) over `batches` (each micro_batch_size · grad_accum rows under
        pipeline parallelism), averaged over data-parallel ranks."""
        self.ds.eval()
        sums: dict[str, Tensor] = {}
        for batch in batches:
            if self.pipeline:
                loss = self.ds.eval_batch(iter(_pipe_items(self._micro_batches(batch))))
                values = {"loss": loss}
            else:
                b = {k: torch.as_tensor(v).to(self.ctx.device) for k, v in batch.items()}
                loss, metrics = loss_fn(self.ds, b)
                values = {"loss": loss, **metrics}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float().reshape(()) / len(batches)
        self.ds.train()
        return self._dp_mean(sums, [] if self.pipeline else list(sums))

    def _dp_mean(self, values: dict[str, Tensor], names: list[str]) -> dict[str, float]:
        import torch.distributed as dist

        out = {k: float(v) for k, v in values.items()}
        if names and self.ctx.dp_size > 1:
            group = self.ctx.groups.dp_group
            t = torch.stack([values[k].to(collective_device(group)) for k in names])  # cuda under nccl
            dist.all_reduce(t, group=group)
            out.update({k: float(x) / self.ctx.dp_size for k, x in zip(names, t.tolist())})
        return out

    # -- checkpoints -----------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Collective: DeepSpeed state + this rank's RNG (+ trainer_state.json on rank 0) into `directory`."""
        directory = Path(directory)
        save_engine(self.ds, directory, DS_TAG)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and self.ctx.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.ctx.device)
        torch.save(rng, directory / f"rng-{self.ctx.rank:05d}.pt")
        if self.ctx.rank == 0:
            topo = self.ctx.topology
            data = {**asdict(self.state), "world_size": self.ctx.world_size,
                    "topology": {"data": topo.dp, "tensor": topo.tp, "pipeline": topo.pp},
                    "zero_stage": self.ctx.parallel.zero_stage, "model": _model_fingerprint(self.model_cfg)}
            write_json(directory / STATE_FILE, data)

    def log(self, row: dict[str, Any]) -> None:
        """Buffer one metrics row for the current step (sent with the next `flush`). Ray Train accepts about
        one report per controller poll (2 s), so steps are reported in batches, one metrics.jsonl row each."""
        self._rows.append({"step": self.state.step, "tokens": self.state.tokens, **row})

    def flush(self, checkpoint: bool = False) -> None:
        """Collective: report the buffered rows (and a checkpoint when asked) through `ray.train.report`."""
        rows, self._rows = self._rows, []
        self.report({**(rows[-1] if rows else {}), "rows": rows}, checkpoint=checkpoint)

    def report(self, metrics: dict[str, Any], checkpoint: bool = False) -> None:
        """`ray.train.report` from every rank (a barrier); with checkpoint=True every rank first saves its part
        into a local directory that Ray Train merges into `trainer_state/step-XXXXXXXX/`."""
        import ray.train
        import torch.distributed as dist

        metrics = {**metrics, "step": self.state.step, "tokens": self.state.tokens}
        if not checkpoint:
            ray.train.report(metrics)
            return
        tmp = Path(tempfile.mkdtemp(prefix=f"raygpt-ckpt-{self.ctx.rank}-"))
        try:
            self.save(tmp)
            dist.barrier()
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=f"step-{self.state.step:08d}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _load(self, directory: Path, saved: dict[str, Any]) -> None:
        load_engine(self.ds, directory, DS_TAG)
        same_world = saved.get("world_size") == self.ctx.world_size
        rng_file = directory / f"rng-{self.ctx.rank:05d}.pt"
        if same_world and rng_file.is_file():
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.ctx.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.ctx.device)

    # -- export ---------------------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, Tensor] | None:
        """Collective: the whole model's state dict in models/ naming (fp32, CPU) on rank 0, None elsewhere.
        Gathers ZeRO partitions (fp32 master weights), tensor-parallel shards and pipeline stages."""
        import torch.distributed as dist

        local = self._local_full_params()  # this pipeline stage, TP-gathered, on every rank of the stage
        g = self.ctx.groups
        contribute = g.data_rank == 0 and g.tensor_rank == 0
        parts: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(parts, local if contribute else None)
        if self.ctx.rank != 0:
            return None
        merged: dict[str, Tensor] = {}
        for p in parts:
            if p:
                merged.update(p)
        return merged

    def _local_full_params(self) -> dict[str, Tensor]:
        sd = ds_full_state_dict(self.ds, remove_duplicate=True)  # ZeRO fp32 master weights of this shard/stage
        if self.pipeline:
            from models.pipeline import stage_state_dict

            sd = stage_state_dict(self.ds.module, sd)
        if self.ctx.topology.tp > 1:
            from models.parallel import gather_state_dict

            sd = gather_state_dict(sd, self.model_cfg, self.ctx.groups.tp_group, self.ctx.topology.tp,
                                   device=self.ctx.device)
        return sd

    def export(self, path: str | Path, tokenizer: Any = None, kind: str | None = None,
               extra: dict[str, Any] | None = None, model: nn.Module | None = None) -> Path | None:
        """Collective: write the full model as an HF GPT-2 directory at `path` (rank 0 writes; others return
        None). The model is rebuilt unsharded from `model_cls(model_cfg)` and checked to load strictly.
        T5 / ELMo (models/registry.py): rank 0 passes `model`, a fresh module of the same shape (ELMo's needs the
        tokenizer), and the directory is that architecture's format (`save_model`; `kind`/`extra` are GPT's)."""
        from models.checkpoint import save_checkpoint
        from models.config import arch_of

        sd = self.full_state_dict()
        if self.ctx.rank != 0:
            return None
        if arch_of(self.model_cfg) != "gpt":
            from models.registry import save_model

            if model is None:
                raise ValueError(f"export: a {arch_of(self.model_cfg)} model needs `model` (a fresh module)")
            for names in _tied_names(model):  # tied weights are gathered once, under their first name
                have = next((n for n in names if n in sd), None)
                for n in names:
                    if have is not None and n not in sd:
                        sd[n] = sd[have]
            model.load_state_dict(sd, strict=True)
            return save_model(model, path, tokenizer)
        model = self.model_cls(self.model_cfg)
        if getattr(self.model_cfg, "tie_embeddings", False) and "lm_head.weight" not in sd and \
                hasattr(model, "lm_head"):
            sd["lm_head.weight"] = sd["transformer.wte.weight"]
        model.load_state_dict(sd, strict=True)
        return save_checkpoint(model, path, kind=kind, tokenizer=tokenizer, extra=extra)


def _tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one tensor (e.g. T5's shared / embed_tokens / tied lm_head)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _pipe_items(micro: list[Batch]) -> list[tuple[Tensor, Any]]:
    items = []
    for mb in micro:
        labels = (mb["targets"], mb["loss_mask"]) if "loss_mask" in mb else mb["targets"]
        items.append((mb["input_ids"], labels))
    return items


def _model_fingerprint(cfg: Any) -> dict[str, Any]:
    # as JSON reads it back (ElmoConfig.filters is a tuple of tuples, a list of lists in trainer_state.json)
    return json.loads(json.dumps(cfg.to_dict())) if hasattr(cfg, "to_dict") else {}


def build_engine(model: nn.Module, optim: OptimConfig, parallel: ParallelConfig, ctx: WorkerContext,
                 resume_from: str | None = None, faults: FaultPlan | None = None) -> TrainEngine:
    """DeepSpeed engine for `model` (a GPT, or any module with `.config`; pipeline only for GPT), restored from
    Ray's latest checkpoint of this run (after a failure) or from `resume_from`. Call on every rank.

    `faults` (from `FailureConfig.plan(run_dir)`): when non-empty, the engine's `train_step` is wrapped with the
    planned crashes/holds of this worker (cluster/faults.py); otherwise nothing is wrapped."""
    from cluster.deepspeed_engine import adopt_process_group, initialize
    from cluster.faults import instrument_engine

    # deepspeed.comm must wrap Ray Train's process group before PipelineModule is built.
    adopt_process_group()
    model_cls, model_cfg = type(model), model.config
    parallel.check_model(model_cfg)

    restore_dir, saved, ray_ckpt_ctx = _find_restore(resume_from)
    load_universal = converter = False
    if saved is not None:
        _check_compatible(saved, model_cfg, ctx)
        if saved["topology"]["data"] != ctx.dp_size and saved.get("zero_stage", 0) > 0:
            restore_dir, converter = _to_universal(restore_dir, ctx)
            load_universal = True

    if ctx.topology.tp > 1:
        from models.parallel import shard_model

        shard_model(model, ctx.groups.tp_group, ctx.groups.tensor_rank, ctx.topology.tp)
    pipeline = ctx.topology.pp > 1
    if pipeline:
        from models.pipeline import to_pipeline

        model = to_pipeline(model, ctx.topology, _pipe_lm_loss, ctx.parallel.pipeline_partition,
                            tp_group=ctx.groups.tp_group if ctx.topology.tp > 1 else None)
    model.to(ctx.device)
    spec = EngineSpec(optim, zero_stage=parallel.zero_stage, precision=parallel.precision)
    ds = initialize(model, spec, dp_size=ctx.dp_size, use_gpu=parallel.use_gpu,
                    mpu=ctx.groups if not pipeline else None, load_universal=load_universal)
    torch.manual_seed(_dropout_seed(ctx.seed, ctx.dp_rank, ctx.groups.pipe_rank))
    engine = TrainEngine(ds, ctx, optim, model_cls, model_cfg, TrainState(), pipeline)
    if saved is not None:
        engine._load(Path(restore_dir), saved)
        engine.state = TrainState(step=saved["step"], tokens=saved["tokens"], samples=saved["samples"],
                                  extra=saved.get("extra", {}))
    if ray_ckpt_ctx is not None:
        ray_ckpt_ctx.__exit__(None, None, None)
    if load_universal:
        import torch.distributed as dist

        dist.barrier()  # everyone has loaded: the converted copy can go
        if converter:
            shutil.rmtree(restore_dir, ignore_errors=True)
    if faults:
        instrument_engine(engine, faults, ctx.rank, ctx.dp_size)
    return engine


def _find_restore(resume_from: str | None) -> tuple[str | None, dict[str, Any] | None, Any]:
    ckpt, local = _ray_checkpoint_dir(resume_from)
    ctx_manager = None
    if ckpt is not None:
        ctx_manager = ckpt.as_directory()
        local = ctx_manager.__enter__()
    if local is None:
        return None, None, None
    state_file = Path(local) / STATE_FILE
    if not state_file.is_file():
        raise ConfigError(f"checkpoint.resume_from: {local} has no {STATE_FILE}")
    return str(local), json.loads(state_file.read_text()), ctx_manager


def _check_compatible(saved: dict[str, Any], model_cfg: Any, ctx: WorkerContext) -> None:
    fp = _model_fingerprint(model_cfg)
    if saved.get("model") and fp and saved["model"] != fp:
        diff = sorted(k for k in fp if saved["model"].get(k) != fp[k])
        raise ConfigError(f"checkpoint: saved model differs from the configured one in {diff} "
                          "(use a new run name or matching model settings)")
    topo = saved["topology"]
    if (topo["tensor"], topo["pipeline"]) != (ctx.topology.tp, ctx.topology.pp):
        raise ConfigError(f"checkpoint: saved with tensor={topo['tensor']}, pipeline={topo['pipeline']}; this run "
                          f"has tensor={ctx.topology.tp}, pipeline={ctx.topology.pp} (only the data-parallel "
                          "size may change on resume)")


def _to_universal(directory: str, ctx: WorkerContext) -> tuple[str, bool]:
    """Convert a ZeRO checkpoint saved at another DP size into DeepSpeed's universal format. One conversion per
    Ray node (by its lowest rank) into node-local temp space; returns (directory to load with `load_universal`,
    whether this rank converted it and so removes it after loading)."""
    import hashlib

    import ray
    import torch.distributed as dist

    from cluster.deepspeed_engine import convert_to_universal

    node = ray.get_runtime_context().get_node_id()
    nodes: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(nodes, node)
    converter = nodes.index(node) == ctx.rank
    digest = hashlib.sha256(str(Path(directory).resolve()).encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"raygpt-universal-{digest}-{node[:16]}"
    if converter:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        convert_to_universal(Path(directory) / DS_TAG, out / DS_TAG)
    dist.barrier()
    return str(out), converter


# --- throughput and MFU ----------------------------------------------------------------------------------------
def flops_per_token(cfg: Any, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward = 3 × forward (PaLM, Chowdhery et al. 2022, App. B):
    6·N for the matmul parameters N (non-embedding weights + the V·C LM head, which is a matmul even when
    tied; the position/token lookups are not) plus 12·L·C·T for the attention scores and weighted sum."""
    n_matmul = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.n_embd
    return 6.0 * n_matmul + 12.0 * cfg.n_layer * cfg.n_embd * seq_len


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024,
                       seconds: float = 0.5) -> float:
    """Achievable matmul FLOP/s of this device/thread budget: timed n×n @ n×n products (the denominator of MFU
    when no peak is configured — a measured peak, so MFU here is relative to what a plain matmul attains)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    sync()
    return 2.0 * n**3 * iters / (time.perf_counter() - t0)


# --- driver side -------------------------------------------------------------------------------------------------
def launch(train_loop_per_worker: Callable[[dict[str, Any]], None], loop_config: dict[str, Any],
           parallel: ParallelConfig, run_dir: Path, max_failures: int, name: str = "trainer_state",
           keep: int = 2, progress_steps: int | None = None) -> Any:
    """Run `train_loop_per_worker(loop_config)` on Ray Train workers; returns the `ray.train.Result`.
    Implemented in cluster/train/launch.py (the driver side: TorchTrainer, metrics.jsonl callback, progress bar)."""
    from cluster.train.launch import launch as _launch

    return _launch(train_loop_per_worker, loop_config, parallel, run_dir, max_failures, name=name, keep=keep,
                   progress_steps=progress_steps)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))
