"""`raygpt pretrain`: GPT pretraining on Ray Train + DeepSpeed (ZeRO, tensor and pipeline parallel).

Each Ray Train worker reads only its data-parallel shard of the Parquet token dataset (jobs/data/
`TokenDataset`), runs the shared engine (cluster/train/engine.py) and reports per-step metrics; the driver writes
`runs/<name>/metrics.jsonl` and shows a progress bar, and the final model is exported to
`runs/<name>/checkpoint/` (an HF GPT-2 directory). Checkpoints for exact resume live in
`runs/<name>/trainer_state/step-XXXXXXXX/`; re-running the same name continues from the latest one.

Data: `data.dir` must be a prepared dataset (`raygpt tokenizer` + `raygpt prepare`), or, with
`data.prepare: true`, the job trains the tokenizer (if `data.tokenizer` is missing) and prepares `data.corpus`
into `data.dir` first — in the driver, before any worker starts. See docs/PRETRAIN.md.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.train.engine import (
    CheckpointConfig,
    FailureConfig,
    OptimConfig,
    ParallelConfig,
    flops_per_token,
    launch,
    measure_peak_flops,
    perplexity,
)
from jobs.cli import JobSpec
from jobs.config import ConfigError, field
from jobs.data.corpus import DataError
from jobs.data.tokens import prepare, read_meta
from jobs.data.vocabulary import train_tokenizer


@dataclass
class ModelSection:
    """Which transformer to train."""

    preset: str = field("tiny", help="models/config.py preset (nano, tiny, gpt2, gpt3-125m, …)")
    overrides: dict[str, Any] = field({}, help="GPTConfig fields replacing the preset's (vocab_size comes from "
                                               "the dataset's tokenizer)")
    init_from: str | None = field(None, help="start from this checkpoint directory instead of random weights")


@dataclass
class DataSection:
    """The Parquet token dataset."""

    dir: str = field("data/shakespeare", help="prepared dataset directory (raygpt prepare)")
    prepare: bool = field(False, help="if dir is missing: train the tokenizer (if missing) and prepare corpus into it")
    corpus: str = field("shakespeare", help="corpus for data.prepare ('shakespeare', 'pydoc', paths/globs)")
    tokenizer: str = field("runs/tokenizer/tokenizer.json", help="tokenizer.json (trained by data.prepare if missing)")
    vocab_size: int = field(4096, help="vocabulary size when data.prepare trains the tokenizer")
    seq_len: int | None = field(None, help="tokens per training sequence (default: the model's n_ctx)")
    seed: int = field(0, help="data order seed (the order is a pure function of seed and step)")


@dataclass
class EvalSection:
    """Validation on the held-out documents."""

    every_n_steps: int = field(50, help="validation loss/perplexity every N steps (and at step 0 and the end)")
    batches: int = field(4, help="validation batches (micro_batch_size · grad_accum sequences each) per rank")


@dataclass
class PretrainConfig:
    """Pretrain a GPT on a Parquet token dataset with Ray Train + DeepSpeed."""

    name: str = field("pretrain", help="run name: runs/<name>/")
    runs_root: str = field("runs", help="directory holding run directories")
    address: str | None = field(None, help="Ray cluster address (default: $RAY_ADDRESS, else an embedded cluster)")
    seed: int = field(0, help="weight-initialisation and dropout seed")
    log_every: int = field(10, help="report metrics to the driver every N steps (one metrics.jsonl row per step)")
    peak_flops: float | None = field(None, help="peak FLOP/s per worker for MFU (default: measured matmul)")
    model: ModelSection = field(ModelSection(), help="model")
    data: DataSection = field(DataSection(), help="data")
    optim: OptimConfig = field(OptimConfig(), help="optimizer, schedule and batch")
    parallel: ParallelConfig = field(ParallelConfig(), help="workers and DP × TP × PP layout")
    checkpoint: CheckpointConfig = field(CheckpointConfig(), help="exact-resume checkpoints")
    failure: FailureConfig = field(FailureConfig(), help="fault tolerance")
    eval: EvalSection = field(EvalSection(), help="validation")

    def validate(self) -> None:
        if self.log_every < 1:
            raise ConfigError(f"log_every: must be ≥ 1, got {self.log_every}")
        if self.eval.every_n_steps < 1 or self.eval.batches < 1:
            raise ConfigError("eval.every_n_steps/eval.batches: must be ≥ 1")
        if self.data.seq_len is not None and self.data.seq_len < 1:
            raise ConfigError(f"data.seq_len: must be ≥ 1, got {self.data.seq_len}")


# --- driver -----------------------------------------------------------------------------------------------------
def model_config(cfg: PretrainConfig, vocab_size: int | None = None, eos_id: int | None = None) -> Any:
    """GPTConfig from the preset, the overrides and the dataset's vocabulary; ConfigError naming the field."""
    from models.checkpoint import CheckpointError, read_config
    from models.config import GPTConfig, ModelConfigError

    try:
        if cfg.model.init_from:
            return read_config(cfg.model.init_from)[0]
        extra: dict[str, Any] = {}
        if vocab_size is not None:
            extra["vocab_size"] = vocab_size
        if eos_id is not None:
            extra.update(bos_token_id=eos_id, eos_token_id=eos_id)
        return GPTConfig.from_name(cfg.model.preset, **{**cfg.model.overrides, **extra})
    except (ModelConfigError, CheckpointError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None


def ensure_data(cfg: PretrainConfig) -> dict[str, Any]:
    """The dataset's meta.json; with data.prepare, build a missing dataset (and tokenizer) first."""
    d = Path(cfg.data.dir)
    if not d.exists():
        if not cfg.data.prepare:
            raise ConfigError(f"data.dir: {d} does not exist (run `raygpt tokenizer` and `raygpt prepare`, or set "
                              "data.prepare: true)")
        if not Path(cfg.data.tokenizer).is_file():
            train_tokenizer(cfg.data.corpus, cfg.data.vocab_size, cfg.data.tokenizer)
        prepare(cfg.data.corpus, cfg.data.tokenizer, str(d))
    try:
        return read_meta(d)
    except DataError as e:
        raise ConfigError(f"data.dir: {e}") from None


def check(cfg: PretrainConfig) -> tuple[Any, dict[str, Any]]:
    """Every check that can fail before a worker starts: data, model shape vs layout, sequence length."""
    meta = ensure_data(cfg)
    mcfg = model_config(cfg, meta["vocab_size"], meta.get("eos_id"))
    if mcfg.vocab_size != meta["vocab_size"]:
        raise ConfigError(f"model.init_from: vocab_size {mcfg.vocab_size} != the dataset's {meta['vocab_size']}")
    cfg.parallel.check_model(mcfg)
    seq = cfg.data.seq_len or mcfg.n_ctx
    if seq > mcfg.n_ctx:
        raise ConfigError(f"data.seq_len: {seq} exceeds the model's n_ctx={mcfg.n_ctx}")
    return mcfg, meta


def plan(cfg: PretrainConfig) -> str:
    from cluster.distributed import Topology

    topo = Topology.from_world(cfg.parallel.num_workers, cfg.parallel.tensor, cfg.parallel.pipeline)
    o = cfg.optim
    return (f"{topo.describe()}\nZeRO stage {cfg.parallel.zero_stage}; global batch = micro_batch_size "
            f"{o.micro_batch_size} × grad_accum {o.grad_accum} × data {topo.dp} = "
            f"{o.micro_batch_size * o.grad_accum * topo.dp} sequences")


def run(cfg: PretrainConfig) -> dict[str, Any]:
    """Train; returns a summary (also written to runs/<name>/summary.json). Faults to suffer (`failure.inject`,
    `failure.hold`) come with the config (cluster/faults.py)."""
    from cluster.runtime import init_ray
    from jobs.runs import start_run

    mcfg, meta = check(cfg)
    run_dir = start_run(cfg, cfg.name, cfg.runs_root).resolve()
    init_ray(address=cfg.address)
    t0 = time.perf_counter()
    loop_config = {
        "cfg": cfg, "model": mcfg.to_dict(), "run_dir": str(run_dir), "data_dir": str(Path(cfg.data.dir).resolve()),
        "tokenizer": _tokenizer_path(cfg, meta),
        "resume_from": str(Path(cfg.checkpoint.resume_from).resolve()) if cfg.checkpoint.resume_from else None,
        "init_from": str(Path(cfg.model.init_from).resolve()) if cfg.model.init_from else None,
    }
    result = launch(train_loop, loop_config, cfg.parallel, run_dir, cfg.failure.max_failures,
                    keep=cfg.checkpoint.keep, progress_steps=cfg.optim.max_steps)
    final = {k: v for k, v in (result.metrics or {}).items() if k != "rows"}
    summary = {"run_dir": str(run_dir), "checkpoint": str(run_dir / "checkpoint"),
               "wall_seconds": round(time.perf_counter() - t0, 2), **final}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return summary


def _tokenizer_path(cfg: PretrainConfig, meta: dict[str, Any]) -> str | None:
    for p in (cfg.data.tokenizer, meta.get("tokenizer", {}).get("path")):
        if p and Path(p).is_file():
            return str(Path(p).resolve())
    return None


# --- worker -------------------------------------------------------------------------------------------------------
def train_loop(c: dict[str, Any]) -> None:
    """Per-worker loop (see cluster/train/engine.py for the engine's contract)."""
    import torch
    import torch.distributed as dist

    from cluster.train.engine import build_engine, init_worker
    from jobs.data.tokens import TokenDataset
    from models.checkpoint import load_checkpoint
    from models.config import GPTConfig
    from models.gpt import GPT

    cfg: PretrainConfig = c["cfg"]
    o = cfg.optim
    mcfg = GPTConfig.from_dict(c["model"])
    ctx = init_worker(cfg.parallel, cfg.seed)
    model = load_checkpoint(c["init_from"], kind="lm") if c["init_from"] else GPT(mcfg)
    engine = build_engine(model, o, cfg.parallel, ctx, resume_from=c["resume_from"],
                          faults=cfg.failure.plan(c["run_dir"]))
    seq = cfg.data.seq_len or mcfg.n_ctx
    train = TokenDataset(c["data_dir"], "train", ctx.dp_rank, ctx.dp_size, block_size=seq, seed=cfg.data.seed)
    val = TokenDataset(c["data_dir"], "validation", ctx.dp_rank, ctx.dp_size, block_size=seq, shuffle=False)
    rows = o.micro_batch_size * o.grad_accum
    val_batches = [_lm_batch(val.batch_at(i, rows)) for i in range(cfg.eval.batches)]

    # MFU denominator: every rank times a matmul at once (they share the machine as they will in training).
    dist.barrier()
    peak = torch.tensor(cfg.peak_flops or measure_peak_flops(ctx.device), device=ctx.device)
    dist.all_reduce(peak)
    flops_tok = flops_per_token(mcfg, seq)

    def validate() -> dict[str, float]:
        loss = engine.evaluate(val_batches)["loss"]
        return {"val_loss": loss, "val_ppl": perplexity(loss)}

    if engine.state.step == 0:
        engine.log(validate())  # step-0 row: the untrained model's validation perplexity
    loop_t0, cpu_t0, loop_tokens = time.perf_counter(), time.process_time(), 0
    for step in range(engine.state.step, o.max_steps):
        batch = _lm_batch(train.batch_at(step, rows))
        t0 = time.perf_counter()
        m = engine.train_step(batch)
        dt = time.perf_counter() - t0
        step_tokens = batch["input_ids"].numel() * ctx.dp_size
        loop_tokens += step_tokens
        row = {**m, "tokens_per_s": step_tokens / dt, "mfu": step_tokens * flops_tok / dt / float(peak),
               "epoch": train.epoch_of(step * rows), "dp": ctx.dp_size,
               # wall and CPU (all threads of this worker) time of this attempt's loop so far
               "elapsed_s": time.perf_counter() - loop_t0, "cpu_s": time.process_time() - cpu_t0}
        s = engine.state.step
        if s % cfg.eval.every_n_steps == 0 or s == o.max_steps:
            row.update(validate())
        if s == o.max_steps:
            wall = time.perf_counter() - loop_t0
            row.update(loop_tokens_per_s=loop_tokens / wall, loop_mfu=loop_tokens * flops_tok / wall / float(peak),
                       peak_flops=float(peak))
        engine.log(row)
        due = s % cfg.checkpoint.every_n_steps == 0 or s == o.max_steps
        if due or s % cfg.log_every == 0:
            engine.flush(checkpoint=due)
    engine.export(Path(c["run_dir"]) / "checkpoint", tokenizer=c["tokenizer"],
                  extra={"pretrain": {"steps": engine.state.step, "tokens": engine.state.tokens}})


def _lm_batch(block: Any) -> dict[str, Any]:
    import torch

    t = torch.from_numpy(block).long()
    return {"input_ids": t[:, :-1], "targets": t[:, 1:]}


JOB = JobSpec(PretrainConfig, run, "raygpt pretrain", plan=plan)
main = JOB.main


if __name__ == "__main__":
    sys.exit(main())
