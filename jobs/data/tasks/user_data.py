"""Bring your own data: readers for the dataset formats people already have (docs/DATA.md "Bring your own data").

Local JSONL (.jsonl/.json, one object per line) or Parquet files, a directory of them, or a glob. Every row is
validated before anything is trained or written; an error names the file and the row (`ComparisonsError`, a
`DataError`). Columns other than the ones a format reads are ignored (HH-RLHF / UltraFeedback carry extras).

| format              | columns                                                  | used by                      |
|---------------------|----------------------------------------------------------|------------------------------|
| `prompt-completion` | prompt, completion: strings, or message lists (TRL)      | SFT (loss on the completion) |
| `messages`          | messages: [{role, content}], ending with the assistant   | SFT (loss on assistant turns)|
| `pairwise`          | prompt, chosen, rejected: strings or message lists       | RM, DPO                      |
| `kwise`             | prompt, responses, ranking (jobs/data/tasks/labelled.py) | RM, DPO                      |
| `prompts`           | prompt (string or messages) or messages                  | RL jobs, eval                |

Strings are used verbatim (prompt + completion + EOS, as for the embedded task); message lists are rendered with
the one chat template (models/chat.py), so a conversational prompt ends with "Assistant:" and its answer is
" " + content. A pairwise row without `prompt` whose chosen/rejected are whole conversations gets the shared
leading messages as its prompt (TRL's "implicit prompt"); what follows must be one assistant message each.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from jobs.data.tasks.base import Demonstration
from jobs.data.tasks.labelled import Comparison, ComparisonsError, check_row
from models.chat import ChatError, Message, check_messages, prompt_and_answer, render

Format = Literal["prompt-completion", "messages", "pairwise", "kwise", "prompts"]
FORMATS: tuple[str, ...] = ("prompt-completion", "messages", "pairwise", "kwise", "prompts")
SUFFIXES = (".jsonl", ".json", ".parquet")


class UserDataError(ComparisonsError):
    """A user data file or row is malformed; the message names the file and the row."""


@dataclass(frozen=True)
class Row:
    where: str  # "path: row i" — every error about this row starts with it
    data: Mapping[str, Any]


# --- files ----------------------------------------------------------------------------------------------------
def expand(source: str | Path) -> list[Path]:
    """A file, a directory (its .jsonl/.json/.parquet files, sorted) or a glob (sorted matches) → files."""
    s = str(source)
    if not s:
        raise UserDataError("data: no file given")
    p = Path(s)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in SUFFIXES)
        if not files:
            raise UserDataError(f"{p}: directory has no {'/'.join(SUFFIXES)} files")
        return files
    if p.is_file():
        files = [p]
    elif glob.has_magic(s):
        files = sorted(Path(f) for f in glob.glob(s, recursive=True) if Path(f).is_file())
        if not files:
            raise UserDataError(f"{s}: no file matches")
    else:
        raise UserDataError(f"{p}: no such file or directory")
    bad = [f for f in files if f.suffix not in SUFFIXES]
    if bad:
        raise UserDataError(f"{bad[0]}: unknown data format (expected {', '.join(SUFFIXES)})")
    return files


def read_rows(source: str | Path) -> list[Row]:
    """Every row of every file, each a mapping, in file order; errors name the file and row."""
    rows: list[Row] = []
    for f in expand(source):
        rows.extend(_file_rows(f))
    if not rows:
        raise UserDataError(f"{source}: no rows")
    return rows


def _file_rows(f: Path) -> Iterator[Row]:
    if f.suffix == ".parquet":
        try:
            table = pq.read_table(f)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError variants
            raise UserDataError(f"{f}: not a readable Parquet file ({e})") from None
        for i, row in enumerate(table.to_pylist()):
            yield Row(f"{f}: row {i}", row)
        return
    i = 0
    for n, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserDataError(f"{f}: row {i} (line {n + 1}): not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise UserDataError(f"{f}: row {i} (line {n + 1}): expected a JSON object, got {type(row).__name__}")
        yield Row(f"{f}: row {i}", row)
        i += 1


def detect_format(rows: list[Row]) -> Format:
    """The format of a dataset by the first row's columns (every row is then validated against it)."""
    first = rows[0].data
    cols = set(first)
    if {"responses", "ranking"} & cols:
        return "kwise"
    if {"chosen", "rejected"} & cols:
        return "pairwise"
    if "completion" in cols:
        return "prompt-completion"
    if "messages" in cols and "prompt" not in cols:
        msgs = first["messages"]
        ends_with_answer = isinstance(msgs, list) and msgs and isinstance(msgs[-1], Mapping) \
            and msgs[-1].get("role") == "assistant"
        return "messages" if ends_with_answer else "prompts"
    if "prompt" in cols:
        return "prompts"
    raise UserDataError(f"{rows[0].where}: cannot tell the format from its columns {sorted(cols)} (expected "
                        "prompt+completion, messages, prompt+chosen+rejected, prompt+responses+ranking, or prompt)")


