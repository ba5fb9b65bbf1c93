"""`raygpt rm`: the reward model (InstructGPT §3.5 "Reward modeling").

- Initialised from the SFT checkpoint with the unembedding removed and a fresh scalar head
  (`models.checkpoint.load_checkpoint(sft, kind="reward")`); r(x, y) is the head's output at the last token.
- Input: prompt_ids + response_ids + [EOS] (`jobs.sft.encode_example`), so the reward is read at the EOS that ends
  every response. PPO's reward role must score sequences the same way (append EOS to truncated responses).
- Loss: InstructGPT eq. 1 via `models.losses.kwise_ranking_loss`. One batch element = one prompt with its K ranked
  responses: K forward passes give all C(K,2) comparisons, averaged into that element's loss — the paper's remedy
  for overfitting when each comparison is a separate, highly correlated element. Prompts with different K may share
  a batch (each K group is one loss call, weighted by its number of prompts).
- Normalisation: after training, the reward is shifted so the task's demonstrations score 0 on average
  ("we normalize the reward model using a bias so that the labeler demonstrations achieve a mean score of 0 before
  doing RL", §3.5). The shift is folded into the weights (`fold_reward_offset`), so the checkpoint gives
  normalised rewards in raygpt and in transformers' GPT2ForSequenceClassification alike; config.json's
  raygpt.reward_normalization records the offset and where it went.

Training runs on the shared Ray Train + DeepSpeed engine (cluster/train/). Comparisons come from a file or
directory (Parquet/JSONL: prompt, responses, ranking) or, when none is given, are sampled from the SFT model on
Ray workers first (jobs/rlhf/sampling.py) into runs/<name>/comparisons/. Everything is validated before training starts.

Ensemble (`ensemble: N`, issue 17; Coste et al. 2023): N reward models on the same comparisons, member i with head
seed `seed + i` and data order `data.seed + i`, each normalised on the same demonstrations. Member 0 is
runs/<name>/checkpoint as without an ensemble; members 1… are runs/<name>/members/<i>/checkpoint, listed in
checkpoint/ensemble.json (models/ensemble.py), so one path names the whole ensemble and every single-RM reader
still reads member 0. Cost: N trainings, one after another.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from actors.reward import score_sequences
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
from jobs.data.examples import encode_example, load_elements, rank_slice, rm_batch
from jobs.data.tasks import TaskConfig, build_task
from jobs.data.tasks.base import stable_unit
from jobs.rlhf.checkpoints import finetune_start
from jobs.rlhf.reward_model import REWARD_INPUT, fold_reward_offset, offset_norm_name, rm_loss_fn
from jobs.rlhf.sampling import GenerateSection, generate_comparisons
from jobs.runs import start_run
from models.checkpoint import load_checkpoint, save_checkpoint
from models.ensemble import write_ensemble
from models.heads import RewardModel


@dataclass
class RMDataSection:
    """Comparisons → token sequences."""

    max_tokens: int = field(48, help="prompts whose longest prompt+response+EOS exceeds this are dropped")
    seed: int = field(0, help="data order seed")

    def validate(self) -> None:
        if self.max_tokens < 3:
            raise ConfigError(f"max_tokens: must be >= 3, got {self.max_tokens}")


@dataclass
class RMOptimConfig(OptimConfig):
    """The engine's optimizer section with reward-model defaults (a subclass: see jobs.sft.SFTOptimConfig)."""

    lr: float = field(1e-3, help="peak learning rate (after warmup)")
    max_steps: int = field(256, help="optimizer steps (tiny defaults: 1 epoch of 4,096 prompts; InstructGPT §C "
                                     "trains the RM for a single epoch)")
    micro_batch_size: int = field(8, help="prompts per micro-batch per rank, each with its K responses")
    weight_decay: float = field(0.0, help="AdamW decoupled weight decay on matrices")


