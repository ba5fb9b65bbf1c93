"""`raygpt eval`: held-out evaluation of any checkpoints (InstructGPT §4; DESIGN.md "Embedded RLHF task").

For every language-model checkpoint in `models` (label → directory):
- gold score: the task's labeler (VADER for the embedded task) on one sampled response per held-out prompt;
- proxy score: the reward model's score of the same responses (normalised: SFT demonstrations average 0), so
  over-optimisation of the proxy shows up as proxy rising while gold does not;
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.cli import job_main
from jobs.config import ConfigError, field
from jobs.data.tasks import TaskConfig, TaskError, build_task
from jobs.rlhf.checkpoints import load_lm
from jobs.rlhf.evaluation import (
    heldout_perplexity,
    heldout_responses,
    proxy_scores,
    rm_accuracy,
    rm_heldout_file,
    win_rate,
)
from models.generation import SamplingParams


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
    seed: int = field(0, help="sampling seed (the same prompts and seeds for every model)")
    perplexity: PerplexitySection = field(PerplexitySection(), help="held-out perplexity")
    formats: FormatsSection = field(FormatsSection(), help="prompt formats")

    def validate(self) -> None:
        if not self.models and not self.reward_model:
            raise ConfigError("models: give at least one checkpoint (or a reward_model to check its accuracy)")
        if self.prompts < 1:
            raise ConfigError(f"prompts: must be >= 1, got {self.prompts}")
        if any(k < 0 for k in self.formats.shots):
            raise ConfigError("formats.shots: must be >= 0")


# --- building blocks (also used by jobs.sft and tests) ---------------------------------------------------------


# --- the job ---------------------------------------------------------------------------------------------------
def check(cfg: EvalConfig) -> None:
    from models.checkpoint import CheckpointError, read_config, tokenizer_path

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
    if cfg.comparisons and not Path(cfg.comparisons).is_file():
        raise ConfigError(f"comparisons: no such file {cfg.comparisons}")


def run(cfg: EvalConfig) -> dict[str, Any]:
    import torch

    from cluster.metrics import MetricsWriter
    from jobs.data.tasks.formats import evaluate_formats, resolve_formats
    from jobs.runs import start_run
    from models.checkpoint import load_checkpoint, tokenizer_path
    from models.tokenizer import Tokenizer

    check(cfg)
    task = build_task(cfg.task)
    formats = resolve_formats(cfg.formats.names, cfg.formats.file) if cfg.formats.names else []
    prompts = task.prompts("heldout")[:cfg.prompts]
    run_dir = start_run(cfg, cfg.name, cfg.runs_root)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    rm = rm_tok = None
    if cfg.reward_model:
        rm = load_checkpoint(cfg.reward_model, kind="reward")
        rm_tok = Tokenizer.from_file(tokenizer_path(cfg.reward_model))
    metrics: dict[str, Any] = {"prompts": len(prompts)}
    samples: dict[str, list[str]] = {}
    gold: dict[str, list[float]] = {}
    proxy: dict[str, list[float]] = {}
    for label, path in cfg.models.items():
        model, tokenizer = load_lm(path)
        responses = heldout_responses(model, tokenizer, prompts, cfg.sampling, cfg.seed, cfg.batch_size)
        samples[label] = responses
        metrics[f"{label}/response_chars"] = sum(map(len, responses)) / len(responses)
        if task.has_labeler:
            gold[label] = task.gold_scores(prompts, responses)
            metrics[f"{label}/gold"] = sum(gold[label]) / len(prompts)
        if rm is not None:
            proxy[label] = proxy_scores(rm, rm_tok, prompts, responses)
            metrics[f"{label}/proxy"] = sum(proxy[label]) / len(prompts)
        if cfg.perplexity.corpus:
            metrics[f"{label}/ppl"] = heldout_perplexity(model, tokenizer, cfg.perplexity.corpus,
                                                         cfg.perplexity.validation_fraction,
                                                         cfg.perplexity.max_tokens)
        for k, v in evaluate_formats(model, tokenizer, formats, cfg.formats.shots,
                                     cfg.formats.max_new_tokens).items():
            metrics[f"{label}/{k}"] = v
    labels = list(gold)
    for a in labels:
        for b in labels:
            if a != b:
                metrics[f"win_rate/{a}_vs_{b}"] = win_rate(gold[a], gold[b])
    if rm is not None:
        comp = cfg.comparisons or rm_heldout_file(cfg.reward_model)
        if comp:
            metrics.update(rm_accuracy(rm, rm_tok, comp))
            metrics["rm_accuracy_file"] = str(comp)
    elif not task.has_labeler:
        raise TaskError(f"task {task.name!r}: no labeler and no reward model: nothing to score")
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    with MetricsWriter(run_dir, tensorboard=False) as w:
        w.write(0, **metrics)
    _write_samples(run_dir / "samples.jsonl", prompts, samples, gold, proxy)
    (run_dir / "summary.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics))
    return metrics


def _write_samples(path: Path, prompts: Sequence[str], samples: dict[str, list[str]],
                   gold: dict[str, list[float]], proxy: dict[str, list[float]]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i, p in enumerate(prompts):
            row: dict[str, Any] = {"prompt": p}
            for label, responses in samples.items():
                row[label] = {"response": responses[i], **({"gold": gold[label][i]} if label in gold else {}),
                              **({"proxy": proxy[label][i]} if label in proxy else {})}
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    return job_main(EvalConfig, run, argv, prog="raygpt eval")


if __name__ == "__main__":
    sys.exit(main())
