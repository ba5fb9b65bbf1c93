"""`raygpt sft`: supervised fine-tuning on demonstrations (InstructGPT §3.5 "Supervised fine-tuning").

The task's labeler-approved demonstrations (prompt → response) are tokenised in the driver as
prompt_ids + response_ids + [EOS]; the loss is next-token cross-entropy on the response tokens and the EOS only —
the prompt is context, not something to imitate (`sft_batch` builds that mask, `models.losses.lm_loss` applies
it). Training runs on the shared Ray Train + DeepSpeed engine (cluster/train/engine.py) with the paper's recipe scaled
down: cosine learning-rate decay and residual dropout (InstructGPT §C: 16 epochs, dropout 0.2; the tiny default
uses 0.1 for a few hundred steps — enough to move a 4-layer model without erasing what pretraining taught it).

Residual dropout is a training-time setting: it is switched on in the training copy only, and the exported
checkpoint keeps the pretrained model's config, so the policy that PPO starts from runs without dropout (its
probability ratios would otherwise be noisy).

A T5 `init_from` (from `raygpt pretrain --set model.arch=t5`) is fine-tuned text-to-text (Raffel et al. 2020
§2.4) on the same demonstrations, on the same engine and step loop: encoder input = `task_prefix` + prompt + EOS
(T5's task prefixes, like "summarize: "), target = response + EOS, loss = seq2seq cross-entropy over the target
(`jobs.data.examples.text_to_text_sft_batch`, `seq2seq_loss_fn`). Its held-out samples come from the T5's decoder
behind the same prefix (actors/engines/t5.py) and are scored by the one evaluator, `compare_models`. T5 is data
parallel + ZeRO only; conversations (`messages` data) have no text-to-text form and are refused.

Outputs in runs/<name>/: checkpoint/ (GPT2LMHeadModel, or T5ForConditionalGeneration for a T5), metrics.jsonl
(loss, val_loss per step), summary.json (including the gold score of samples from the init and the SFT model on
held-out prompts), trainer_state/.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from actors.engines.t5 import TextToTextEngine
from cluster.runtime import init_ray
from cluster.train.engine import (
    CheckpointConfig,
    FailureConfig,
    FineTuneParallelConfig,
    OptimConfig,
    build_engine,
    init_worker,
    launch,
    lm_loss_fn,
    perplexity,
    seq2seq_loss_fn,
)
from cluster.train.loop import run_steps
from jobs.cli import JobSpec
from jobs.config import ConfigError, field
from jobs.data.examples import (
    ChatExample,
    Example,
    encode_demonstration,
    fits,
    rank_slice,
    sft_batch,
    text_to_text_sft_batch,
)
from jobs.data.tasks import TaskConfig, build_task
from jobs.data.tasks.base import stable_unit
from jobs.rlhf.checkpoints import finetune_start
from jobs.rlhf.evaluation import compare_models, evaluate_checkpoints
from jobs.runs import start_run
from models.checkpoint import load_checkpoint
from models.config import arch_of
from models.generation import SamplingParams
from models.registry import build_model, load_model


@dataclass
class SFTDataSection:
    """Demonstrations → token sequences."""

    max_demonstrations: int = field(4096, help="use at most this many demonstrations (0 = all)")
    val_demonstrations: int = field(256, help="demonstrations held out (by hash) for the validation loss")
    max_prompt_tokens: int = field(16, help="demonstrations with longer prompts are dropped")
    max_response_tokens: int = field(24, help="demonstrations with longer responses (EOS included) are dropped")
    seed: int = field(0, help="data order seed (the order is a pure function of seed and step)")

    def validate(self) -> None:
        if self.max_demonstrations < 0 or self.val_demonstrations < 0:
            raise ConfigError("max_demonstrations/val_demonstrations: must be >= 0")
        if self.max_prompt_tokens < 1 or self.max_response_tokens < 2:
            raise ConfigError("max_prompt_tokens/max_response_tokens: must be >= 1 / >= 2 (a token and EOS)")


@dataclass
class SFTEvalSection:
    """Gold score of samples on held-out prompts, before and after fine-tuning (driver, after training)."""

    prompts: int = field(128, help="held-out prompts sampled for the gold score (0 = skip)")
    sampling: SamplingParams = field(SamplingParams(), help="sampling")
    every_n_steps: int = field(50, help="validation loss every N steps (and at the end)")


@dataclass
class SFTOptimConfig(OptimConfig):
    """The engine's optimizer section with SFT defaults: cosine decay to 0 (InstructGPT §C), a short run.

    (A subclass rather than `field(OptimConfig(lr=...))`: nested sections are rebuilt from their class defaults
    when YAML or --set gives some of their fields, so the defaults must live on the class.)"""

    lr: float = field(5e-4, help="peak learning rate (after warmup)")
    min_lr_ratio: float = field(0.0, help="cosine decays to lr·min_lr_ratio at max_steps")
    max_steps: int = field(300, help="optimizer steps (tiny defaults: ≈ 2.3 epochs of 4,096 demonstrations)")
    micro_batch_size: int = field(16, help="demonstrations per micro-batch per data-parallel rank")


@dataclass
class SFTConfig:
    """Supervised fine-tuning of a pretrained checkpoint on the task's demonstrations (loss on responses only)."""

    name: str = field("sft", help="run name: runs/<name>/")
    runs_root: str = field("runs", help="directory holding run directories")
    address: str | None = field(None, help="Ray cluster address (default: $RAY_ADDRESS, else an embedded cluster)")
    init_from: str = field("runs/pretrain/checkpoint", help="pretrained checkpoint to fine-tune")
    seed: int = field(0, help="dropout seed")
    resid_pdrop: float = field(0.1, help="residual dropout while fine-tuning (InstructGPT §C: 0.2; T5: every "
                                         "dropout layer, §3.1.1: 0.1); not stored in the exported checkpoint")
    task_prefix: str = field("continue: ", help="T5 only: text before every prompt in the encoder input (T5 §2.4 "
                                                "task prefixes, e.g. 'summarize: '); a GPT reads the bare prompt")
    log_every: int = field(10, help="report metrics to the driver every N steps")
    task: TaskConfig = field(TaskConfig(), help="task supplying the demonstrations")
    data: SFTDataSection = field(SFTDataSection(), help="data")
    optim: SFTOptimConfig = field(SFTOptimConfig(), help="optimizer, cosine schedule and batch")
    parallel: FineTuneParallelConfig = field(FineTuneParallelConfig(), help="workers and layout")
    checkpoint: CheckpointConfig = field(CheckpointConfig(), help="exact-resume checkpoints")
    failure: FailureConfig = field(FailureConfig(), help="fault tolerance")
    eval: SFTEvalSection = field(SFTEvalSection(), help="evaluation")

    def validate(self) -> None:
        if not 0.0 <= self.resid_pdrop < 1.0:
            raise ConfigError(f"resid_pdrop: must be in [0, 1), got {self.resid_pdrop}")
        if self.log_every < 1 or self.eval.every_n_steps < 1:
            raise ConfigError("log_every/eval.every_n_steps: must be >= 1")