@dataclass
class RMConfig:
    """Train the K-wise reward model from SFT on ranked comparisons; normalise it on the demonstrations."""

    name: str = field("rm", help="run name: runs/<name>/")
    runs_root: str = field("runs", help="directory holding run directories")
    address: str | None = field(None, help="Ray cluster address (default: $RAY_ADDRESS, else an embedded cluster)")
    init_from: str = field("runs/sft/checkpoint", help="SFT checkpoint: the RM starts from it (unembedding removed)")
    comparisons: str = field("", help="K-wise or pairwise preferences: a file, directory or glob (docs/DATA.md), "
                                      "or a directory with train.parquet (+ heldout.parquet); "
                                      "'' = sample them now from init_from into runs/<name>/comparisons/")
    heldout_comparisons: str = field("", help="comparisons for validation accuracy ('' = heldout.parquet beside "
                                              "the train comparisons, if any)")
    seed: int = field(0, help="head initialisation and dropout seed")
    ensemble: int = field(1, help="reward models trained (seeds seed+i, data.seed+i): >1 writes an ensemble "
                                  "checkpoint (checkpoint/ensemble.json; PPO's mitigation.ensemble)")
    log_every: int = field(10, help="report metrics to the driver every N steps")
    eval_every: int = field(25, help="held-out accuracy every N steps (and at the end)")
    normalize_demonstrations: int = field(512, help="demonstrations whose mean reward is set to 0 (0 = no "
                                                    "normalisation)")
    task: TaskConfig = field(TaskConfig(), help="task: labeler for sampled comparisons, demonstrations")
    generate: GenerateSection = field(GenerateSection(), help="sampling comparisons when none are given")
    data: RMDataSection = field(RMDataSection(), help="data")
    optim: RMOptimConfig = field(RMOptimConfig(), help="optimizer and batch (micro_batch_size counts prompts)")
    parallel: FineTuneParallelConfig = field(FineTuneParallelConfig(), help="workers and layout")
    checkpoint: CheckpointConfig = field(CheckpointConfig(), help="exact-resume checkpoints")
    failure: FailureConfig = field(FailureConfig(), help="fault tolerance")

    def validate(self) -> None:
        if self.parallel.pipeline > 1:
            raise ConfigError("parallel.pipeline: the reward model trains without pipeline parallelism (the "
                              "engine pipelines the LM objective only); use data/tensor parallelism")
        if self.ensemble < 1:
            raise ConfigError(f"ensemble: must be >= 1, got {self.ensemble}")
        if self.log_every < 1 or self.eval_every < 1 or self.normalize_demonstrations < 0:
            raise ConfigError("log_every/eval_every: must be >= 1; normalize_demonstrations >= 0")


# --- data (pure, testable without Ray) -------------------------------------------------------------------------


def normalisation_sequences(cfg: RMConfig, tokenizer: Any) -> list[list[int]]:
    """The `normalize_demonstrations` demonstrations (chosen by hash) as RM inputs."""
    if not cfg.normalize_demonstrations:
        return []
    demos = build_task(cfg.task).demonstrations()
    demos = sorted(demos, key=lambda d: stable_unit(d.prompt + "\0" + d.response, "rm-norm"))
    seqs = [sum(encode_example(tokenizer, d.prompt, d.response), []) for d in demos]
    return [s for s in seqs if len(s) <= cfg.data.max_tokens][:cfg.normalize_demonstrations]


def _comparison_files(cfg: RMConfig) -> tuple[Path | None, Path | None]:
    if not cfg.comparisons:
        return None, None
    p = Path(cfg.comparisons)
    generated = p.is_dir() and (p / "train.parquet").is_file()  # the layout `raygpt rm` samples into
    train = p / "train.parquet" if generated else p  # else a file, a directory of user files, or a glob
    if cfg.heldout_comparisons:
        held: Path | None = Path(cfg.heldout_comparisons)
    elif p.is_dir() and not generated:
        held = None
    else:
        held = (p if p.is_dir() else p.parent) / "heldout.parquet"
        held = held if held.is_file() and held != train else None
    return train, held


