"""`raygpt serve CKPT [CKPT ...]`: checkpoints behind Ray Serve with an OpenAI-compatible HTTP API.

The blocking CLI around the serving application (jobs/serving/app.py: config, checks, `build_app`); the design
in docs/SERVING.md.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Any

from ray import serve

from cluster.runtime import init_ray, is_embedded, shutdown_ray
from jobs.cli import Arg, JobSpec
from jobs.serving.app import API_KEY_ENV, ServeConfig, build_app, plan


def run(cfg: ServeConfig) -> None:
    """Deploy and block until SIGINT/SIGTERM."""

    application = build_app(cfg)  # checks checkpoints and the key before starting Ray
    if cfg.http.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {cfg.http.host}: the API is reachable from the network", file=sys.stderr)
    num_cpus = cfg.num_cpus
    if num_cpus is None and is_embedded(cfg.address):  # logical CPUs: never fewer than the replicas reserve
        s = cfg.scaling
        start = s.initial_replicas if s.initial_replicas is not None else max(1, s.min_replicas)
        num_cpus = max(os.cpu_count() or 1, math.ceil(len(cfg.models) * start * s.num_cpus))
    state = {"serving": False, "stop": False}

    def _on_signal(*_: Any) -> None:
        if not state["serving"]:  # still starting (serve.run may wait on resources): interrupt it
            raise KeyboardInterrupt
        state["stop"] = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    # The address and models come from the config alone: say them before start-up, which a signal may cut short
    # (the HTTP proxy can answer before serve.run returns, so a client may already be done by then).
    print(plan(cfg), flush=True)
    init_ray(cfg.address, num_cpus=num_cpus)
    try:
        serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
        serve.run(application, name=cfg.app_name, route_prefix=cfg.http.route_prefix, blocking=False)
        state["serving"] = True
        print("serving; Ctrl-C to stop", flush=True)
        while not state["stop"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("interrupted during start-up", file=sys.stderr)
    finally:
        state["serving"] = True  # a second signal during clean-up must not interrupt it
        print("stopping", flush=True)
        if is_embedded(cfg.address):
            serve.shutdown()
            shutdown_ray()
        else:
            serve.delete(cfg.app_name)


JOB = JobSpec(ServeConfig, run, "raygpt serve", plan=plan, args=(
    Arg(("checkpoints",), "models", "checkpoint directories: PATH or NAME=PATH", kind="many"),
    Arg(("--host",), "http.host", "HTTP bind address (default 127.0.0.1)"),
    Arg(("--port",), "http.port", "HTTP port (default 8000)", type=int)),
    epilog=f"API key: ${API_KEY_ENV} or http.api_key_file (never on the command line).")
main = JOB.main


if __name__ == "__main__":
    sys.exit(main())
