"""Job metrics on Ray's own metrics pipeline, so they show in the Ray dashboard's metrics views (Prometheus /
Grafana) beside Ray's system metrics, for runs on a laptop and on a cluster alike.

`publish(run, row)` mirrors the numeric values of one metrics.jsonl row as gauges `ray_raygpt_<key>{run=…}`
(Ray prefixes `ray_`), exported by every node's metrics agent (`ray start --metrics-export-port`, scraped by
Prometheus). It does nothing when Ray is not initialised in this process, so writers can always call it.
"""

from __future__ import annotations

import math
import re
from typing import Any

_gauges: dict[str, Any] = {}
_BAD = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(key: str) -> str:
    """'val/loss' → 'raygpt_val_loss' (Prometheus names: letters, digits, underscores)."""
    return "raygpt_" + _BAD.sub("_", key).strip("_")


def publish(run: str, row: dict[str, Any]) -> int:
    """Set one gauge per numeric, finite value of `row` (tag run=`run`); returns how many were set."""
    import ray

    if not ray.is_initialized():
        return 0
    from ray.util.metrics import Gauge

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
