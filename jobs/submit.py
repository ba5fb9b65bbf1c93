"""`raygpt submit/status/logs/stop`: run a raygpt job on a Ray cluster through Ray's Job Submission API.

    raygpt submit [--address URL] [--no-wait] [--pip PKG] [--env K=V] -- <job> [--config F] [--set k=v ...]
    raygpt status JOB_ID · raygpt logs JOB_ID [--follow] · raygpt stop JOB_ID

`submit` resolves the job's config locally first, with the job's own config class (`jobs.cli.resolve_job`), so a
bad spec is rejected with the field named before anything reaches the cluster. It then submits
`python -m jobs.<module> <args>` with a `runtime_env` whose `working_dir` is this project (the top-level packages
`models`, `actors`, `cluster`, `jobs` are importable on every node without installing anything; `.gitignore`d
paths such as .venv, runs/ and data/ are not uploaded), streams the job's logs and exits with the job's status.
It is the same as `ray job submit --working-dir . -- python -m jobs.<module> …`, plus the local validation.

Paths in the job's config are read on the cluster, relative to the uploaded working dir: data and outputs that
must outlive the job belong on storage every node sees (an absolute path, e.g. `--set out=/mnt/shared/…`).

The cluster address is `--address`, else $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS, else http://127.0.0.1:8265
(the dashboard of a local `ray start --head`). A cluster with token authentication (the default in Ray 2.60)
needs `RAY_AUTH_MODE=token` and its token (`~/.ray/auth_token` or $RAY_AUTH_TOKEN) here too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from ray.job_submission import JobSubmissionClient

from jobs.cli import resolve_job
from jobs.config import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded even without a .gitignore (Ray honours .gitignore too): environments, caches, outputs.
EXCLUDES = ["/.git/", "/.venv/", "/.tmp/", "/runs/", "/data/", "/build/", "/dist/", "__pycache__/", "*.pyc",
            ".pytest_cache/", ".ruff_cache/", "*.egg-info/"]
# Environment of the submitted driver and its workers. Deliberately NOT the loopback settings of
# cluster.runtime.WORKER_ENV (GLOO_SOCKET_IFNAME=lo would break gloo between real nodes).
JOB_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}


def address_of(address: str | None) -> str:
    return address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def _client(address: str | None) -> Any:

    return JobSubmissionClient(address_of(address))


def build_submission(job: str, job_args: list[str], working_dir: str | Path = PROJECT_ROOT,
                     pip: list[str] | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Validate `raygpt <job> <job_args>` locally and return the `submit_job` keyword arguments.

    Raises ConfigError naming the field (bad spec) or the file (config outside the uploaded working dir).
    """
    resolved = resolve_job(job, job_args)  # the job's own config class: same checks as on the cluster
    wd = Path(working_dir).resolve()
    if not (wd / resolved.module.replace(".", "/")).with_suffix(".py").is_file():
        raise ConfigError(f"working_dir: {wd} does not contain {resolved.module} (submit from the project root)")
    job_args = [x for a in job_args for x in (a.split("=", 1) if a.startswith("--config=") else [a])]
    args = [_config_in(wd, v) if a == "--config" else v for a, v in zip(["", *job_args], job_args)]
    runtime_env: dict[str, Any] = {"working_dir": str(wd), "excludes": list(EXCLUDES),
                                   "env_vars": {**JOB_ENV, **(env or {})}}
    if pip:
        runtime_env["pip"] = list(pip)
    entrypoint = shlex.join(["python", "-m", resolved.module, *args])
    return {"entrypoint": entrypoint, "runtime_env": runtime_env,
            "metadata": {"raygpt_job": resolved.command}}


def _config_in(wd: Path, path: str) -> str:
    """The --config FILE is read on the cluster, so it must travel inside the working dir; return it relative."""
    p = Path(path).resolve()
    if not p.is_relative_to(wd):
        raise ConfigError(f"--config {path}: outside the working dir {wd}, so it would not be uploaded")
    return str(p.relative_to(wd))


