"""RLHF tasks: a prompt distribution + a labeler (see `jobs.data.tasks.base.Task`).

Built-in tasks, chosen by `TaskConfig.name`:
- "positive-verse" (default): continue a line of Shakespeare so it reads positive; labeler = VADER.
- "labelled": your own recorded comparisons (Parquet/JSONL: prompt, responses, ranking) in `task.data`.
- "files": your own data in any user format (prompt-completion, messages, pairwise, kwise, prompts;
  jobs/data/tasks/user_data.py) in `task.data` (+ `task.heldout_data`).
- "package.module:ClassName": your own `Task` subclass, constructed as `ClassName(**task.options)`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from jobs.config import ConfigError, field
from jobs.data.corpus import DEFAULT_VALIDATION_FRACTION
from jobs.data.tasks.base import Demonstration, Split, Task, TaskError, rank_by_scores
from jobs.data.tasks.files import FilesTask
from jobs.data.tasks.labelled import Comparison, ComparisonsError, LabelledTask, read_comparisons, write_comparisons
from jobs.data.tasks.positive_verse import PositiveVerseTask, VaderLabeler

__all__ = [
    "Comparison", "ComparisonsError", "Demonstration", "FilesTask", "LabelledTask", "PositiveVerseTask", "Split",
    "Task", "TaskConfig", "TaskError", "VaderLabeler", "build_task", "rank_by_scores", "read_comparisons",
    "write_comparisons",
]


@dataclass
class TaskConfig:
    """Which task supplies prompts, demonstrations and the labeler."""

    name: str = field("positive-verse", help="'positive-verse', 'labelled', 'files', or 'package.module:TaskClass'")
    corpus: str = field("shakespeare", help="positive-verse: corpus whose held-in lines give the prompts")
    validation_fraction: float = field(
        DEFAULT_VALIDATION_FRACTION, help="positive-verse: held-out document fraction (same as `prepare`'s)")
    heldout_fraction: float = field(0.1, help="fraction of prompts held out for evaluation (split by hash)")
    prompt_words: int = field(3, help="positive-verse: prompt = the first N words of a line")
    response_lines: int = field(2, help="positive-verse: demonstration = rest of the line + N-1 following lines")
    demo_threshold: float = field(0.5, help="positive-verse: VADER compound score a demonstration must reach")
    data: str = field("", help="labelled: comparisons file (Parquet/JSONL with prompt, responses, ranking); "
                               "files: your data file, directory or glob (docs/DATA.md 'Bring your own data')")
    heldout_data: str = field("", help="files: held-out file(s) ('' = hold out by a hash of the prompt)")
    format: str = field("auto", help="files: auto, prompt-completion, messages, pairwise, kwise or prompts")
    options: dict[str, Any] = field({}, help="custom task: keyword arguments for its constructor")

    def validate(self) -> None:
        if self.name not in ("positive-verse", "labelled", "files") and ":" not in self.name:
            raise ConfigError(f"name: unknown task {self.name!r} (use 'positive-verse', 'labelled', 'files' or "
                              "'package.module:TaskClass')")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"heldout_fraction: must be in (0, 1), got {self.heldout_fraction}")
        if self.name in ("labelled", "files") and not self.data:
            raise ConfigError(f"data: the {self.name!r} task needs a data file")
        if self.format not in ("auto", "prompt-completion", "messages", "pairwise", "kwise", "prompts"):
            raise ConfigError(f"format: unknown format {self.format!r} (auto, prompt-completion, messages, "
                              "pairwise, kwise or prompts)")


def build_task(cfg: TaskConfig) -> Task:
    """Instantiate the task a config names (cheap: corpora and files are read on first use or here)."""
    if cfg.name == "positive-verse":
        return PositiveVerseTask(cfg.corpus, cfg.validation_fraction, cfg.heldout_fraction, cfg.prompt_words,
                                 cfg.response_lines, cfg.demo_threshold)
    if cfg.name == "labelled":
        return LabelledTask(cfg.data, cfg.heldout_fraction)
    if cfg.name == "files":
        return FilesTask(cfg.data, cfg.heldout_data, cfg.heldout_fraction, cfg.format)
    module, _, cls_name = cfg.name.partition(":")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError) as e:
        raise TaskError(f"task.name: cannot import {cfg.name!r} ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TaskError(f"task.name: {cfg.name!r} is not a subclass of jobs.data.tasks.Task")
    return cls(**cfg.options)
