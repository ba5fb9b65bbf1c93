"""Run directories: `runs/<name>/` holds config.yaml (the resolved config), metrics.jsonl and TensorBoard events
(`cluster.metrics.MetricsWriter`), checkpoints and the report (docs/RUNS.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster import console
from jobs.config import ConfigError, dump_yaml


def run_dir(name: str, root: str | Path = "runs") -> Path:
    if not name or "/" in name or name in {".", ".."}:
        raise ValueError(f"name: {name!r} is not a valid run name (one path component)")
    return Path(root) / name


def start_run(cfg: Any, name: str, root: str | Path = "runs") -> Path:
    """Create runs/<name>/, write the resolved config as config.yaml, and send Ray's console chatter to
    runs/<name>/ray.log (cluster/console.py)."""
    d = run_dir(name, root)
    try:
        d.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, d / "config.yaml")
    except OSError as e:  # read-only or full runs directory: say so before any work starts, not at the 1st save
        raise ConfigError(f"runs_root: cannot write the run directory {d} ({e.strerror or e}); choose a writable "
                          "runs_root (--set runs_root=...) or free space") from None
    console.redirect(d / "ray.log")
    return d
