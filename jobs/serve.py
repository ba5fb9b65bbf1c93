"""`raygpt serve CKPT [CKPT ...]`: checkpoints behind Ray Serve with an OpenAI-compatible HTTP API.

The blocking CLI around the serving application (jobs/serving/app.py: config, checks, `build_app`); the design
in docs/SERVING.md.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from typing import Any

from ray import serve

from cluster.runtime import init_ray, is_embedded, shutdown_ray
from jobs.config import ConfigError, from_dict, help_lines, load_config, to_dict
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
    init_ray(cfg.address, num_cpus=num_cpus)
    try:
        serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
        serve.run(application, name=cfg.app_name, route_prefix=cfg.http.route_prefix, blocking=False)
        state["serving"] = True
        print(plan(cfg), flush=True)
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


def main(argv: list[str] | None = None) -> int:
    import yaml

    parser = argparse.ArgumentParser(
        prog="raygpt serve", description=(ServeConfig.__doc__ or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (set in YAML or with --set NAME=VALUE):\n" + "\n".join(help_lines(ServeConfig))
        + f"\n\nAPI key: ${API_KEY_ENV} or http.api_key_file (never on the command line).",
    )
    parser.add_argument("checkpoints", nargs="*", help="checkpoint directories: PATH or NAME=PATH")
    parser.add_argument("--config", help="YAML file with config fields (e.g. configs/serve.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    parser.add_argument("--host", help="HTTP bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and plan; start nothing")
    args = parser.parse_args(argv)
    sets = list(args.set) + [f"http.host={args.host}"] * bool(args.host) + [f"http.port={args.port}"] * bool(args.port)
    try:
        cfg = load_config(ServeConfig, args.config, sets)
        if args.checkpoints:
            cfg = from_dict(ServeConfig, {**to_dict(cfg), "models": list(args.checkpoints)})
        if args.dry_run:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            print("# placement plan")
            print(plan(cfg))
            return 0
        run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
