"""Comparison data (InstructGPT §3.4–3.5): per prompt, K responses and a labeler's ranking of them.

On disk a comparisons file is Parquet or JSONL with one row per prompt:

    prompt     string          the prompt x
    responses  list<string>    K ≥ 2 responses y_0..y_{K−1}, none empty
    ranking    list<int>       a permutation of 0..K−1, best first: ranking[0] is the index of the preferred response
    scores     list<double>    optional: the labeler's gold score of each response, for diagnostics only — the
                               reward model never reads it (it learns from rankings alone)

Every row is validated before anything uses or writes it; an error names the file and the row. Writes go to a
temporary file in the target directory that is renamed into place, so a failure leaves no partial file.

`LabelledTask` turns such a file into a task: its prompts (split train/held-out by hash), demonstrations (each
prompt's top-ranked response) and the recorded rankings, but no labeler for new responses.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from jobs.data.tasks.base import Demonstration, Split, Task, TaskError, check_split, heldout_prompt

from jobs.data.corpus import DataError

REQUIRED_COLUMNS = ("prompt", "responses", "ranking")
SCHEMA = pa.schema([
    ("prompt", pa.string()),
    ("responses", pa.list_(pa.string())),
    ("ranking", pa.list_(pa.int32())),
    ("scores", pa.list_(pa.float64())),
])


class ComparisonsError(DataError):
    """A comparisons file or record is malformed; the message names the file and the row."""


@dataclass(frozen=True)
class Comparison:
    """One prompt with K ranked responses. `ranking[j]` = index into `responses` of the j-th best."""

    prompt: str
    responses: tuple[str, ...]
    ranking: tuple[int, ...]
    scores: tuple[float, ...] | None = None

    @property
    def k(self) -> int:
        return len(self.responses)

    @property
    def best(self) -> str:
        return self.responses[self.ranking[0]]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_row(row: Any, where: str) -> Comparison:
    """Validate one record (a mapping with prompt/responses/ranking[/scores]) → Comparison; errors name `where`."""
    if not isinstance(row, dict):
        raise ComparisonsError(f"{where}: expected an object with {', '.join(REQUIRED_COLUMNS)}, got {row!r:.80}")
    missing = [c for c in REQUIRED_COLUMNS if c not in row]
    if missing:
        raise ComparisonsError(f"{where}: missing {', '.join(map(repr, missing))}")
    prompt, responses, ranking = row["prompt"], row["responses"], row["ranking"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ComparisonsError(f"{where}: prompt must be a non-empty string, got {prompt!r:.80}")
    if not isinstance(responses, (list, tuple)) or not all(isinstance(r, str) for r in responses):
        raise ComparisonsError(f"{where}: responses must be a list of strings, got {responses!r:.80}")
    k = len(responses)
    if k < 2:
        raise ComparisonsError(f"{where}: K={k} response(s); a ranking needs K >= 2 responses per prompt")
    for j, r in enumerate(responses):
        if not r.strip():
            raise ComparisonsError(f"{where}: response {j} is empty")
    if not isinstance(ranking, (list, tuple)) or not all(_is_int(i) for i in ranking):
        raise ComparisonsError(f"{where}: ranking must be a list of integers, got {ranking!r:.80}")
    if sorted(ranking) != list(range(k)):
        raise ComparisonsError(f"{where}: ranking {list(ranking)} is not a permutation of 0..{k - 1} "
                               f"(one index per response, best first)")
    scores = row.get("scores")
    if scores is not None:
        if (not isinstance(scores, (list, tuple)) or len(scores) != k
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                           for s in scores)):
            raise ComparisonsError(f"{where}: scores must be {k} finite numbers (one per response), got {scores!r:.80}")
        scores = tuple(float(s) for s in scores)
    return Comparison(prompt, tuple(responses), tuple(int(i) for i in ranking), scores)


def validate(rows: Iterable[Any], source: str = "<comparisons>") -> list[Comparison]:
    """Check every row (see `check_row`); raise ComparisonsError naming `source` and the first bad row."""
    out = [check_row(row.__dict__ if isinstance(row, Comparison) else row, f"{source}: row {i}")
           for i, row in enumerate(rows)]
    if not out:
        raise ComparisonsError(f"{source}: no comparisons (0 rows)")
    return out


def read_comparisons(path: str | Path) -> list[Comparison]:
    """Load and validate a Parquet (.parquet) or JSONL (.jsonl/.json) comparisons file."""
    p = Path(path)
    if not p.is_file():
        raise ComparisonsError(f"{p}: no such comparisons file")
    if p.suffix == ".parquet":
        try:
            table = pq.read_table(p)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError variants
            raise ComparisonsError(f"{p}: not a readable Parquet file ({e})") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise ComparisonsError(f"{p}: missing column(s) {', '.join(map(repr, missing))} "
                                   f"(has: {', '.join(table.column_names)}; needs: {', '.join(REQUIRED_COLUMNS)})")
        rows: list[Any] = table.to_pylist()
    elif p.suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ComparisonsError(f"{p}: row {len(rows)} (line {n + 1}): not valid JSON ({e})") from None
    else:
        raise ComparisonsError(f"{p}: unknown comparisons format (expected .parquet or .jsonl)")
    return validate(rows, str(p))


def write_comparisons(comparisons: Sequence[Comparison], path: str | Path) -> Path:
    """Validate all rows, then write Parquet atomically (tmp file in the same directory + rename)."""
    p = Path(path)
    rows = validate(comparisons, str(p))
    has_scores = [c.scores is not None for c in rows]
    if any(has_scores) and not all(has_scores):
        raise ComparisonsError(f"{p}: row {has_scores.index(False)}: scores missing while other rows have them")
    data = {
        "prompt": [c.prompt for c in rows],
        "responses": [list(c.responses) for c in rows],
        "ranking": [list(c.ranking) for c in rows],
    }
    schema = SCHEMA
    if all(has_scores):
        data["scores"] = [list(c.scores or ()) for c in rows]
    else:
        schema = pa.schema([f for f in SCHEMA if f.name != "scores"])
    table = pa.Table.from_pydict(data, schema=schema)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


class LabelledTask(Task):
    """A task made of recorded comparisons (user data): prompts and rankings, no labeler for new responses."""

    name = "labelled"

    def __init__(self, data: str, heldout_fraction: float = 0.1) -> None:
        if not data:
            raise TaskError("task.data: the 'labelled' task needs a comparisons file (Parquet/JSONL with "
                            "prompt, responses, ranking)")
        if not 0.0 < heldout_fraction < 1.0:
            raise TaskError(f"task.heldout_fraction: must be in (0, 1), got {heldout_fraction}")
        self.path = data
        self.heldout_fraction = heldout_fraction
        self.comparisons = read_comparisons(data)

    @property
    def has_labeler(self) -> bool:
        return False

    def comparisons_for(self, split: Split) -> list[Comparison]:
        check_split(split)
        want = split == "heldout"
        return [c for c in self.comparisons if heldout_prompt(c.prompt, self.heldout_fraction) == want]

    def prompts(self, split: Split) -> list[str]:
        return list(dict.fromkeys(c.prompt for c in self.comparisons_for(split)))

    def demonstrations(self) -> list[Demonstration]:
        """The top-ranked response of every train prompt: what the labeler preferred."""
        return [Demonstration(c.prompt, c.best) for c in self.comparisons_for("train")]
