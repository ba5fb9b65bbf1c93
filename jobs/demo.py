"""`raygpt demo` (what `make demo` runs): the whole InstructGPT pipeline on the embedded defaults, on one local
Ray cluster, ending with runs/demo/report.md and its plots.

    tokenizer → prepare → pretrain → SFT → comparisons → RM → PPO-ptx [→ GRPO, RLOO, REINFORCE++, DPO] → eval
    → serve one request → report

`--algorithms ppo,grpo,rloo,reinforce_pp,dpo` adds stages from the same SFT and RM (DPO: the RM's comparisons);
the eval stage compares them all with SFT and the report adds a table and a gold-vs-KL plot (default: PPO alone).

Each stage is the job itself: its config class is loaded from the demo config's section of the same name (any
field of `raygpt <stage>`; the wiring between stages — run directories under runs/<name>/, checkpoints,
datasets — is filled in here), and its `run(cfg)` is called. All stage configs are resolved and validated
before the first stage starts; a stage that is missing or fails stops the demo with its name, never skipped.

Config: configs/demo.yaml by default (`--smoke`: configs/demo-smoke.yaml, a shortened run for CI); `--config`
and `--set` as for every job, e.g. `--set pretrain.optim.max_steps=300 --set ppo.iterations=10`.
`--set resume=true` keeps finished stages whose resolved config is unchanged (runs/<name>/stages.json).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from cluster import console
from cluster.runtime import init_ray, is_embedded, shutdown_ray
from jobs.cli import Arg, JobSpec, resolve_job
from jobs.config import ConfigError, deep_merge, dump_yaml, field, from_dict, to_dict
from jobs.report import write_report
from jobs.rl.config import PPOJobConfig
from jobs.serving.app import API_KEY_ENV, ServeConfig, build_app

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "demo.yaml"
SMOKE_CONFIG = PROJECT_ROOT / "configs" / "demo-smoke.yaml"


class StageError(RuntimeError):
    """A demo stage is missing, misconfigured or failed; the message names the stage."""


@dataclass
class RequestConfig:
    model: str = field("ppo", help="served model the request goes to")
    prompt: str = field("The king is", help="prompt of the one request sent to the served models")
    max_tokens: int = field(24, help="max_tokens of that request")


@dataclass
class DemoConfig:
    """The whole InstructGPT pipeline on one local Ray cluster (tokenizer → prepare → pretrain → SFT → comparisons
    → RM → PPO-ptx → eval → serve one request), ending with runs/<name>/report.md and plots. Reads
    configs/demo.yaml unless --config is given; --smoke reads configs/demo-smoke.yaml (tiny steps, for CI).
    Each stage section takes that job's fields (`raygpt <job> --help`)."""

    name: str = field("demo", help="run directory runs/<name>/ (stage runs inside it)")
    runs_root: str = field("runs", help="directory holding run directories")
    corpus: str = field("shakespeare", help="pretraining corpus ('shakespeare', 'pydoc', paths/globs)")
    address: str | None = field(None, help="Ray cluster address (default: $RAY_ADDRESS, else embedded 127.0.0.1)")
    num_cpus: int | None = field(4, help="logical CPUs of the embedded Ray cluster")
    resume: bool = field(False, help="keep finished stages whose config is unchanged (else start afresh)")
    until: str | None = field(None, help="stop after this stage (no serve/report), e.g. to iterate on one stage")
    goal_win_rate: float = field(0.75, help="win rate of PPO over SFT the report checks against")
    goal_max_kl: float | None = field(None, help="… reached at most at this KL(PPO‖SFT) (nats) with distinct-2 not "
                                                 "below SFT's (issue 17; null = win rate alone)")
    samples: int = field(4, help="side-by-side sample completions in the report")
    algorithms: list[str] = field(["ppo"], help="algorithms run from the same SFT and RM and compared in the report: "
                                               "ppo (always) and any of grpo, rloo, reinforce_pp, dpo")
    tokenizer: dict[str, Any] = field({}, help="`raygpt tokenizer` fields")
    prepare: dict[str, Any] = field({}, help="`raygpt prepare` fields")
    pretrain: dict[str, Any] = field({}, help="`raygpt pretrain` fields")
    sft: dict[str, Any] = field({}, help="`raygpt sft` fields")
    comparisons: dict[str, Any] = field({}, help="`raygpt comparisons` fields")
    rm: dict[str, Any] = field({}, help="`raygpt rm` fields")
    ppo: dict[str, Any] = field({}, help="`raygpt ppo` fields")
    grpo: dict[str, Any] = field({}, help="`raygpt ppo` fields of the GRPO run (with --algorithms …,grpo)")
    rloo: dict[str, Any] = field({}, help="`raygpt ppo` fields of the RLOO run (with --algorithms …,rloo)")
    reinforce_pp: dict[str, Any] = field({}, help="`raygpt ppo` fields of the REINFORCE++ run")
    dpo: dict[str, Any] = field({}, help="`raygpt dpo` fields (with --algorithms …,dpo)")
    eval: dict[str, Any] = field({}, help="`raygpt eval` fields")
    serve: dict[str, Any] = field({}, help="`raygpt serve` fields (checkpoints are wired here)")
    request: RequestConfig = field(RequestConfig(), help="the one request sent to the served models")

    def validate(self) -> None:
        if not 0.0 <= self.goal_win_rate <= 1.0:
            raise ConfigError(f"goal_win_rate: must be in [0, 1], got {self.goal_win_rate}")
        if self.samples < 0:
            raise ConfigError(f"samples: must be ≥ 0, got {self.samples}")
        names = [s.name for s in STAGES]
        for a in self.algorithms:
            if a != "ppo" and a not in EXTRA_ALGORITHMS:
                raise ConfigError(f"algorithms: unknown algorithm {a!r}; expected ppo and any of "
                                  f"{', '.join(EXTRA_ALGORITHMS)}")
        if "ppo" not in self.algorithms:
            raise ConfigError("algorithms: must include ppo (the served model and the report's headline are PPO's)")
        if self.until is not None and self.until not in names:
            raise ConfigError(f"until: must be one of {names}, got {self.until!r}")


