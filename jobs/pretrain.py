"""`raygpt pretrain`: language-model pretraining on Ray Train + DeepSpeed — GPT-1/2/3 (ZeRO, tensor and pipeline
parallel), T5 and ELMo (`model.arch`; data parallel + ZeRO only).

Each Ray Train worker reads only its data-parallel shard of the Parquet token dataset (jobs/data/
`TokenDataset`), runs the shared engine (cluster/train/engine.py) and reports per-step metrics; the driver writes
`runs/<name>/metrics.jsonl` and shows a progress bar, and the final model is exported to
`runs/<name>/checkpoint/` in the architecture's own format (models/registry.py `save_model`: HF GPT-2, HF OpenAI GPT
for GPT-1, HF T5, raygpt-elmo). Checkpoints for exact resume live in
`runs/<name>/trainer_state/step-XXXXXXXX/`; re-running the same name continues from the latest one.

Data: `data.dir` must be a prepared dataset (`raygpt tokenizer` + `raygpt prepare`), or, with
`data.prepare: true`, the job trains the tokenizer (if `data.tokenizer` is missing) and prepares `data.corpus`
into `data.dir` first — in the driver, before any worker starts. See docs/PRETRAIN.md.

Objectives (docs/MODELS.md), all on the same packed windows of `data.seq_len` tokens:
- gpt: next-token cross-entropy (GPT §3.1);
- t5: span corruption (Raffel et al. 2020 §3.1.4) applied to every window as the data transform, seeded by
  (data.seed, step, data rank, row) so a resumed run corrupts exactly the same spans; then the seq2seq loss;
- elmo: the biLM loss, mean of the forward and backward NLL (Peters et al. 2018 §3.1).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cluster.distributed import Topology
from cluster.runtime import init_ray
from cluster.train.engine import (
    CheckpointConfig,
    FailureConfig,
    OptimConfig,
    ParallelConfig,
    build_engine,
    flops_per_token,
    init_worker,
    launch,
    lm_loss_fn,
    measure_peak_flops,
    perplexity,
    seq2seq_loss_fn,
)
from jobs.cli import JobSpec
from jobs.config import ConfigError, field
from jobs.data.corpus import DataError
from jobs.data.reader import check_dataset
from jobs.data.tokens import TokenDataset, prepare, read_meta
from jobs.data.vocabulary import train_tokenizer
from jobs.runs import start_run
from models.checkpoint import CheckpointError, load_checkpoint, read_config
from models.config import ModelConfigError, arch_of, config_class
from models.elmo import bilm_loss
from models.registry import T5_SENTINELS, build_model, check_parallel, load_model, model_vocab_size
from models.span_corruption import sentinel_ids, span_corruption_batch
from models.tokenizer import Tokenizer

NOISE_DENSITY, MEAN_SPAN = 0.15, 3.0  # T5 §3.1.4 / §3.3.4: 15 % of tokens dropped in spans of mean length 3


@dataclass
class ModelSection:
    """Which language model to train."""

    arch: str = field("gpt", help="gpt (GPT-1/2/3, chosen by preset) | t5 | elmo")
    preset: str = field("tiny", help="models/config.py preset of the arch (gpt: nano, tiny, gpt1, gpt2, "
                                     "gpt3-125m, …; t5: t5-nano, t5-tiny, t5-small, t5-v1_1-small, …; elmo: "
                                     "elmo-nano, elmo-tiny, elmo)")
    overrides: dict[str, Any] = field({}, help="config fields replacing the preset's (vocab_size and the special "
                                               "token ids come from the dataset's tokenizer)")
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
        # arch × layout, before the data is touched or a worker starts (T5/ELMo: data parallel + ZeRO only)
        try:
            config_class(self.model.arch)
        except ModelConfigError as e:
            raise ConfigError(f"model.{e}") from None
        check_parallel(self.model.arch, self.parallel.tensor, self.parallel.pipeline)


# --- driver -----------------------------------------------------------------------------------------------------
def model_config(cfg: PretrainConfig, vocab_size: int | None = None, eos_id: int | None = None) -> Any:
    """GPTConfig | T5Config | ElmoConfig from the preset, the overrides and the dataset's vocabulary (T5: plus
    its 100 sentinel ids; EOS doubles as T5's pad and decoder-start id); ConfigError naming the field."""

    arch = cfg.model.arch
    try:
        if cfg.model.init_from:
            mcfg = read_config(cfg.model.init_from)[0] if arch == "gpt" else load_model(cfg.model.init_from).config
            if arch_of(mcfg) != arch:
                raise ConfigError(f"model.init_from: {cfg.model.init_from} is a {arch_of(mcfg)} checkpoint, "
                                  f"model.arch is {arch!r}")
            return mcfg
        extra: dict[str, Any] = {}
        if vocab_size is not None:
            extra["vocab_size"] = model_vocab_size(arch, vocab_size)
        if eos_id is not None:
            extra.update({"gpt": dict(bos_token_id=eos_id, eos_token_id=eos_id),
                          "t5": dict(eos_token_id=eos_id, pad_token_id=eos_id, decoder_start_token_id=eos_id),
                          "elmo": dict(eos_token_id=eos_id)}[arch])
        return config_class(arch).from_name(cfg.model.preset, **{**cfg.model.overrides, **extra})
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
    want = model_vocab_size(cfg.model.arch, meta["vocab_size"])
    if mcfg.vocab_size != want:
        raise ConfigError(f"model.init_from: vocab_size {mcfg.vocab_size} != the dataset's {want}")
    cfg.parallel.check_model(mcfg)
    seq = cfg.data.seq_len or mcfg.n_ctx
    if seq > mcfg.n_ctx:
        raise ConfigError(f"data.seq_len: {seq} exceeds the model's n_ctx={mcfg.n_ctx}")
    if cfg.model.arch == "t5":
        spans = max(round(round(seq * NOISE_DENSITY) / MEAN_SPAN), 1)
        if seq < 2 or spans > T5_SENTINELS:
            raise ConfigError(f"data.seq_len: span corruption of {seq}-token windows needs 2 ≤ seq_len and at most "
                              f"{T5_SENTINELS} spans (got {spans})")
    if cfg.model.arch == "elmo" and not _tokenizer_path(cfg, meta):
        raise ConfigError(f"data.tokenizer: {cfg.data.tokenizer} not found; ELMo's byte-CNN needs the tokenizer")
    try:  # unreadable shards, another tokenizer, a rank with less than one sequence: now, not in a worker
        check_dataset(cfg.data.dir, tokenizer=_tokenizer_path(cfg, meta), block_size=seq,
                      world_size=cfg.parallel.data_parallel())
    except DataError as e:
        raise ConfigError(f"data.dir: {e}") from None
    return mcfg, meta