# --- data (pure, testable without Ray) -------------------------------------------------------------------------


def prepare_demonstrations(cfg: SFTConfig, tokenizer: Any
                           ) -> tuple[list[Example | ChatExample], list[Example | ChatExample], dict[str, int]]:
    """(train examples, validation examples, counts): the task's demonstrations, tokenised, too-long ones dropped,
    a hash-chosen validation subset set aside."""
    demos = build_task(cfg.task).demonstrations()
    d = cfg.data
    kept, too_long = [], 0
    for demo in demos:
        e = encode_demonstration(tokenizer, demo)  # a conversation trains on all its assistant turns
        if not fits(e, d.max_prompt_tokens, d.max_response_tokens):
            too_long += 1
            continue
        kept.append((demo, e))
    # Validation set and subsample chosen by a hash of the text: independent of corpus order.
    kept.sort(key=lambda x: stable_unit(x[0].prompt + "\0" + x[0].response, "sft"))
    val = [e for _, e in kept[:d.val_demonstrations]]
    train = [e for _, e in kept[d.val_demonstrations:]]
    if d.max_demonstrations:
        train = train[:d.max_demonstrations]
    if not train:
        raise ConfigError(f"task: no demonstration fits max_prompt_tokens={d.max_prompt_tokens} / "
                          f"max_response_tokens={d.max_response_tokens} after holding out {len(val)}")
    return train, val, {"demonstrations": len(demos), "too_long": too_long, "train": len(train), "val": len(val)}


def set_residual_dropout(model: Any, p: float) -> None:
    """Residual dropout (after attention and MLP projections, GPT-2 layout) of a training copy of the model,
    leaving model.config — and so the exported checkpoint — as it was. A T5: every dropout layer (embeddings,
    sub-block outputs, feed-forward; T5 §3.1.1 "dropout 0.1 everywhere"), attention probabilities aside."""
    if arch_of(model.config) == "t5":
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
        return
    for block in model.transformer.h:
        block.attn.resid_dropout.p = p
        block.mlp.dropout.p = p