# --- row validation -------------------------------------------------------------------------------------------
def _need(row: Row, *cols: str) -> None:
    missing = [c for c in cols if c not in row.data or row.data[c] is None]
    if missing:
        raise UserDataError(f"{row.where}: missing column(s) {', '.join(map(repr, missing))} "
                            f"(has: {', '.join(sorted(row.data)) or 'nothing'})")


def _text(row: Row, col: str) -> str:
    v = row.data[col]
    if not isinstance(v, str):
        raise UserDataError(f"{row.where}: {col} must be a string or a message list, got {type(v).__name__}")
    if not v.strip():
        raise UserDataError(f"{row.where}: {col} is empty")
    return v


def _messages(row: Row, col: str, **kw: Any) -> tuple[Message, ...]:
    try:
        return check_messages(row.data[col], f"{row.where}: {col}", **kw)
    except ChatError as e:
        raise UserDataError(str(e)) from None


def _is_list(v: Any) -> bool:
    return isinstance(v, (list, tuple))


def _check_types(row: Row, *cols: str) -> None:
    for col in cols:
        v = row.data[col]
        if not isinstance(v, str) and not _is_list(v):
            raise UserDataError(f"{row.where}: {col} must be a string or a message list, got {type(v).__name__}")


def _answers(row: Row, col: str) -> tuple[Message, ...]:
    """A completion / chosen / rejected message list that follows a prompt: assistant message(s), ending with one."""
    msgs = _messages(row, col, final="assistant")
    if msgs[0].role != "assistant":
        raise UserDataError(f"{row.where}: {col} must start with the assistant's answer, got {msgs[0].role!r}")
    return msgs


