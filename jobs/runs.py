"""Run directories and metrics: `runs/<name>/` holds config.yaml, metrics.jsonl, TensorBoard events,
checkpoints and the report. One `MetricsWriter` per job process (the driver or rank 0)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from jobs.config import dump_yaml


def run_dir(name: str, root: str | Path = "runs") -> Path:
    if not name or "/" in name or name in {".", ".."}:
        raise ValueError(f"name: {name!r} is not a valid run name (one path component)")
    return Path(root) / name


def start_run(cfg: Any, name: str, root: str | Path = "runs") -> Path:
    """Create runs/<name>/ and write the resolved config as config.yaml."""
    d = run_dir(name, root)
    d.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, d / "config.yaml")
    return d


def _clean(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class MetricsWriter:
    """Appends one JSON object per step to metrics.jsonl (flushed every write, so a crash loses nothing
    already written) and mirrors numeric values to TensorBoard event files under `tb/`."""

    def __init__(self, directory: str | Path, tensorboard: bool = True) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self._f = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tb"))

    def write(self, step: int, **metrics: Any) -> dict[str, Any]:
        row = {"step": step, "time": round(time.time(), 3), **{k: _clean(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
        if "ray" in sys.modules:  # mirror on Ray's metrics export (dashboard/Prometheus) when Ray runs here
            from cluster.ray_metrics import publish

            publish(self.dir.name, row)
        return row

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