def plan(cfg: PretrainConfig) -> str:

    topo = Topology.from_world(cfg.parallel.num_workers, cfg.parallel.tensor, cfg.parallel.pipeline)
    o = cfg.optim
    return (f"{topo.describe()}\nZeRO stage {cfg.parallel.zero_stage}; global batch = micro_batch_size "
            f"{o.micro_batch_size} × grad_accum {o.grad_accum} × data {topo.dp} = "
            f"{o.micro_batch_size * o.grad_accum * topo.dp} sequences")


def run(cfg: PretrainConfig) -> dict[str, Any]:
    """Train; returns a summary (also written to runs/<name>/summary.json). Faults to suffer (`failure.inject`,
    `failure.hold`) come with the config (cluster/faults.py)."""

    mcfg, meta = check(cfg)
    run_dir = start_run(cfg, cfg.name, cfg.runs_root).resolve()
    init_ray(address=cfg.address)
    t0 = time.perf_counter()
    loop_config = {
        "cfg": cfg, "arch": cfg.model.arch, "model": mcfg.to_dict(), "run_dir": str(run_dir),
        "data_dir": str(Path(cfg.data.dir).resolve()),
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
    """The tokenizer the checkpoint ships: the one the dataset was prepared with (meta.json), else data.tokenizer.
    (data.tokenizer's default path may hold another run's tokenizer; check() refuses one whose hash differs.)"""
    for p in (meta.get("tokenizer", {}).get("path"), cfg.data.tokenizer):
        if p and Path(p).is_file():
            return str(Path(p).resolve())
    return None


# --- worker -------------------------------------------------------------------------------------------------------
def train_loop(c: dict[str, Any]) -> None:
    """Per-worker loop (see cluster/train/engine.py for the engine's contract)."""


    cfg: PretrainConfig = c["cfg"]
    o = cfg.optim
    arch = c.get("arch", "gpt")
    mcfg = config_class(arch).from_dict(c["model"])
    ctx = init_worker(cfg.parallel, cfg.seed)
    tokenizer = Tokenizer.from_file(c["tokenizer"]) if arch == "elmo" else None
    if arch == "gpt":
        model = load_checkpoint(c["init_from"], kind="lm") if c["init_from"] else build_model(mcfg)
    else:
        model = load_model(c["init_from"]) if c["init_from"] else build_model(mcfg, tokenizer)
    engine = build_engine(model, o, cfg.parallel, ctx, resume_from=c["resume_from"],
                          faults=cfg.failure.plan(c["run_dir"]))
    seq = cfg.data.seq_len or mcfg.n_ctx
    train = TokenDataset(c["data_dir"], "train", ctx.dp_rank, ctx.dp_size, block_size=seq, seed=cfg.data.seed)
    val = TokenDataset(c["data_dir"], "validation", ctx.dp_rank, ctx.dp_size, block_size=seq, shuffle=False)
    rows = o.micro_batch_size * o.grad_accum
    objective = Objective(arch, mcfg, seq, cfg.data.seed, ctx.dp_rank, ctx.dp_size, rows)
    val_batches = [objective.batch(val.batch_at(i, rows), VALIDATION_STEP - i) for i in range(cfg.eval.batches)]

    # MFU denominator: every rank times a matmul at once (they share the machine as they will in training).
    dist.barrier()
    peak = torch.tensor(cfg.peak_flops or measure_peak_flops(ctx.device), device=ctx.device)
    dist.all_reduce(peak)
    flops_tok = flops_per_token(mcfg, seq) if arch == "gpt" else None  # the 6N + attention count is a GPT's

    def validate() -> dict[str, float]:
        loss = engine.evaluate(val_batches, objective.loss_fn)["loss"]
        return {"val_loss": loss, "val_ppl": perplexity(loss)}

    if engine.state.step == 0:
        engine.log(validate())  # step-0 row: the untrained model's validation perplexity
    loop_t0, cpu_t0, loop_tokens = time.perf_counter(), time.process_time(), 0
    for step in range(engine.state.step, o.max_steps):
        batch = objective.batch(train.batch_at(step, rows), step)
        t0 = time.perf_counter()
        m = engine.train_step(batch, objective.loss_fn, tokens=objective.tokens)
        dt = time.perf_counter() - t0
        step_tokens = objective.tokens * ctx.dp_size
        loop_tokens += step_tokens
        row = {**m, "tokens_per_s": step_tokens / dt, "epoch": train.epoch_of(step * rows), "dp": ctx.dp_size,
               # wall and CPU (all threads of this worker) time of this attempt's loop so far
               "elapsed_s": time.perf_counter() - loop_t0, "cpu_s": time.process_time() - cpu_t0}
        if flops_tok is not None:
            row["mfu"] = step_tokens * flops_tok / dt / float(peak)
        s = engine.state.step
        if s % cfg.eval.every_n_steps == 0 or s == o.max_steps:
            row.update(validate())
        if s == o.max_steps:
            wall = time.perf_counter() - loop_t0
            row.update(loop_tokens_per_s=loop_tokens / wall, peak_flops=float(peak))
            if flops_tok is not None:
                row["loop_mfu"] = loop_tokens * flops_tok / wall / float(peak)
        engine.log(row)
        due = s % cfg.checkpoint.every_n_steps == 0 or s == o.max_steps
        if due or s % cfg.log_every == 0:
            engine.flush(checkpoint=due)
    # rank 0 writes the export: an unsharded module of the same architecture receives the gathered weights
    fresh = build_model(mcfg, tokenizer or _export_tokenizer(c)) if arch != "gpt" and ctx.rank == 0 else None
    engine.export(Path(c["run_dir"]) / "checkpoint", tokenizer=c["tokenizer"], model=fresh,
                  extra={"pretrain": {"steps": engine.state.step, "tokens": engine.state.tokens}})


VALIDATION_STEP = -1  # span-corruption seeds of validation batch i: step −1 − i (never a training step)


class Objective:
    """The pre-training batches and loss of one architecture on this data rank's packed windows (rows, seq + 1).

    gpt: inputs = window[:-1], targets = window[1:] — unchanged from the GPT-only job (bit-identical numbers).
    t5: span corruption of each window[:seq] (the data transform, T5 §3.1.4); row i of step s on data rank r is
    seeded with `t5_seed(data_seed, s, r, dp_size, rows) + i`, so a resumed or restarted run draws the same spans.
    Corrupting a fixed length L gives fixed lengths (L − noise + spans + 1 encoder tokens), so no padding.
    elmo: window[:seq] for both directions of the biLM."""

    def __init__(self, arch: str, mcfg: Any, seq: int, data_seed: int, dp_rank: int, dp_size: int, rows: int
                 ) -> None:
        self.arch, self.mcfg, self.seq, self.rows = arch, mcfg, seq, rows
        self.data_seed, self.dp_rank, self.dp_size = data_seed, dp_rank, dp_size
        self.tokens = rows * seq  # tokens of text this rank trains on per step
        self.loss_fn = {"gpt": lm_loss_fn, "t5": seq2seq_loss_fn, "elmo": elmo_loss_fn}[arch]

    def batch(self, block: Any, step: int) -> dict[str, Any]:
        if self.arch == "gpt":
            return _lm_batch(block)
        windows = torch.from_numpy(block[:, :self.seq]).long()
        if self.arch == "elmo":
            return {"input_ids": windows}
        c = self.mcfg
        b = span_corruption_batch(list(windows), sentinel_ids(c.vocab_size, T5_SENTINELS), c.eos_token_id,
                                  c.pad_token_id, c.decoder_start_token_id,
                                  t5_seed(self.data_seed, step, self.dp_rank, self.dp_size, self.rows), NOISE_DENSITY,
                                  MEAN_SPAN)
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask,
                "decoder_input_ids": b.decoder_input_ids, "labels": b.labels, "labels_mask": b.labels_mask}


def t5_seed(data_seed: int, step: int, dp_rank: int, dp_size: int, rows: int) -> int:
    """First row seed of a step's span corruption on one data rank (rows take base + i). torch's CPU generator
    keeps only the low 32 bits of a seed, so seeds are laid out mod 2**32: row (step, rank, i) of one run gets
    (step·dp_size + rank)·rows + i, distinct until 2**32 rows have been corrupted; data.seed shifts the sequence."""
    return (data_seed * 0x9E3779B1 + (step * dp_size + dp_rank) * rows) % (1 << 32)


def elmo_loss_fn(model: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The biLM loss (models.elmo.bilm_loss) and its two directions' NLLs as metrics."""
    ids = batch["input_ids"]
    return bilm_loss(*model(ids), ids)


def _export_tokenizer(c: dict[str, Any]) -> Any:
    return Tokenizer.from_file(c["tokenizer"]) if c.get("tokenizer") else None


def _lm_batch(block: Any) -> dict[str, Any]:

    t = torch.from_numpy(block).long()
    return {"input_ids": t[:, :-1], "targets": t[:, 1:]}


JOB = JobSpec(PretrainConfig, run, "raygpt pretrain", plan=plan)
main = JOB.main


if __name__ == "__main__":
    sys.exit(main())