# --- driver ---------------------------------------------------------------------------------------------------
def run(cfg: RMConfig) -> dict[str, Any]:

    mcfg, tok_file, tokenizer = finetune_start(cfg.init_from, cfg.parallel, cfg.data.max_tokens)
    try:
        offset_norm_name(mcfg)  # where the reward normalisation will be folded (GPT-1: the last block's ln_2)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    train_file, held_file = _comparison_files(cfg)
    # Validate given comparisons and the task before anything is written or started.
    given = {}
    for label, f in (("train", train_file), ("heldout", held_file)):
        if f is not None:
            given[label] = load_elements(f, tokenizer, cfg.data.max_tokens)
    norm = normalisation_sequences(cfg, tokenizer)
    run_dir = start_run(cfg, cfg.name, cfg.runs_root).resolve()
    init_ray(address=cfg.address)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "checkpoint": str(run_dir / "checkpoint")}
    if train_file is None:
        gen_dir = run_dir / "comparisons"
        summary["generated"] = generate_comparisons(cfg.init_from, cfg.task, cfg.generate, gen_dir)
        train_file = gen_dir / "train.parquet"
        held_file = gen_dir / "heldout.parquet" if (gen_dir / "heldout.parquet").is_file() else None
        for label, f in (("train", train_file), ("heldout", held_file)):
            if f is not None:
                given[label] = load_elements(f, tokenizer, cfg.data.max_tokens)
    train, dropped = given["train"]
    val = given.get("heldout", ([], 0))[0]
    if not train:
        raise ConfigError(f"comparisons: no comparison of {train_file} fits data.max_tokens={cfg.data.max_tokens}")
    summary.update(comparisons=str(train_file.resolve()),
                   heldout_comparisons=str(held_file.resolve()) if held_file else None,
                   train_prompts=len(train), dropped_too_long=dropped, heldout_prompts=len(val))
    t0 = time.perf_counter()
    loop_config = {"cfg": cfg, "train": train, "val": val, "norm": norm, "run_dir": str(run_dir),
                   "init_from": str(Path(cfg.init_from).resolve()), "tokenizer": str(Path(tok_file).resolve()),
                   "pad_id": tokenizer.eos_id, "resume_from": cfg.checkpoint.resume_from,
                   "sources": {"comparisons": summary["comparisons"],
                               "heldout_comparisons": summary["heldout_comparisons"]}}
    result = launch(train_loop, loop_config, cfg.parallel, run_dir, cfg.failure.max_failures,
                    keep=cfg.checkpoint.keep, progress_steps=cfg.optim.max_steps)
    summary.update({k: v for k, v in (result.metrics or {}).items() if k != "rows"})
    members = []
    for i in range(1, cfg.ensemble):  # the other ensemble members: same data, other seeds
        member = replace(cfg, seed=cfg.seed + i, data=replace(cfg.data, seed=cfg.data.seed + i))
        member_dir = run_dir / "members" / str(i)
        member_dir.mkdir(parents=True, exist_ok=True)
        res = launch(train_loop, {**loop_config, "cfg": member, "run_dir": str(member_dir), "resume_from": None},
                     cfg.parallel, member_dir, cfg.failure.max_failures, keep=cfg.checkpoint.keep,
                     progress_steps=cfg.optim.max_steps)
        members.append(member_dir / "checkpoint")
        summary.setdefault("members", []).append({"seed": member.seed, "checkpoint": str(members[-1]), **{
            k: v for k, v in (res.metrics or {}).items() if k in ("val_accuracy", "val_loss")}})
    if members:
        write_ensemble(run_dir / "checkpoint", members, seeds=[cfg.seed + i for i in range(cfg.ensemble)])
    summary["train_seconds"] = round(time.perf_counter() - t0, 2)
    ckpt_cfg = json.loads((run_dir / "checkpoint" / "config.json").read_text())
    summary["reward_normalization"] = ckpt_cfg["raygpt"].get("reward_normalization")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return summary


# --- worker ---------------------------------------------------------------------------------------------------
def train_loop(c: dict[str, Any]) -> None:
    """Per-worker loop on the shared engine; the objective is `rm_loss_fn`."""


    cfg: RMConfig = c["cfg"]
    o = cfg.optim
    ctx = init_worker(cfg.parallel, cfg.seed)
    torch.manual_seed(cfg.seed)  # the fresh scalar head: identical on every rank
    model = load_checkpoint(c["init_from"], kind="reward")
    engine = build_engine(model, o, cfg.parallel, ctx, resume_from=c["resume_from"],
                          faults=cfg.failure.plan(c["run_dir"]))
    train, val = c["train"], c["val"]
    rows = o.micro_batch_size * o.grad_accum
    val_shard = rank_slice(val, ctx.dp_rank, max(1, len(val) // ctx.dp_size)) if val else []
    val_batches = [rm_batch(val_shard[i:i + rows], c["pad_id"]) for i in range(0, len(val_shard), rows)]

    def validate() -> dict[str, float]:
        if not val_batches:
            return {}
        m = engine.evaluate(val_batches, rm_loss_fn)
        return {"val_loss": m["loss"], "val_accuracy": m["accuracy"]}

    run_steps(engine, len(train), lambda idx: rm_batch([train[i] for i in idx], c["pad_id"]), rm_loss_fn,
              max_steps=o.max_steps, seed=cfg.data.seed, validate=validate, eval_every=cfg.eval_every,
              checkpoint_every=cfg.checkpoint.every_n_steps, log_every=cfg.log_every,
              tokens_of=lambda b: int(b["attention_mask"].sum()))
    sd = engine.full_state_dict()  # collective: every rank takes part, rank 0 gets the weights
    if ctx.rank != 0:
        return
    rm = RewardModel(engine.model_cfg)
    rm.load_state_dict(sd, strict=True)
    extra: dict[str, Any] = {"reward_input": REWARD_INPUT, **c["sources"], "init_from": c["init_from"],
                             "rm": {"steps": engine.state.step, "train_prompts": len(train)}}
    if c["norm"]:
        offset = float(score_sequences(rm, c["norm"], c["pad_id"]).mean())
        fold_reward_offset(rm, offset)
        after = float(score_sequences(rm, c["norm"], c["pad_id"]).mean())
        extra["reward_normalization"] = {
            "offset_subtracted": offset, "demonstrations": len(c["norm"]), "mean_after": after,
            "stored_in": f"{offset_norm_name(rm.config)}.bias, shifted by -offset * score.weight / "
                         "|score.weight|^2"}
    save_checkpoint(rm, Path(c["run_dir"]) / "checkpoint", kind="reward", tokenizer=c["tokenizer"], extra=extra)


JOB = JobSpec(RMConfig, run, "raygpt rm")
main = JOB.main


if __name__ == "__main__":
    sys.exit(main())
