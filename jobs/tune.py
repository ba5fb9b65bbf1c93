"""`raygpt tune`: a Ray Tune sweep with ASHA early stopping over any job's config fields.

    raygpt tune --set job=pretrain --set 'space={optim.lr: "loguniform(1e-4, 3e-3)"}' \\
                --set 'job_args=[--set, optim.max_steps=200]' --set metric=val_loss

Each trial runs the job's own `run(cfg)` (the same code as `raygpt <job>`) with the sampled fields set and its
own run directory `runs/<name>-<trial>/`. A trial function runs the job in a thread and reports every new
row of the job's metrics.jsonl that holds `metric` to Tune, so ASHA (Li et al. 2018, "Massively Parallel
Hyperparameter Tuning") stops trials that fall behind at its rungs. Jobs built on Ray Train run their
`trainer.fit()` inside the trial this way — Ray 2.60's Train V2 refuses `Tuner(TorchTrainer)`.

Search space values: `loguniform(a, b)`, `uniform(a, b)`, `randint(a, b)`, `choice(x, y, …)`, `grid(x, y, …)`.
Every field is checked against the job's config class before Ray starts (a misspelt field is named).

Outputs in runs/<name>/: config.yaml (this sweep), trials.jsonl (one row per trial: params, last metric,
reports, stopped early or not), best.yaml (the best trial's full job config: `raygpt <job> --config best.yaml`
reproduces it) and summary.json.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from cluster.runtime import init_ray, is_embedded, shutdown_ray
from jobs.cli import JobSpec, ResolvedJob, resolve_job
from jobs.config import ConfigError, dump_yaml, field, from_dict, merge, to_dict
from jobs.runs import start_run

_SPEC = re.compile(r"^\s*(loguniform|uniform|randint|choice|grid)\s*\((.*)\)\s*$")


@dataclass
class AshaConfig:
    grace_period: int = field(2, help="reports every trial gets before it can be stopped")
    reduction_factor: int = field(2, help="keep the best 1/reduction_factor of trials at each rung")
    max_t: int = field(1000, help="reports after which a trial is stopped anyway")


@dataclass
class TuneJobConfig:
    """Ray Tune (ASHA) sweep over a job's config fields; writes the best trial's config."""

    name: str = field("tune", help="sweep name: runs/<name>/; trials run as runs/<name>-<trial>/")
    runs_root: str = field("runs", help="directory holding run directories")
    job: str = field("pretrain", help="job to tune (a raygpt subcommand, or a dotted module with main/run)")
    job_args: list[str] = field([], help="the job's own arguments, e.g. [--config, f.yaml, --set, optim.max_steps=200]")
    space: dict[str, str] = field({"optim.lr": "loguniform(1e-4, 3e-3)"},
                                  help="dotted job field -> loguniform(a,b) | uniform(a,b) | randint(a,b) | "
                                       "choice(x,y,…) | grid(x,y,…)")
    metric: str = field("val_loss", help="metrics.jsonl key to optimise")
    mode: Literal["min", "max"] = field("min", help="minimise or maximise metric")
    num_samples: int = field(4, help="trials (with grid values: repeats of the grid)")
    max_concurrent: int = field(2, help="trials at once")
    cpus_per_trial: float = field(1.0, help="CPUs reserved by each trial's driver (its job reserves its own workers)")
    gpus_per_trial: float = field(0.0, help="GPUs reserved by each trial's driver")
    run_name_field: str = field("name", help="job field naming its run directory (set per trial)")
    runs_root_field: str = field("runs_root", help="job field holding the runs root ('' = runs_root above)")
    seed: int = field(0, help="search seed")
    address: str | None = field(None, help="Ray cluster address (default: $RAY_ADDRESS, else embedded)")
    num_cpus: int | None = field(None, help="logical CPUs of the embedded Ray cluster (default: all)")
    asha: AshaConfig = field(AshaConfig(), help="ASHA scheduler")

    def validate(self) -> None:
        if not self.space:
            raise ConfigError("space: give at least one field to sweep")
        for key, spec in self.space.items():
            parse_spec(spec, f"space.{key}")
        for name in ("num_samples", "max_concurrent"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be ≥ 1, got {getattr(self, name)}")
        a = self.asha
        if not 1 <= a.grace_period <= a.max_t or a.reduction_factor < 2:
            raise ConfigError("asha: need 1 ≤ grace_period ≤ max_t and reduction_factor ≥ 2")


def parse_spec(spec: str, where: str) -> tuple[str, list[Any]]:
    """'loguniform(1e-4, 3e-3)' → ('loguniform', [0.0001, 0.003]); ConfigError naming `where` if malformed."""
    m = _SPEC.match(spec) if isinstance(spec, str) else None
    if not m:
        raise ConfigError(f"{where}: {spec!r} is not loguniform(a,b) | uniform(a,b) | randint(a,b) | choice(…) | "
                          "grid(…)")
    kind, body = m.groups()
    try:
        args = yaml.safe_load(f"[{body}]")
    except yaml.YAMLError:
        raise ConfigError(f"{where}: cannot parse the arguments of {spec!r}") from None
    args = [float(a) if isinstance(a, str) and _is_float(a) else a for a in args]  # YAML 1.1 reads 1e-4 as str
    if kind in ("loguniform", "uniform", "randint"):
        if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]:
            raise ConfigError(f"{where}: {kind} needs two numbers low < high, got {spec!r}")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {spec!r}")
    elif not args:
        raise ConfigError(f"{where}: {kind} needs at least one value")
    return kind, args


def _is_float(s: str) -> bool:
    try:
        return math.isfinite(float(s))
    except ValueError:
        return False


def _samples(kind: str, args: list[Any]) -> list[Any]:
    """Values that stand for the domain when checking that a field accepts it (its ends, or every choice)."""
    if kind == "randint":
        return [int(args[0]), int(args[1]) - 1]
    return list(args)


def tune_domain(kind: str, args: list[Any]) -> Any:

    return {"loguniform": lambda: tune.loguniform(*args), "uniform": lambda: tune.uniform(*args),
            "randint": lambda: tune.randint(int(args[0]), int(args[1])), "choice": lambda: tune.choice(args),
            "grid": lambda: tune.grid_search(args)}[kind]()


def trial_config(job: ResolvedJob, params: dict[str, Any], run_name: str | None = None,
                 cfg: TuneJobConfig | None = None) -> Any:
    """The job's config with `params` (dotted field → value) applied; ConfigError naming the field."""
    data = to_dict(job.cfg)
    for key, value in params.items():
        merge(data, key.split("."), value)
    if run_name is not None and cfg is not None:
        merge(data, cfg.run_name_field.split("."), run_name)
    return from_dict(job.cls, data)