async def _tail(client: Any, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def wait(client: Any, job_id: str, follow: bool = True, poll_s: float = 1.0) -> str:
    """Stream the job's logs (if `follow`) until it ends; return its terminal status."""
    if follow:
        try:
            asyncio.run(_tail(client, job_id))
        except Exception as e:  # the log stream can drop (head restart, proxy); the status still tells the end
            print(f"[raygpt] log stream ended early ({type(e).__name__}: {e}); polling status", file=sys.stderr)
    while True:
        status = str(client.get_job_status(job_id))
        if status in EXIT_CODES:
            return status
        time.sleep(poll_s)


def submit(argv: list[str]) -> int:
    if "--" in argv:
        split = argv.index("--")
        own, job_argv = argv[:split], argv[split + 1:]
    else:
        own, job_argv = [], argv
    parser = argparse.ArgumentParser(
        prog="raygpt submit", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Submit a raygpt job to a Ray cluster: raygpt submit [options] -- <job> [job args]",
        epilog=__doc__)
    parser.add_argument("--address", help=f"Ray dashboard/Jobs address (default $RAY_ADDRESS or {DEFAULT_ADDRESS})")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    parser.add_argument("--submission-id", help="job id to use (default: generated)")
    parser.add_argument("--working-dir", default=str(PROJECT_ROOT), help="directory uploaded as the job's cwd")
    parser.add_argument("--pip", action="append", default=[], metavar="REQ",
                        help="extra pip requirement installed in the job's runtime_env (repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="environment variable (repeatable)")
    parser.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the driver")
    parser.add_argument("--entrypoint-num-gpus", type=float, default=None, help="GPUs reserved for the driver")
    if not own and (not job_argv or job_argv[0].startswith("-")):
        own, job_argv = job_argv, []
    args = parser.parse_args(own)
    if not job_argv:
        parser.error("no job given: raygpt submit [options] -- <job> [--config F] [--set k=v ...]")
    env = {}
    for item in args.env:
        if "=" not in item:
            parser.error(f"--env {item!r}: expected K=V")
        k, v = item.split("=", 1)
        env[k] = v
    try:
        spec = build_submission(job_argv[0], job_argv[1:], args.working_dir, args.pip, env)
    except ConfigError as e:
        print(f"error: job spec rejected, nothing submitted: {e}", file=sys.stderr)
        return 2
    client = _client(args.address)
    job_id = client.submit_job(submission_id=args.submission_id, entrypoint_num_cpus=args.entrypoint_num_cpus,
                               entrypoint_num_gpus=args.entrypoint_num_gpus, **spec)
    print(f"[raygpt] submitted {job_id} to {address_of(args.address)}: {spec['entrypoint']}", flush=True)
    if args.no_wait:
        print(job_id)
        return 0
    status = wait(client, job_id)
    print(f"[raygpt] job {job_id} {status}", flush=True)
    return EXIT_CODES[status]


def _job_id_command(cmd: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"raygpt {cmd}")
    parser.add_argument("job_id")
    parser.add_argument("--address", help=f"Ray dashboard/Jobs address (default $RAY_ADDRESS or {DEFAULT_ADDRESS})")
    if cmd == "logs":
        parser.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    args = parser.parse_args(argv)
    client = _client(args.address)
    if cmd == "status":
        info = client.get_job_info(args.job_id)
        print(f"{args.job_id} {info.status}" + (f": {info.message}" if info.message else ""))
        return 0
    if cmd == "logs":
        if args.follow:
            return EXIT_CODES[wait(client, args.job_id)]
        print(client.get_job_logs(args.job_id), end="")
        return 0
    stopped = client.stop_job(args.job_id)
    print(f"{args.job_id} {'stop requested' if stopped else 'was not running'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in {"status", "logs", "stop"}:  # jobs/cli.py passes these with the subcommand first
        return _job_id_command(argv[0], argv[1:])
    return submit(argv)


if __name__ == "__main__":
    sys.exit(main())