def root_of(cfg: DemoConfig) -> Path:
    return Path(cfg.runs_root) / cfg.name


# --- wiring: what each stage reads is what the stage before wrote ----------------------------------------------
def _paths(cfg: DemoConfig) -> dict[str, str]:
    r = str(root_of(cfg))
    return {"root": r, "tokenizer": f"{r}/tokenizer/tokenizer.json", "data": f"{r}/data",
            "pretrain": f"{r}/pretrain/checkpoint", "sft": f"{r}/sft/checkpoint", "rm": f"{r}/rm/checkpoint",
            "ppo": f"{r}/ppo/checkpoint", "comparisons": f"{r}/comparisons",
            **{a: f"{r}/{a}/checkpoint" for a in EXTRA_ALGORITHMS}}


@dataclass(frozen=True)
class Stage:
    name: str          # the DemoConfig section (and the `raygpt` subcommand unless `job` names another)
    title: str
    wire: Callable[[DemoConfig], dict[str, Any]]
    job: str | None = None  # the `raygpt` subcommand, when it is not `name` (grpo → ppo)
    only: str | None = None  # run only when this algorithm is in DemoConfig.algorithms


# What `--algorithms` may add; each consumes PPO's responses per iteration (GRPO/RLOO: batch_size / 4 prompts × 4).
EXTRA_ALGORITHMS: dict[str, dict[str, Any]] = {a: {"algorithm": a, "group_size": 4} for a in ("grpo", "rloo")} | {
    "reinforce_pp": {"algorithm": "reinforce_pp"}, "dpo": {}}