def demonstration(row: Row, fmt: Format) -> Demonstration:
    """A prompt-completion or messages row → Demonstration (with `messages` for conversations)."""
    if fmt == "messages":
        _need(row, "messages")
        msgs = _messages(row, "messages", final="assistant", need_assistant=True)
    else:
        _need(row, "prompt", "completion")
        _check_types(row, "prompt", "completion")
        prompt, completion = row.data["prompt"], row.data["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return Demonstration(_text(row, "prompt"), _text(row, "completion"))
        if not (_is_list(prompt) and _is_list(completion)):
            raise UserDataError(f"{row.where}: prompt and completion must both be strings or both message lists, "
                                f"got {type(prompt).__name__} and {type(completion).__name__}")
        msgs = _messages(row, "prompt", final="not-assistant") + _answers(row, "completion")
    p, a = prompt_and_answer(msgs)
    return Demonstration(p, a, messages=msgs)


def comparison(row: Row, fmt: Format) -> Comparison:
    """A pairwise row → Comparison with K=2 and ranking (0, 1) (chosen first); a kwise row as today."""
    if fmt == "kwise":
        _need(row, "prompt", "responses", "ranking")
        try:
            return check_row(dict(row.data), row.where)
        except ComparisonsError as e:
            raise UserDataError(str(e)) from None
    _need(row, "chosen", "rejected")
    _check_types(row, *(c for c in ("prompt", "chosen", "rejected") if row.data.get(c) is not None))
    chosen, rejected = row.data["chosen"], row.data["rejected"]
    prompt = row.data.get("prompt")
    if prompt is None:  # implicit prompt: chosen/rejected are whole conversations sharing their beginning
        for col in ("chosen", "rejected"):
            if not _is_list(row.data[col]):
                raise UserDataError(f"{row.where}: missing 'prompt' (only message-list chosen/rejected may omit "
                                    f"it), {col} is a {type(row.data[col]).__name__}")
        c = _messages(row, "chosen", final="assistant")
        r = _messages(row, "rejected", final="assistant")
        n = 0
        while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
            n += 1
        if len(c) - n != 1 or len(r) - n != 1:
            raise UserDataError(f"{row.where}: chosen and rejected must differ only in their final assistant "
                                "message (or give the prompt in a 'prompt' column)")
        p, a_c = prompt_and_answer(c)
        _, a_r = prompt_and_answer(r)
        return Comparison(p, (a_c, a_r), (0, 1))
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        return Comparison(_text(row, "prompt"), (_text(row, "chosen"), _text(row, "rejected")), (0, 1))
    if not (_is_list(prompt) and _is_list(chosen) and _is_list(rejected)):
        raise UserDataError(f"{row.where}: prompt, chosen and rejected must all be strings or all message lists, "
                            f"got {type(prompt).__name__}, {type(chosen).__name__}, {type(rejected).__name__}")
    pm = _messages(row, "prompt", final="not-assistant")
    answers = []
    for col in ("chosen", "rejected"):
        msgs = _answers(row, col)
        if len(msgs) != 1:
            raise UserDataError(f"{row.where}: {col} must be one assistant message after the prompt, "
                                f"got {len(msgs)} messages")
        answers.append(prompt_and_answer(pm + msgs)[1])
    return Comparison(render(pm, add_generation_prompt=True), (answers[0], answers[1]), (0, 1))


def prompt_text(row: Row) -> str:
    """A prompt-only row (or any row with a prompt) → the text the model continues."""
    col = "prompt" if row.data.get("prompt") is not None else "messages"
    if row.data.get(col) is None:
        raise UserDataError(f"{row.where}: missing column 'prompt' or 'messages' "
                            f"(has: {', '.join(sorted(row.data)) or 'nothing'})")
    _check_types(row, col)
    v = row.data[col]
    if isinstance(v, str):
        return _text(row, col)
    return render(_messages(row, col, final="not-assistant"), add_generation_prompt=True)


# --- datasets -------------------------------------------------------------------------------------------------
def resolve_format(rows: list[Row], fmt: str, allowed: tuple[str, ...], purpose: str) -> Format:
    """`fmt` ('auto' = detect from the columns), checked against the formats `purpose` can use."""
    if fmt not in ("auto", *FORMATS):
        raise UserDataError(f"format: unknown format {fmt!r} (use auto or one of {', '.join(FORMATS)})")
    out = detect_format(rows) if fmt == "auto" else fmt
    if out not in allowed:
        raise UserDataError(f"{rows[0].where}: a {out!r} file cannot be used for {purpose} "
                            f"(needs {' or '.join(allowed)})")
    return out  # type: ignore[return-value]


def read_demonstrations(source: str | Path, fmt: str = "auto") -> list[Demonstration]:
    """SFT data: prompt-completion or messages rows (all validated) → Demonstrations, in file order."""
    rows = read_rows(source)
    f = resolve_format(rows, fmt, ("prompt-completion", "messages"), "SFT demonstrations")
    return [demonstration(r, f) for r in rows]


def read_preferences(source: str | Path, fmt: str = "auto") -> list[Comparison]:
    """RM/DPO data: pairwise or K-wise rows (all validated) → Comparisons (pairwise: K=2, chosen first)."""
    rows = read_rows(source)
    f = resolve_format(rows, fmt, ("pairwise", "kwise"), "preferences")
    return [comparison(r, f) for r in rows]


def read_prompts(source: str | Path, fmt: str = "auto") -> list[str]:
    """RL / eval prompts: the prompt of every row (prompt-only files, or the prompts of any other format)."""
    rows = read_rows(source)
    f = resolve_format(rows, fmt, FORMATS, "prompts")
    if f == "prompts":
        return [prompt_text(r) for r in rows]
    if f in ("pairwise", "kwise"):
        return [comparison(r, f).prompt for r in rows]
    return [demonstration(r, f).prompt for r in rows]
