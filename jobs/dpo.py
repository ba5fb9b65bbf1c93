"""`raygpt dpo`: offline preference optimisation — DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023) — from
the comparisons file the reward model reads.

- Data: every K-wise ranking of the comparisons gives all its C(K,2) (chosen, rejected) pairs, the same pairs as
  the RM's K-wise loss (InstructGPT §3.5; `jobs/rlhf/preference.py`, `models.dpo.ranking_to_pairs`). Responses
  are tokenised as for SFT and the RM: prompt, response + EOS; log-probs are sums over the response tokens.
- Reference: the frozen SFT model. Its sequence log-probs of every pair are computed once, before training, by
  Ray tasks over shards of the pairs; the arrays travel to the trainers with the pairs, so the trainers hold one
  model (the policy) and never run the reference.
- Loss: `sigmoid` (DPO eq. 7) or `ipo` (IPO eq. 17, per-token normalised as TRL) — `models.dpo.preference_loss`.
  metrics.jsonl: loss, reward_chosen, reward_rejected, reward_margin (implicit rewards β·log π/π_ref) and
  accuracy, per step; the same on held-out comparisons (val_*) every `eval_every` steps.
- Training: the shared Ray Train + DeepSpeed engine (cluster/train/), with SFT's and the RM's checkpoint, exact
  resume and worker-failure behaviour (checkpoint.*, failure.*); the policy trains without dropout (π/π_ref is
  exactly 1 at step 0, as TRL disables dropout).
- After training: the held-out gold score and win rate against the SFT model, through the one evaluation
  (jobs/rlhf/evaluation.py), into summary.json.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from actors.base import disable_dropout
from cluster.runtime import init_ray
from cluster.train.engine import (
    CheckpointConfig,
    FailureConfig,
    FineTuneParallelConfig,
    OptimConfig,
    build_engine,
    init_worker,
    launch,
)
from cluster.train.loop import run_steps
from jobs.cli import JobSpec
from jobs.config import ConfigError, field
from jobs.data.examples import rank_slice
from jobs.data.tasks import TaskConfig, build_task
from jobs.rlhf.checkpoints import check_policy, finetune_start
from jobs.rlhf.evaluation import evaluate_checkpoints
from jobs.rlhf.preference import load_pairs, pair_batch, preference_loss_fn, reference_logprobs_on_ray
from jobs.runs import start_run
from models.checkpoint import load_checkpoint, read_config
from models.generation import SamplingParams


@dataclass
class DPODataSection:
    """Comparisons → pairs."""

    max_tokens: int = field(48, help="comparisons whose longest prompt+response+EOS exceeds this are dropped")
    seed: int = field(0, help="pair order seed (the order is a pure function of seed and step)")
    reference_workers: int = field(2, help="Ray tasks computing the reference log-probs (one shard of pairs each)")

    def validate(self) -> None:
        if self.max_tokens < 3:
            raise ConfigError(f"max_tokens: must be >= 3, got {self.max_tokens}")
        if self.reference_workers < 1:
            raise ConfigError(f"reference_workers: must be >= 1, got {self.reference_workers}")


@dataclass
class DPOOptimConfig(OptimConfig):
    """The engine's optimizer section with DPO defaults (a subclass: see jobs.sft.SFTOptimConfig)."""

    lr: float = field(5e-5, help="peak learning rate (after warmup)")
    min_lr_ratio: float = field(0.0, help="cosine decays to lr·min_lr_ratio at max_steps")
    max_steps: int = field(200, help="optimizer steps")
    micro_batch_size: int = field(16, help="pairs per micro-batch per data-parallel rank")
    weight_decay: float = field(0.0, help="AdamW decoupled weight decay on matrices")


@dataclass
class DPOEvalSection:
    """Gold score and win rate of the trained policy against the SFT model on held-out prompts (after training)."""

    prompts: int = field(128, help="held-out prompts (0 = skip)")
    sampling: SamplingParams = field(SamplingParams(), help="sampling")


