"""Driver side of the training engine (cluster/train/engine.py): start the Ray Train run, turn the workers' reports
into runs/<name>/metrics.jsonl, and show a progress bar.

`launch` builds the `TorchTrainer`: the torch.distributed backend (cluster/distributed.py: FileStore rendezvous on
a one-node cluster, Ray Train's TCPStore otherwise), `ScalingConfig` (a (min, max) worker range when elastic),
`RunConfig(storage_path=run_dir, name="trainer_state")` so checkpoints land in runs/<name>/trainer_state/,
`FailureConfig(max_failures)`, and the metrics callback. Everything that can be checked before a worker starts
is checked here (layout, and on one node that the cluster has the CPUs/GPUs the workers need).
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.train.config import ParallelConfig
from models.config import ConfigError
from models.files import write_atomic


def _single_node() -> bool:
    import ray

    return len([n for n in ray.nodes() if n.get("Alive")]) <= 1


def metrics_callback(run_dir: str) -> Any:
    """Ray Train callback (runs in the Train controller): rank 0's report → one row of run_dir/metrics.jsonl.

    A restart after a worker failure replays the steps after the restored checkpoint; their old rows are dropped
    (the file is rewritten up to the restored step, tmp + rename) so every step appears once, with the values
    of the attempt that counted."""
    from ray.train import UserCallback

    class MetricsCallback(UserCallback):
        def __init__(self) -> None:
            self.writer: Any = None
            self.last_step = -1

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            from cluster.metrics import MetricsWriter

            report = metrics[0] if metrics else {}
            rows = report.get("rows", [report] if "step" in report else [])
            for row in rows:
                row = dict(row)
                step = row.pop("step")
                if self.writer is None:
                    self.writer = MetricsWriter(run_dir)
                    self.last_step = max([-1, *(r.get("step", -1) for r in _read_rows(self.writer.path))])
                if step <= self.last_step:  # replay after a restore: forget the superseded rows
                    self.writer.close()
                    _truncate_rows(Path(run_dir) / "metrics.jsonl", step)
                    self.writer = MetricsWriter(run_dir)
                self.writer.write(step, **row)
                self.last_step = step

    return MetricsCallback()


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_rows(path: Path, step: int) -> None:
    keep = [r for r in _read_rows(path) if r.get("step", -1) < step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


class Progress:
    """Driver-side progress bar: tails metrics.jsonl while `trainer.fit()` blocks the main thread."""

    def __init__(self, run_dir: Path, total: int, keys: tuple[str, ...] = ("loss", "val_ppl", "tokens_per_s")):
        self.path, self.total, self.keys = run_dir / "metrics.jsonl", total, keys
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._shown = -1

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._render(final=True)

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self._render()

    def _render(self, final: bool = False) -> None:
        rows = _read_rows(self.path)
        if not rows:
            return
        last = rows[-1]
        step = last.get("step", 0)
        if step == self._shown and not final:
            return
        self._shown = step
        frac = min(1.0, step / max(self.total, 1))
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        vals = {k: last[k] for k in self.keys if k in last}
        for r in reversed(rows):  # the latest validation value, which is logged less often
            if "val_ppl" in r:
                vals.setdefault("val_ppl", r["val_ppl"])
                break
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in vals.items())
        print(f"\r[{bar}] step {step}/{self.total} {text}", end="\n" if final else "", flush=True)


def launch(train_loop_per_worker: Callable[[dict[str, Any]], None], loop_config: dict[str, Any],
           parallel: ParallelConfig, run_dir: Path, max_failures: int, name: str = "trainer_state",
           keep: int = 2, progress_steps: int | None = None) -> Any:
    """Run `train_loop_per_worker(loop_config)` on `parallel.num_workers` Ray Train workers; returns the
    `ray.train.Result` (raises its error). Ray must be initialised (cluster.runtime.init_ray).

    Checks before any worker starts: the layout (`parallel.validate()`), and on a one-node cluster that it has
    the CPUs/GPUs the workers need (Ray would otherwise wait forever). Checkpoints land in
    run_dir/<name>/step-XXXXXXXX/ (re-running the same run_dir continues from the latest one, Ray Train's
    job-level restore); metrics.jsonl in run_dir.
    """
    import ray
    from ray.train import CheckpointConfig as RayCheckpointConfig
    from ray.train import FailureConfig as RayFailureConfig
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.distributed import torch_config

    parallel.validate()
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    single = _single_node()
    need = {"CPU": parallel.cpus_per_worker * (parallel.min_workers or parallel.num_workers)}
    if parallel.use_gpu:
        need["GPU"] = parallel.min_workers or parallel.num_workers
    if single:
        have = ray.cluster_resources()
        for res, n in need.items():
            if have.get(res, 0) < n:
                raise ConfigError(f"parallel.num_workers: {parallel.num_workers} workers need {n} {res} "
                                  f"(cpus_per_worker={parallel.cpus_per_worker}), the cluster has {have.get(res, 0)}")
    file_store = parallel.rendezvous == "file" or (parallel.rendezvous == "auto" and single)
    backend = torch_config(file_store, run_dir / ".rendezvous", use_gpu=parallel.use_gpu)
    workers: Any = (parallel.min_workers, parallel.num_workers) if parallel.elastic else parallel.num_workers
    resources = {"CPU": parallel.cpus_per_worker, **({"GPU": 1} if parallel.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config, torch_config=backend,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=parallel.use_gpu, resources_per_worker=resources,
                                     **({"elastic_resize_monitor_interval_s": parallel.elastic_interval_s}
                                        if parallel.elastic else {})),
        run_config=RunConfig(
            name=name, storage_path=str(run_dir), failure_config=RayFailureConfig(max_failures=max_failures),
            checkpoint_config=RayCheckpointConfig(num_to_keep=keep), callbacks=[metrics_callback(str(run_dir))]),
    )
    if progress_steps:
        with Progress(run_dir, progress_steps):
            result = trainer.fit()
    else:
        result = trainer.fit()
    shutil.rmtree(run_dir / ".rendezvous", ignore_errors=True)
    if result.error is not None:
        raise result.error
    return result