def check(cfg: TuneJobConfig) -> ResolvedJob:
    """Resolve the job and check every swept value against its config class, before Ray starts."""
    job = resolve_job(cfg.job, cfg.job_args)
    data = to_dict(job.cfg)
    for path in [cfg.run_name_field] + ([cfg.runs_root_field] if cfg.runs_root_field else []):
        node: Any = data
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"run_name_field/runs_root_field: {cfg.job} has no field {path!r}")
            node = node[part]
    for key, spec in cfg.space.items():
        kind, args = parse_spec(spec, f"space.{key}")
        for value in _samples(kind, args):
            try:
                trial_config(job, {key: value})
            except ConfigError as e:
                raise ConfigError(f"space.{key}: {e}") from None
    return job


def _metrics_path(job_cfg: Any, cfg: TuneJobConfig) -> Path:
    data = to_dict(job_cfg)

    def get(path: str) -> Any:
        node: Any = data
        for part in path.split("."):
            node = node[part]
        return node

    root = get(cfg.runs_root_field) if cfg.runs_root_field else cfg.runs_root
    return Path(root) / str(get(cfg.run_name_field)) / "metrics.jsonl"


def make_trainable(job: ResolvedJob, cfg: TuneJobConfig, cwd: str) -> Any:
    """The Tune function trainable: run the job in a thread, stream its metric rows to Tune."""

    def trainable(params: dict[str, Any]) -> None:

        if os.path.isdir(cwd):
            os.chdir(cwd)  # Tune starts trials in their trial dir; the job's relative paths mean the project's
        trial_id = tune.get_context().get_trial_id()
        job_cfg = trial_config(job, params, f"{cfg.name}-{trial_id}", cfg)
        path = _metrics_path(job_cfg, cfg)
        if path.exists():
            path.unlink()  # a rerun with the same trial id starts a fresh curve
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                job.run(job_cfg)
            except BaseException as e:  # noqa: BLE001 - re-raised in the trial's main thread
                outcome["error"] = e

        thread = threading.Thread(target=target, name=f"{cfg.job}-trial", daemon=True)
        thread.start()
        seen = 0
        while True:
            alive = thread.is_alive()
            rows = path.read_text().splitlines() if path.exists() else []
            for line in rows[seen:]:
                if not line.endswith("}"):
                    break  # a row still being written
                seen += 1
                row = json.loads(line)
                if row.get(cfg.metric) is not None:
                    tune.report({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "time"})
            if not alive:
                break
            time.sleep(0.2)
        if "error" in outcome:
            raise outcome["error"]

    return trainable


