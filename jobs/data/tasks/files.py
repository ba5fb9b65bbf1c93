"""The `files` task: your own data files (jobs/data/tasks/user_data.py) behind the Task interface every job reads.

`task.data` names a file, directory or glob in one of the user formats (prompt-completion, messages, pairwise,
kwise, prompts; detected from the columns unless `task.format` says). What the task offers depends on it:

- prompts(split): every format — the prompt of each row (conversations: everything before the last assistant
  turn, rendered with the chat template and its generation prompt);
- demonstrations(): prompt-completion / messages rows as they are; pairwise and kwise rows give their preferred
  response (as the `labelled` task does); a prompt-only file has none;
- comparisons_for(split): pairwise / kwise rows.

Held-out split: by the same stable hash of the prompt text as every task (`base.heldout_prompt`), or, when
`task.heldout_data` is given, that file is the held-out split and `task.data` is all train. There is no labeler:
gold scores need a reward model or the embedded task. All rows are read and validated when the task is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from jobs.data.tasks.base import Demonstration, Split, Task, TaskError, check_split, heldout_prompt
from jobs.data.tasks import user_data as ud
from jobs.data.tasks.labelled import Comparison

T = TypeVar("T")


class FilesTask(Task):
    name = "files"

    def __init__(self, data: str, heldout_data: str = "", heldout_fraction: float = 0.1, fmt: str = "auto") -> None:
        if not data:
            raise TaskError("task.data: the 'files' task needs a data file, directory or glob")
        if not 0.0 < heldout_fraction < 1.0:
            raise TaskError(f"task.heldout_fraction: must be in (0, 1), got {heldout_fraction}")
        self.heldout_fraction = heldout_fraction
        self.format = ""
        self._prompts: dict[str, list[str]] = {}
        self._demos: dict[str, list[Demonstration]] = {}
        self._comparisons: dict[str, list[Comparison]] = {}
        sources = {"train": data, "heldout": heldout_data} if heldout_data else {"all": data}
        for part, source in sources.items():
            rows = ud.read_rows(source)
            f = ud.resolve_format(rows, fmt, ud.FORMATS, "a task")
            if self.format and f != self.format:
                raise TaskError(f"task.heldout_data: {source} is a {f!r} file, task.data a {self.format!r} file")
            self.format = f
            if f in ("pairwise", "kwise"):
                comps = [ud.comparison(r, f) for r in rows]
                self._comparisons.update(self._split(part, comps, lambda c: c.prompt))
                demos = [Demonstration(c.prompt, c.best) for c in comps]
            elif f in ("prompt-completion", "messages"):
                demos = [ud.demonstration(r, f) for r in rows]
            else:
                demos = []
                self._prompts.update(self._split(part, [ud.prompt_text(r) for r in rows], lambda p: p))
            if demos:
                self._demos.update(self._split(part, demos, lambda d: d.prompt))
                self._prompts.update(self._split(part, [d.prompt for d in demos], lambda p: p))

    def _split(self, part: str, items: list[T], key: Callable[[T], str]) -> dict[str, list[T]]:
        """{split: items}: all of `part` when the split is given by the file, else by a hash of the prompt."""
        if part != "all":
            return {part: items}
        return {split: [x for x in items if heldout_prompt(key(x), self.heldout_fraction) == (split == "heldout")]
                for split in ("train", "heldout")}

    @property
    def has_labeler(self) -> bool:
        return False

    def prompts(self, split: Split) -> list[str]:
        check_split(split)
        return list(dict.fromkeys(self._prompts.get(split, [])))

    def demonstrations(self) -> list[Demonstration]:
        if self.format == "prompts":
            raise TaskError("task.data: a prompt-only file has no demonstrations (SFT needs prompt-completion, "
                            "messages, pairwise or kwise rows)")
        return list(self._demos.get("train", []))

    def comparisons_for(self, split: Split) -> list[Comparison]:
        check_split(split)
        if self.format not in ("pairwise", "kwise"):
            raise TaskError(f"task.data: a {self.format!r} file has no comparisons (needs pairwise or kwise rows)")
        return list(self._comparisons.get(split, []))