# --- driver ---------------------------------------------------------------------------------------------------
def run(cfg: SFTConfig) -> dict[str, Any]:

    width = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens - 1
    mcfg, tok_file, tokenizer = finetune_start(cfg.init_from, cfg.parallel, width + 1,
                                               "data.max_prompt_tokens + data.max_response_tokens", ("gpt", "t5"))
    arch = arch_of(mcfg)
    train, val, counts = prepare_demonstrations(cfg, tokenizer)
    if arch == "t5" and any(isinstance(e, ChatExample) for e in train + val):
        raise ConfigError("task: conversations (messages) have no text-to-text form; a T5 fine-tunes on (prompt, "
                          "response) demonstrations")
    prefix = tokenizer.encode(cfg.task_prefix) if arch == "t5" else []
    run_dir = start_run(cfg, cfg.name, cfg.runs_root).resolve()
    init_ray(address=cfg.address)
    t0 = time.perf_counter()
    loop_config = {"cfg": cfg, "train": train, "val": val, "run_dir": str(run_dir),
                   "init_from": str(Path(cfg.init_from).resolve()), "tokenizer": str(Path(tok_file).resolve()),
                   "pad_id": tokenizer.eos_id, "width": width, "resume_from": cfg.checkpoint.resume_from,
                   "arch": arch, "prefix": prefix}
    result = launch(train_loop, loop_config, cfg.parallel, run_dir, cfg.failure.max_failures,
                    keep=cfg.checkpoint.keep, progress_steps=cfg.optim.max_steps)
    final = {k: v for k, v in (result.metrics or {}).items() if k != "rows"}
    summary: dict[str, Any] = {"run_dir": str(run_dir), "checkpoint": str(run_dir / "checkpoint"),
                               "train_seconds": round(time.perf_counter() - t0, 2), **counts, **final}
    task = build_task(cfg.task)
    if cfg.eval.prompts and task.has_labeler:  # user data (task 'files'/'labelled') has no gold labeler
        prompts = task.prompts("heldout")[:cfg.eval.prompts]
        checkpoints = {"init": cfg.init_from, "sft": run_dir / "checkpoint"}
        if arch == "t5":  # the T5s answer behind the task prefix (actors/engines/t5.py), scored the same way
            models = {label: load_model(path) for label, path in checkpoints.items()}
            comparison = compare_models(models, tokenizer, prompts, cfg.eval.sampling, cfg.seed,
                                        gold=task.gold_scores,
                                        engines={k: TextToTextEngine(m, prefix) for k, m in models.items()})
            summary["task_prefix"] = cfg.task_prefix
        else:
            comparison = evaluate_checkpoints(checkpoints, prompts, cfg.eval.sampling, cfg.seed,
                                              gold=task.gold_scores)
        for label in ("init", "sft"):
            summary[f"gold_heldout_{label}"] = comparison.metrics[f"{label}/gold"]
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return summary


# --- worker ---------------------------------------------------------------------------------------------------
def train_loop(c: dict[str, Any]) -> None:
    """Per-worker loop on the shared engine; the objective is the engine's LM loss with the response mask (a T5:
    the seq2seq loss on text-to-text batches)."""

    cfg: SFTConfig = c["cfg"]
    o = cfg.optim
    ctx = init_worker(cfg.parallel, cfg.seed)
    t5 = c["arch"] == "t5"
    model = load_model(c["init_from"]) if t5 else load_checkpoint(c["init_from"], kind="lm")
    mcfg = model.config
    set_residual_dropout(model, cfg.resid_pdrop)
    engine = build_engine(model, o, cfg.parallel, ctx, resume_from=c["resume_from"],
                          faults=cfg.failure.plan(c["run_dir"]))
    train, val = c["train"], c["val"]
    rows = o.micro_batch_size * o.grad_accum
    # Pipeline stages exchange fixed-shape activations: pad every batch to the same width there.
    width = c["width"] if cfg.parallel.pipeline > 1 else None

    def batch(examples: list[Example]) -> dict[str, Any]:
        if t5:
            return text_to_text_sft_batch(examples, c["prefix"], mcfg.eos_token_id, mcfg.pad_token_id,
                                          mcfg.decoder_start_token_id)
        return sft_batch(examples, c["pad_id"], width)

    loss_fn = seq2seq_loss_fn if t5 else lm_loss_fn
    trained = "labels_mask" if t5 else "loss_mask"

    val_shard = rank_slice(val, ctx.dp_rank, max(1, len(val) // ctx.dp_size))
    val_batches = [batch(val_shard[i:i + rows]) for i in range(0, len(val_shard) - rows + 1, rows)]

    def validate() -> dict[str, float]:
        if not val_batches:
            return {}
        loss = engine.evaluate(val_batches, loss_fn)["loss"]
        return {"val_loss": loss, "val_ppl": perplexity(loss)}

    run_steps(engine, len(train), lambda idx: batch([train[i] for i in idx]), loss_fn, max_steps=o.max_steps,
              seed=cfg.data.seed, validate=validate, eval_every=cfg.eval.every_n_steps,
              checkpoint_every=cfg.checkpoint.every_n_steps, log_every=cfg.log_every,
              tokens_of=lambda b: int(b[trained].sum()), rate_name="response_tokens_per_s")
    # a T5 is exported by rank 0 into a fresh module of its shape (the engine's rule for non-GPT models)
    fresh = build_model(mcfg) if t5 and ctx.rank == 0 else None
    engine.export(Path(c["run_dir"]) / "checkpoint", tokenizer=c["tokenizer"], kind="lm", model=fresh,
                  extra={"sft": {"steps": engine.state.step, "init_from": c["init_from"],
                                 "demonstrations": len(train), "task": cfg.task.name}})


JOB = JobSpec(SFTConfig, run, "raygpt sft")
main = JOB.main


if __name__ == "__main__":
    sys.exit(main())