def _online(name: str) -> Stage:
    def wire(c: DemoConfig) -> dict[str, Any]:
        # Same SFT, RM, pretraining mix and every other PPO-stage setting, so only the algorithm differs.
        extra, rows = EXTRA_ALGORITHMS[name], int(c.ppo.get("batch_size", PPOJobConfig.batch_size))
        return deep_merge({**_run_named(name)(c), "policy": _paths(c)["sft"], "reward_model": _paths(c)["rm"],
                           "ptx": {"data": _paths(c)["data"]}, **extra,
                           "batch_size": max(1, rows // int(extra.get("group_size", 1)))},
                          {k: v for k, v in c.ppo.items() if k not in ("name", "algorithm", "group_size",
                                                                          "batch_size")})
    return Stage(name, f"{name} on Ray actors (critic-free: policy, reference, reward)", wire, job="ppo", only=name)


def _run_named(stage: str) -> Callable[[DemoConfig], dict[str, Any]]:
    def wire(cfg: DemoConfig) -> dict[str, Any]:
        return {"name": stage, "runs_root": str(root_of(cfg))}
    return wire


STAGES: list[Stage] = [
    Stage("tokenizer", "train the byte-level BPE tokenizer",
          lambda c: {"corpus": c.corpus, "out": _paths(c)["tokenizer"]}),
    Stage("prepare", "tokenise the corpus into Parquet shards",
          lambda c: {"corpus": c.corpus, "tokenizer": _paths(c)["tokenizer"], "out": _paths(c)["data"]}),
    Stage("pretrain", "pretrain the GPT (Ray Train + DeepSpeed)",
          lambda c: {**_run_named("pretrain")(c), "data": {"dir": _paths(c)["data"], "prepare": False,
                                                            "tokenizer": _paths(c)["tokenizer"]}}),
    Stage("sft", "supervised fine-tuning on labeler-written demonstrations",
          lambda c: {**_run_named("sft")(c), "init_from": _paths(c)["pretrain"]}),
    Stage("comparisons", "sample K responses per prompt; the labeler ranks them",
          lambda c: {**_run_named("comparisons")(c), "policy": _paths(c)["sft"]}),
    Stage("rm", "train the K-wise reward model",
          lambda c: {**_run_named("rm")(c), "init_from": _paths(c)["sft"],
                     "comparisons": _paths(c)["comparisons"]}),
    Stage("ppo", "PPO-ptx on Ray actors (policy, reference, reward, value)",
          lambda c: {**_run_named("ppo")(c), "policy": _paths(c)["sft"], "reward_model": _paths(c)["rm"],
                     "ptx": {"data": _paths(c)["data"]}}),
    *[_online(a) for a in ("grpo", "rloo", "reinforce_pp")],
    Stage("dpo", "DPO from the RM's comparisons (Ray Train + DeepSpeed, frozen SFT reference)",
          lambda c: {**_run_named("dpo")(c), "init_from": _paths(c)["sft"], "comparisons": _paths(c)["comparisons"]},
          only="dpo"),
    Stage("eval", "held-out evaluation: gold and proxy reward, win rate, RM accuracy",
          lambda c: {**_run_named("eval")(c), "models": {"pretrained": _paths(c)["pretrain"],
                                                           "sft": _paths(c)["sft"],
                                                           **{a: _paths(c)[a] for a in ("ppo", *EXTRA_ALGORITHMS)
                                                              if a in c.algorithms}},
                     "reward_model": _paths(c)["rm"]}),
]


@dataclass
class Planned:
    stage: Stage
    cfg: Any
    run: Callable[[Any], Any]
    sha: str


def plan_stages(cfg: DemoConfig) -> list[Planned]:
    """Resolve and validate every stage's config (the job's own class) before anything runs."""
    planned = []
    last = [s.name for s in STAGES].index(cfg.until) if cfg.until else len(STAGES) - 1
    for stage in STAGES[:last + 1]:
        if stage.only is not None and stage.only not in cfg.algorithms:
            continue
        try:
            job = resolve_job(stage.job or stage.name, [])
            data = deep_merge(deep_merge(to_dict(job.cfg), stage.wire(cfg)), getattr(cfg, stage.name))
            stage_cfg = from_dict(job.cls, data)
        except ConfigError as e:
            raise StageError(f"stage {stage.name!r}: {e}") from None
        sha = hashlib.sha256(json.dumps(to_dict(stage_cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]
        planned.append(Planned(stage, stage_cfg, job.run, sha))
    return planned


def serve_config(cfg: DemoConfig) -> Any:

    p = _paths(cfg)
    base = {"models": [f"pretrained={p['pretrain']}", f"sft={p['sft']}", f"ppo={p['ppo']}"],
            "app_name": f"raygpt-{cfg.name}", "http": {"host": "127.0.0.1", "port": _free_port()}}
    try:
        return from_dict(ServeConfig, deep_merge(deep_merge(to_dict(ServeConfig()), base), cfg.serve))
    except ConfigError as e:
        raise StageError(f"stage 'serve': {e}") from None


def _api_key(scfg: Any) -> str | None:
    if scfg.http.api_key_file:
        return Path(scfg.http.api_key_file).expanduser().read_text().strip()
    return os.environ.get(API_KEY_ENV, "").strip() or None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_one_request(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    """Deploy the three checkpoints behind Ray Serve, send one /v1/completions request, tear down."""


    scfg = serve_config(cfg)
    app = build_app(scfg)
    serve.start(http_options={"host": scfg.http.host, "port": scfg.http.port})
    try:
        serve.run(app, name=scfg.app_name, route_prefix=scfg.http.route_prefix, blocking=False)
        url = f"http://{scfg.http.host}:{scfg.http.port}{scfg.http.route_prefix.rstrip('/')}/v1/completions"
        body = {"model": cfg.request.model, "prompt": cfg.request.prompt, "max_tokens": cfg.request.max_tokens,
                "temperature": 0}
        headers = {"Content-Type": "application/json"}
        key = _api_key(scfg)
        if key:  # the app requires the key when $RAYGPT_API_KEY or http.api_key_file is set
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=headers)
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.loads(r.read())
        result = {"url": url, "request": body, "latency_s": round(time.perf_counter() - t0, 3),
                  "completion": reply["choices"][0]["text"], "usage": reply.get("usage")}
    finally:
        serve.shutdown()
    (out / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"[demo] {cfg.request.model!r} answered {cfg.request.prompt!r} → {result['completion']!r} "
          f"in {result['latency_s']} s", flush=True)
    return result


# --- running ------------------------------------------------------------------------------------------------------
def _load_state(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str) + "\n")
    tmp.replace(path)


def _summary(result: Any) -> Any:
    if isinstance(result, dict):
        return {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return None


def run(cfg: DemoConfig) -> dict[str, Any]:

    planned = plan_stages(cfg)  # every stage validated first: a typo in ppo fails now, not after pretraining
    if not cfg.until:
        serve_config(cfg)
    root = root_of(cfg)
    if root.exists() and not cfg.resume:
        print(f"[demo] starting afresh: removing the previous {root}/", flush=True)
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, root / "config.yaml")
    console.redirect(root / "ray.log")
    state_path = root / "stages.json"
    state = _load_state(state_path) if cfg.resume else {}
    total = len(planned) + (0 if cfg.until else 2)
    t_start = time.perf_counter()
    init_ray(cfg.address, num_cpus=cfg.num_cpus)
    print(f"[demo] {total} stages on Ray ({'embedded 127.0.0.1' if is_embedded(cfg.address) else cfg.address}); "
          f"outputs in {root}/", flush=True)
    rerun = False
    try:
        for i, p in enumerate(planned, 1):
            prev = state.get(p.stage.name, {})
            # a stage is kept only if it and every stage before it are unchanged (its inputs are theirs)
            if cfg.resume and not rerun and prev.get("status") == "done" and prev.get("config_sha") == p.sha:
                print(f"[demo {i}/{total}] {p.stage.name}: kept from the previous run", flush=True)
                continue
            rerun = True
            _banner(i, total, p.stage.name, p.stage.title, t_start)
            state[p.stage.name] = {"status": "running", "config_sha": p.sha}
            _save_state(state_path, state)
            t0 = time.perf_counter()
            try:
                init_ray(cfg.address, num_cpus=cfg.num_cpus)  # a stage may have shut Ray down
                result = p.run(p.cfg)
            except BaseException as e:
                state[p.stage.name] = {"status": "failed", "config_sha": p.sha, "error": repr(e),
                                       "seconds": round(time.perf_counter() - t0, 1)}
                _save_state(state_path, state)
                if isinstance(e, KeyboardInterrupt):
                    raise
                traceback.print_exc()
                raise StageError(f"stage {p.stage.name!r} failed after {time.perf_counter() - t0:.0f} s: "
                                 f"{type(e).__name__}: {e}") from e
            state[p.stage.name] = {"status": "done", "config_sha": p.sha, "result": _summary(result),
                                   "seconds": round(time.perf_counter() - t0, 1)}
            _save_state(state_path, state)
            print(f"[demo {i}/{total}] {p.stage.name} done in {time.perf_counter() - t0:.0f} s", flush=True)
        if cfg.until:
            print(f"[demo] stopped after {cfg.until} (until); no serve/report", flush=True)
            return {"until": cfg.until, "seconds": round(time.perf_counter() - t_start, 1)}

        _banner(total - 1, total, "serve", "Ray Serve: one request to the served models", t_start)
        t0 = time.perf_counter()
        try:
            init_ray(cfg.address, num_cpus=cfg.num_cpus)
            served = serve_one_request(cfg, root)
        except BaseException as e:
            raise StageError(f"stage 'serve' failed: {type(e).__name__}: {e}") from e
        state["serve"] = {"status": "done", "result": _summary(served), "seconds": round(time.perf_counter() - t0, 1)}
        _save_state(state_path, state)
    finally:
        if is_embedded(cfg.address):
            shutdown_ray()

    _banner(total, total, "report", "report.md and plots", t_start)

    try:
        report = write_report(root, cfg, state, time.perf_counter() - t_start)
    except Exception as e:
        raise StageError(f"stage 'report' failed: {type(e).__name__}: {e}") from e
    wall = time.perf_counter() - t_start
    state["report"] = {"status": "done", "path": str(report["path"]), "total_seconds": round(wall, 1)}
    _save_state(state_path, state)
    print(f"[demo] done in {wall / 60:.1f} min: {report['path']}", flush=True)
    for line in report.get("headline", []):
        print(f"[demo] {line}", flush=True)
    return {"report": str(report["path"]), "seconds": round(wall, 1), **report.get("numbers", {})}


def _banner(i: int, total: int, name: str, title: str, t_start: float) -> None:
    elapsed = time.perf_counter() - t_start
    print(f"\n[demo {i}/{total}] {name}: {title}  (elapsed {elapsed / 60:.1f} min)", flush=True)


def _plan_text(cfg: DemoConfig) -> str:
    try:
        planned = plan_stages(cfg)
    except StageError as e:
        return f"error: {e}"
    return "\n".join(f"{i}. {p.stage.name}: {p.stage.title}" for i, p in enumerate(planned, 1)) + \
        f"\n{len(planned) + 1}. serve: one request\n{len(planned) + 2}. report: {root_of(cfg)}/report.md"


JOB = JobSpec(DemoConfig, run, "raygpt demo", plan=_plan_text, args=(
    Arg(("--algorithms",), "algorithms", "comma-separated algorithms compared from the same SFT and RM, e.g. "
        "ppo,grpo,rloo,reinforce_pp,dpo (default: ppo)", type=lambda t: [a.strip() for a in t.split(",") if a]),))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--smoke" in argv:
        argv.remove("--smoke")
        argv = ["--config", str(SMOKE_CONFIG), *argv]
    elif not any(a == "--config" or a.startswith("--config=") for a in argv) and DEFAULT_CONFIG.is_file() \
            and not {"-h", "--help"} & set(argv):
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    try:
        return JOB.main(argv)
    except StageError as e:
        print(f"\n[demo] FAILED: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
