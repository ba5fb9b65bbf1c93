"""Job metrics: one JSON object per step in runs/<name>/metrics.jsonl (`MetricsWriter`, one per job process: the
driver, Ray Train's controller callback or rank 0), mirrored to TensorBoard event files and to Ray's own metrics
pipeline, so they show in the Ray dashboard's metrics views (Prometheus / Grafana) beside Ray's system metrics,
for runs on a laptop and on a cluster alike.

`publish(run, row)` mirrors the numeric values of one metrics.jsonl row as gauges `ray_raygpt_<key>{run=…}`
(Ray prefixes `ray_`), exported by every node's metrics agent (`ray start --metrics-export-port`, scraped by
Prometheus). It does nothing when Ray is not initialised in this process, so writers can always call it.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import ray
from ray.util.metrics import Gauge
from tensorboardX import SummaryWriter

_gauges: dict[str, Any] = {}
_BAD = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(key: str) -> str:
    """'val/loss' → 'raygpt_val_loss' (Prometheus names: letters, digits, underscores)."""
    return "raygpt_" + _BAD.sub("_", key).strip("_")


def publish(run: str, row: dict[str, Any]) -> int:
    """Set one gauge per numeric, finite value of `row` (tag run=`run`); returns how many were set."""
    if not ray.is_initialized():
        return 0
    n = 0
    for key, value in row.items():
        if key == "time" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        name = metric_name(key)
        gauge = _gauges.get(name)
        if gauge is None:
            gauge = _gauges[name] = Gauge(name, description=f"raygpt metric {key!r} (metrics.jsonl)",
                                          tag_keys=("run",))
        gauge.set(float(value), tags={"run": run})
        n += 1
    return n


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
            self._tb = SummaryWriter(str(self.dir / "tb"))

    def write(self, step: int, **metrics: Any) -> dict[str, Any]:
        row = {"step": step, "time": round(time.time(), 3), **{k: _clean(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
        publish(self.dir.name, row)  # Ray's metrics export (dashboard/Prometheus) when Ray runs in this process
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