@dataclass
class DPOConfig:
    """DPO / IPO from K-wise comparisons on Ray Train + DeepSpeed, against a frozen SFT reference."""

    name: str = field("dpo", help="run name: runs/<name>/")
    runs_root: str = field("runs", help="directory holding run directories")
    address: str | None = field(None, help="Ray cluster address (default: $RAY_ADDRESS, else an embedded cluster)")
    init_from: str = field("runs/sft/checkpoint", help="SFT checkpoint: the policy starts from it")
    reference: str | None = field(None, help="frozen reference checkpoint (default: init_from)")
    comparisons: str = field("runs/comparisons", help="comparisons file, or a directory with train.parquet "
                                                      "(+ heldout.parquet): what `raygpt rm` reads")
    heldout_comparisons: str = field("", help="comparisons for validation metrics ('' = heldout.parquet beside "
                                              "the train comparisons, if any)")
    loss: Literal["sigmoid", "ipo"] = field("sigmoid", help="sigmoid = DPO (Rafailov et al. 2023 eq. 7); ipo = IPO "
                                                            "(Azar et al. 2023 eq. 17)")
    beta: float = field(0.1, help="β: DPO's KL strength / IPO's τ")
    seed: int = field(0, help="seed")
    log_every: int = field(10, help="report metrics to the driver every N steps")
    eval_every: int = field(25, help="held-out pair metrics every N steps (and at the end)")
    task: TaskConfig = field(TaskConfig(), help="task: held-out prompts and the gold labeler of the final eval")
    data: DPODataSection = field(DPODataSection(), help="data")
    optim: DPOOptimConfig = field(DPOOptimConfig(), help="optimizer and batch (micro_batch_size counts pairs)")
    parallel: FineTuneParallelConfig = field(FineTuneParallelConfig(), help="workers and layout")
    checkpoint: CheckpointConfig = field(CheckpointConfig(), help="exact-resume checkpoints")
    failure: FailureConfig = field(FailureConfig(), help="fault tolerance")
    eval: DPOEvalSection = field(DPOEvalSection(), help="final held-out evaluation")

    def validate(self) -> None:
        if self.loss not in ("sigmoid", "ipo"):
            raise ConfigError(f"loss: unknown preference loss {self.loss!r}; expected 'sigmoid' or 'ipo'")
        if not self.beta > 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        if self.parallel.pipeline > 1:
            raise ConfigError("parallel.pipeline: DPO trains without pipeline parallelism (the engine pipelines "
                              "the LM objective only); use data/tensor parallelism")
        if self.log_every < 1 or self.eval_every < 1 or self.eval.prompts < 0:
            raise ConfigError("log_every/eval_every: must be >= 1; eval.prompts >= 0")
        if not self.comparisons:
            raise ConfigError("comparisons: a comparisons file or directory is required (`raygpt comparisons`)")


def comparison_files(cfg: DPOConfig) -> tuple[Path, Path | None]:
    """(train file, held-out file or None), as `raygpt rm` finds them."""
    p = Path(cfg.comparisons)
    if not p.exists():
        raise ConfigError(f"comparisons: no such file or directory {cfg.comparisons!r} (run `raygpt comparisons`)")
    train = p / "train.parquet" if p.is_dir() else p
    if not train.exists():
        raise ConfigError(f"comparisons: {p} has no train.parquet")
    if cfg.heldout_comparisons:
        held: Path | None = Path(cfg.heldout_comparisons)
        if not held.exists():
            raise ConfigError(f"heldout_comparisons: no such file {cfg.heldout_comparisons!r}")
    else:
        held = (p if p.is_dir() else p.parent) / "heldout.parquet"
        held = held if held.is_file() and held != train else None
    return train, held


