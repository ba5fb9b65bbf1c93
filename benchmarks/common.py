"""Shared benchmark helpers: the machine description and peak RSS of a process tree (Ray's processes
included: an embedded Ray's raylet/GCS/workers are children of the driver), and writing rows into
docs/BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import re
import threading
import time
from pathlib import Path
from types import TracebackType

import psutil

ROOT = Path(__file__).resolve().parents[1]
BENCH_DOC = ROOT / "docs" / "BENCHMARKS.md"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}")


def process_tree(pid: int | None = None) -> list[psutil.Process]:
    """A process and all its descendants ([] if it is gone)."""
    try:
        root = psutil.Process(pid or os.getpid())
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_rss(pid: int | None = None) -> int:
    """Resident bytes of a process and all its descendants."""
    total = 0
    for p in process_tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def tree_cpu(seen: dict[int, float], pid: int | None = None) -> float:
    """CPU seconds (user + system, all threads) of a process and its descendants, including those that exited
    since the last call (`seen`: pid → its last CPU time, updated here)."""
    for p in process_tree(pid):
        try:
            t = p.cpu_times()
            seen[p.pid] = max(seen.get(p.pid, 0.0), t.user + t.system)
        except psutil.Error:
            pass
    return sum(seen.values())


class PeakRSS:
    """Context manager sampling the tree RSS every `interval` s; `.peak_gib` after exit. Also counts every
    process whose command line mentions ray's raylet/gcs_server started by us (they are children). With
    `cpu=True` it also samples the tree's cumulative CPU seconds: `cpu_between(t0, t1)` (wall-clock times)."""

    def __init__(self, interval: float = 0.2, cpu: bool = False) -> None:
        self.interval = interval
        self.peak = 0
        self.cpu_samples: list[tuple[float, float]] = []  # (time.time(), tree CPU seconds so far)
        self._cpu = cpu
        self._seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss())
            if self._cpu:
                self.cpu_samples.append((time.time(), tree_cpu(self._seen)))
            self._stop.wait(self.interval)

    def cpu_between(self, t0: float, t1: float) -> float:
        """Tree CPU seconds spent between wall-clock times t0 < t1 (linear between samples)."""
        def at(t: float) -> float:
            pts = self.cpu_samples
            for (ta, ca), (tb, cb) in zip(pts, pts[1:]):
                if ta <= t <= tb:
                    return ca + (cb - ca) * (t - ta) / max(tb - ta, 1e-9)
            raise ValueError(f"time {t} outside the sampled span")
        return at(t1) - at(t0)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss())

    @property
    def peak_gib(self) -> float:
        return self.peak / 2**30


def timed(fn, *args, repeats: int = 3, warmup: int = 1, **kwargs) -> float:  # type: ignore[no-untyped-def]
    """Best-of-`repeats` wall time in seconds after `warmup` calls."""
    for _ in range(warmup):
        fn(*args, **kwargs)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t)
    return best


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section `## name` of docs/BENCHMARKS.md with `body`, stamped with the machine."""
    BENCH_DOC.parent.mkdir(parents=True, exist_ok=True)
    text = BENCH_DOC.read_text() if BENCH_DOC.exists() else (
        "# Benchmarks\n\nMeasured by `make bench` (each section is rewritten by its benchmark).\n"
    )
    stamp = time.strftime("%Y-%m-%d")
    section = f"## {name}\n\n_Measured {stamp} on {machine()}._\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    BENCH_DOC.write_text(text)
