"""`raygpt eval`: held-out evaluation of any checkpoints (InstructGPT §4; docs/RLHF.md).

For every language-model checkpoint in `models` (label → directory), through the one held-out evaluation
(jobs/rlhf/evaluation.py `compare_models`, also behind the RL job's final report and the demo):
- gold score: the task's labeler (VADER for the embedded task) on one sampled response per held-out prompt;
- proxy score: the reward model's score of the same responses (normalised: SFT demonstrations average 0), so
  over-optimisation of the proxy shows up as proxy rising while gold does not;
- KL(model‖kl_reference) on the model's own samples, and response length;
- perplexity on held-out text (the corpus documents held out of pretraining);
- the zero/few-shot prompt formats ("TL;DR:", Q/A, "english = french"; jobs/data/tasks/formats.py).
For every ordered pair of models, the labeler's win rate of A over B on the same prompts (ties count ½), and for
the reward model its pairwise accuracy on held-out comparisons (all pairs, and the pairs the labeler did not tie).

Outputs in runs/<name>/: metrics.jsonl (one row with every number), summary.json (the same, nested), samples.jsonl
(prompt, each model's response, gold and proxy scores). Runs in-process on the driver: the tiny defaults take
seconds, and no Ray cluster is needed to read checkpoints.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.engines import check_engine
from cluster.metrics import MetricsWriter
from jobs.cli import JobSpec
from jobs.config import ConfigError, field
from jobs.data.tasks import TaskConfig, TaskError, build_task
from jobs.data.tasks.formats import evaluate_formats, resolve_formats
from jobs.rlhf.checkpoints import load_lm
from jobs.rlhf.evaluation import evaluate_checkpoints, heldout_perplexity, rm_accuracy, rm_heldout_file
from jobs.runs import start_run
from models.checkpoint import CheckpointError, load_checkpoint, read_config, tokenizer_path
from models.files import atomic_open, write_json
from models.generation import SamplingParams
from models.tokenizer import Tokenizer


@dataclass
class PerplexitySection:
    """Perplexity on held-out text."""

    corpus: str = field("shakespeare", help="corpus whose held-out documents are scored ('' = skip)")
    validation_fraction: float = field(0.1, help="held-out document fraction (as in `prepare`)")
    max_tokens: int = field(16384, help="score at most this many tokens")


@dataclass
class FormatsSection:
    """Zero/few-shot prompt formats."""

    names: list[str] = field(["tldr", "qa", "translation"], help="formats to run ([] = skip)")
    shots: list[int] = field([0, 3], help="numbers of in-context examples")
    file: str = field("", help="JSON file with more formats (see jobs/data/tasks/formats.py)")
    max_new_tokens: int = field(12, help="greedy completion length")


@dataclass
class EvalConfig:
    """Evaluate checkpoints: gold/proxy score, win rates, RM accuracy, perplexity, prompt formats."""

    name: str = field("eval", help="run name: runs/<name>/")
    runs_root: str = field("runs", help="directory holding run directories")
    models: dict[str, str] = field({"pretrained": "runs/pretrain/checkpoint", "sft": "runs/sft/checkpoint"},
                                   help="label -> language-model checkpoint")
    reward_model: str = field("runs/rm/checkpoint", help="reward-model checkpoint for the proxy score ('' = none)")
    comparisons: str = field("", help="held-out comparisons for RM accuracy ('' = the RM's own held-out file)")
    task: TaskConfig = field(TaskConfig(), help="task: held-out prompts and labeler")
    prompts: int = field(256, help="held-out prompts (the first N of the task's held-out split)")
    sampling: SamplingParams = field(SamplingParams(), help="sampling of the responses")
    batch_size: int = field(128, help="sequences generated together")
    engine: str = field("native", help="rollout engine that samples: 'native' or 'vllm' (the `vllm` extra; KL is "
                                       "then computed with each model's own forward pass)")
    seed: int = field(0, help="sampling seed (the same prompts and seeds for every model)")
    kl_reference: str = field("sft", help="model whose KL(model‖reference) is reported for every model "
                                          "('' or a label not in models = none)")
    perplexity: PerplexitySection = field(PerplexitySection(), help="held-out perplexity")
    formats: FormatsSection = field(FormatsSection(), help="prompt formats")

    def validate(self) -> None:
        if not self.models and not self.reward_model:
            raise ConfigError("models: give at least one checkpoint (or a reward_model to check its accuracy)")
        if self.prompts < 1:
            raise ConfigError(f"prompts: must be >= 1, got {self.prompts}")
        if any(k < 0 for k in self.formats.shots):
            raise ConfigError("formats.shots: must be >= 0")


def check(cfg: EvalConfig) -> None:
    """Checkpoints exist and are of the right kind, before anything is sampled."""
    for label, path in [*cfg.models.items(), *([("reward_model", cfg.reward_model)] if cfg.reward_model else [])]:
        where = f"models.{label}" if label != "reward_model" else "reward_model"
        try:
            kind = read_config(path)[1]
            tokenizer_path(path)
        except CheckpointError as e:
            raise ConfigError(f"{where}: {e}") from None
        want = "reward" if label == "reward_model" else "lm"
        if kind != want:
            raise ConfigError(f"{where}: {path} is a {kind!r} checkpoint, expected {want!r}")
    if cfg.kl_reference and cfg.kl_reference not in cfg.models:
        raise ConfigError(f"kl_reference: {cfg.kl_reference!r} is not one of models ({', '.join(cfg.models)})")
    for path in cfg.models.values():
        check_engine(cfg.engine, path, "engine")
    if cfg.comparisons and not Path(cfg.comparisons).is_file():
        raise ConfigError(f"comparisons: no such file {cfg.comparisons}")


def run(cfg: EvalConfig) -> dict[str, Any]:
    check(cfg)
    task = build_task(cfg.task)
    if not task.has_labeler and not cfg.reward_model:
        raise TaskError(f"task {task.name!r}: no labeler and no reward model: nothing to score")
    formats = resolve_formats(cfg.formats.names, cfg.formats.file) if cfg.formats.names else []
    prompts = task.prompts("heldout")[:cfg.prompts]
    run_dir = start_run(cfg, cfg.name, cfg.runs_root)
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {}
    if cfg.models:
        comparison = evaluate_checkpoints(
            cfg.models, prompts, cfg.sampling, cfg.seed, gold=task.gold_scores if task.has_labeler else None,
            reward_model=cfg.reward_model or None,
            kl_reference=cfg.kl_reference if cfg.kl_reference in cfg.models else None, batch_size=cfg.batch_size,
            engine=cfg.engine)
        metrics.update(comparison.metrics)
        with atomic_open(run_dir / "samples.jsonl") as f:
            f.writelines(json.dumps(row) + "\n" for row in comparison.rows())
    for label, path in cfg.models.items():  # what needs no sampling: perplexity and the prompt formats
        if not cfg.perplexity.corpus and not formats:
            break
        model, tokenizer = load_lm(path)
        if cfg.perplexity.corpus:
            metrics[f"{label}/ppl"] = heldout_perplexity(model, tokenizer, cfg.perplexity.corpus,
                                                         cfg.perplexity.validation_fraction, cfg.perplexity.max_tokens)
        for k, v in evaluate_formats(model, tokenizer, formats, cfg.formats.shots, cfg.formats.max_new_tokens).items():
            metrics[f"{label}/{k}"] = v
    if cfg.reward_model:
        comp = cfg.comparisons or rm_heldout_file(cfg.reward_model)
        if comp:
            rm = load_checkpoint(cfg.reward_model, kind="reward")
            metrics.update(rm_accuracy(rm, Tokenizer.from_file(tokenizer_path(cfg.reward_model)), comp))
            metrics["rm_accuracy_file"] = str(comp)
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    with MetricsWriter(run_dir, tensorboard=False) as w:
        w.write(0, **metrics)
    write_json(run_dir / "summary.json", metrics)
    print(json.dumps(metrics))
    return metrics


JOB = JobSpec(EvalConfig, run, "raygpt eval")
main = JOB.main


if __name__ == "__main__":
    sys.exit(main())