# --- driver ---------------------------------------------------------------------------------------------------
def run(cfg: DPOConfig) -> dict[str, Any]:
    mcfg, tok_file, tokenizer = finetune_start(cfg.init_from, cfg.parallel, cfg.data.max_tokens)
    reference = cfg.reference or cfg.init_from
    check_policy(reference, "reference")
    if read_config(reference)[0].vocab_size != mcfg.vocab_size:
        raise ConfigError("reference: its vocabulary differs from init_from's (they must share the tokenizer)")
    train_file, held_file = comparison_files(cfg)
    # Everything is read and validated before anything is written or started.
    train, counts = load_pairs(train_file, tokenizer, cfg.data.max_tokens)
    val, val_counts = load_pairs(held_file, tokenizer, cfg.data.max_tokens) if held_file else ([], {})
    if not train:
        raise ConfigError(f"comparisons: no comparison of {train_file} fits data.max_tokens={cfg.data.max_tokens}")
    task = build_task(cfg.task) if cfg.eval.prompts else None
    run_dir = start_run(cfg, cfg.name, cfg.runs_root).resolve()
    init_ray(address=cfg.address)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "checkpoint": str(run_dir / "checkpoint"),
                               "comparisons": str(train_file.resolve()),
                               "heldout_comparisons": str(held_file.resolve()) if held_file else None,
                               "train_pairs": len(train), "train_comparisons": counts["comparisons"],
                               "dropped_too_long": counts["dropped_too_long"], "heldout_pairs": len(val),
                               **({"heldout_comparisons_count": val_counts["comparisons"]} if val_counts else {})}
    t0 = time.perf_counter()
    ref_dir = str(Path(reference).resolve())
    ref_train = reference_logprobs_on_ray(ref_dir, train, tokenizer.eos_id, cfg.data.reference_workers)
    ref_val = reference_logprobs_on_ray(ref_dir, val, tokenizer.eos_id, cfg.data.reference_workers)
    summary["reference_seconds"] = round(time.perf_counter() - t0, 2)
    loop_config = {"cfg": cfg, "train": train, "val": val, "ref_train": ref_train, "ref_val": ref_val,
                   "run_dir": str(run_dir), "init_from": str(Path(cfg.init_from).resolve()), "reference": ref_dir,
                   "tokenizer": str(Path(tok_file).resolve()), "pad_id": tokenizer.eos_id,
                   "resume_from": cfg.checkpoint.resume_from}
    t1 = time.perf_counter()
    result = launch(train_loop, loop_config, cfg.parallel, run_dir, cfg.failure.max_failures,
                    keep=cfg.checkpoint.keep, progress_steps=cfg.optim.max_steps)
    summary.update({k: v for k, v in (result.metrics or {}).items() if k != "rows"})
    summary["train_seconds"] = round(time.perf_counter() - t1, 2)
    rows = cfg.optim.micro_batch_size * cfg.optim.grad_accum * cfg.parallel.data_parallel()
    summary["pairs_per_s"] = cfg.optim.max_steps * rows / max(summary["train_seconds"], 1e-9)
    if task is not None:
        prompts = task.prompts("heldout")[:cfg.eval.prompts]
        comparison = evaluate_checkpoints({"sft": cfg.init_from, "dpo": run_dir / "checkpoint"}, prompts,
                                          cfg.eval.sampling, cfg.seed, gold=task.gold_scores, kl_reference="sft")
        summary["eval"] = comparison.metrics
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return summary


# --- worker ---------------------------------------------------------------------------------------------------
def train_loop(c: dict[str, Any]) -> None:
    """Per-worker loop on the shared engine; the objective is `preference_loss_fn`."""
    cfg: DPOConfig = c["cfg"]
    o = cfg.optim
    ctx = init_worker(cfg.parallel, cfg.seed)
    model = disable_dropout(load_checkpoint(c["init_from"], kind="lm"))
    engine = build_engine(model, o, cfg.parallel, ctx, resume_from=c["resume_from"],
                          faults=cfg.failure.plan(c["run_dir"]))
    loss_fn = functools.partial(preference_loss_fn, cfg.loss, cfg.beta)
    train, val = c["train"], c["val"]
    (ref_c, ref_r), (val_c, val_r) = c["ref_train"], c["ref_val"]
    rows = o.micro_batch_size * o.grad_accum

    def batch(pairs: list[Any], idx: list[int], rc: Any, rr: Any) -> dict[str, Any]:
        return pair_batch([pairs[i] for i in idx], c["pad_id"], rc[idx], rr[idx])

    val_idx = rank_slice(list(range(len(val))), ctx.dp_rank, max(1, len(val) // ctx.dp_size)) if val else []
    val_batches = [batch(val, val_idx[i:i + rows], val_c, val_r) for i in range(0, len(val_idx), rows)]

    def validate() -> dict[str, float]:
        if not val_batches:
            return {}
        return {f"val_{k}": v for k, v in engine.evaluate(val_batches, loss_fn).items()}

    run_steps(engine, len(train), lambda idx: batch(train, list(idx), ref_c, ref_r), loss_fn, max_steps=o.max_steps,
              seed=cfg.data.seed, validate=validate, eval_every=cfg.eval_every,
              checkpoint_every=cfg.checkpoint.every_n_steps, log_every=cfg.log_every,
              tokens_of=lambda b: int(b["chosen_mask"].sum() + b["rejected_mask"].sum()))
    engine.export(Path(c["run_dir"]) / "checkpoint", tokenizer=c["tokenizer"], kind="lm",
                  extra={"dpo": {"steps": engine.state.step, "init_from": c["init_from"], "reference": c["reference"],
                                 "loss": cfg.loss, "beta": cfg.beta, "train_pairs": len(train)}})


JOB = JobSpec(DPOConfig, run, "raygpt dpo")
main = JOB.main


if __name__ == "__main__":
    sys.exit(main())
