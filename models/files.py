"""Writing files so that a crash never leaves a half-written one: write a temporary sibling, flush it to disk,
rename it over the target (`os.replace` is atomic on POSIX within one filesystem). The one helper every config,
metrics rewrite, report, checkpoint pointer and data file of the project goes through."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; on success it is renamed to `path`, on error removed.
    For writers that want a path (pyarrow, safetensors, torch.save)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """`open(path, mode)` whose result appears at `path` only once the block finished without error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode: atomic files are written whole ('w' or 'wb'), got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write `data` (text or bytes) to `path` atomically; returns the path."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return Path(path)


def write_json(path: str | os.PathLike[str], data: Any, indent: int | None = 2) -> Path:
    """JSON (with a final newline) written atomically."""
    return write_atomic(path, json.dumps(data, indent=indent) + "\n")