def run(cfg: TuneJobConfig) -> dict[str, Any]:
    return sweep(check(cfg), cfg)


def sweep(job: ResolvedJob, cfg: TuneJobConfig) -> dict[str, Any]:
    """Run the sweep for an already resolved job (tests pass their own)."""


    out = start_run(cfg, cfg.name, cfg.runs_root).resolve()
    started_here = not ray.is_initialized()
    init_ray(cfg.address, num_cpus=cfg.num_cpus)
    space = {key: tune_domain(*parse_spec(spec, f"space.{key}")) for key, spec in cfg.space.items()}
    trainable = tune.with_resources(make_trainable(job, cfg, os.getcwd()),
                                    {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.asha.max_t,
                              grace_period=cfg.asha.grace_period, reduction_factor=cfg.asha.reduction_factor)
    search = _seeded_search(cfg.seed, cfg.max_concurrent)
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, scheduler=scheduler, search_alg=search,
                                    num_samples=cfg.num_samples, max_concurrent_trials=cfg.max_concurrent),
        run_config=tune.RunConfig(name="ray_tune", storage_path=str(out), verbose=1),
    )
    t0 = time.perf_counter()
    try:
        grid = tuner.fit()
    finally:
        if started_here and is_embedded(cfg.address):
            shutdown_ray()
    trials = []
    for r in grid:
        reports = (r.metrics or {}).get("training_iteration", 0)
        trials.append({"trial": r.path.rsplit("/", 1)[-1] if r.path else None, "params": r.config,
                       cfg.metric: (r.metrics or {}).get(cfg.metric), "reports": reports,
                       "stopped_early": r.error is None and reports < _reports_of_full_run(grid),
                       "error": repr(r.error) if r.error else None})
    _write_jsonl(out / "trials.jsonl", trials)
    ok = [t for t in trials if t[cfg.metric] is not None and t["error"] is None]
    if not ok:
        raise RuntimeError(f"tune: no trial reported {cfg.metric!r}; see {out / 'trials.jsonl'}")
    best = (min if cfg.mode == "min" else max)(ok, key=lambda t: t[cfg.metric])
    best_cfg = trial_config(job, best["params"], f"{cfg.name}-best", cfg)
    dump_yaml(best_cfg, out / "best.yaml")
    summary = {"job": cfg.job, "metric": cfg.metric, "mode": cfg.mode, "best": best, "trials": len(trials),
               "stopped_early": sum(t["stopped_early"] for t in trials), "best_config": str(out / "best.yaml"),
               "wall_seconds": round(time.perf_counter() - t0, 2)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return summary


def _reports_of_full_run(grid: Any) -> int:
    return max(((r.metrics or {}).get("training_iteration", 0) for r in grid), default=0)


def _seeded_search(seed: int, max_concurrent: int) -> Any:

    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    tmp.replace(path)


JOB = JobSpec(TuneJobConfig, run, "raygpt tune")
main = JOB.main


if __name__ == "__main__":
    sys.exit(main())
