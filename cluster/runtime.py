"""Starting or joining Ray: the embedded local cluster (127.0.0.1 only) or an existing cluster by address.

On a machine with several interfaces Ray would otherwise advertise a non-loopback address even when asked for
127.0.0.1; `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` in the starting process keeps every Ray listener on loopback
(see docs/ARCHITECTURE.md, "Networking"). Workers get the same loopback settings for gloo.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from cluster import console

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Environment every Ray worker of ours gets: loopback gloo, no tokenizer thread pools fighting Ray's, no hub.
WORKER_ENV: dict[str, str] = {
    "GLOO_SOCKET_IFNAME": "lo",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "PYTHONUNBUFFERED": "1",
}


def local_env() -> None:
    """Apply the loopback/offline settings to this process (before Ray or torch.distributed start)."""
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(PROJECT_ROOT / ".tmp" / "torch_extensions"))


def is_embedded(address: str | None = None) -> bool:
    return not (address or os.environ.get("RAY_ADDRESS"))


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             dashboard: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Connect to `address` (or $RAY_ADDRESS), else start an embedded single-node cluster on 127.0.0.1.

    Idempotent: returns the existing context's resources if Ray is already initialised (e.g. inside a job
    submitted to a cluster, or a test fixture). `num_cpus` is logical: oversubscribing a 2-core machine is
    fine for the tiny defaults.
    """
    if is_embedded(address):
        local_env()  # before importing ray: it reads these at import time
    import ray

    console.redirect(console.log_path() or Path(tempfile.gettempdir()) / "raygpt-ray-console.log")
    console.quiet_loggers()

    if ray.is_initialized():
        return ray.cluster_resources()
    if is_embedded(address):
        # Loopback settings only for the single-node embedded cluster: on a real cluster gloo must use the
        # cluster network, so workers keep the cluster's own environment.
        runtime_env = {"env_vars": dict(WORKER_ENV)}
        # address="local": a new cluster even if a `ray start` head is running on this machine (ray.init() with
        # no address would join the latest one it finds in the temp dir, and then refuses num_cpus).
        ray.init(
            address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=dashboard,
            dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", runtime_env=runtime_env, logging_level="WARNING",
            log_to_driver=kwargs.pop("log_to_driver", True), **kwargs,
        )
    else:
        ray.init(address=address or os.environ["RAY_ADDRESS"], logging_level="WARNING", **kwargs)
    # Ray's internal chatter to a file, not the terminal (cluster/console.py); jobs point it at their run dir.
    console.install(console.log_path())
    return ray.cluster_resources()


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
