"""A real `ray start --head` node for tests that drive the CLI from outside: loopback only, token auth (Ray 2.60's
default), a private HOME and temp dir, free ports above 20000 (10002–19999 are Ray's worker ports), its own
process group (ended by group id). The same recipe as tests/cluster/test_submit.py's fixture, as a context
manager, plus Ray's state API queried with the head's credentials (`actors`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 above 20000 (held open together so they differ)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        if s.getsockname()[1] > 20000:
            ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@contextmanager
def head_node(num_cpus: int = 4, timeout_s: float = 120) -> Iterator[dict[str, Any]]:
    """Yield {"address": dashboard URL, "gcs": "127.0.0.1:port", "env": env for drivers (RAY_ADDRESS set)}."""
    base = Path(tempfile.mkdtemp(prefix="rgh-", dir="/tmp"))  # short: Ray's Unix sockets live under it
    env = {**os.environ, "HOME": str(base / "home"), "RAY_AUTH_MODE": "token",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    (base / "home").mkdir()
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    gcs, dash, client, agent, agent_grpc, metrics, rte, nm, om = free_ports(9)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={rte}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
           f"--num-cpus={num_cpus}", "--disable-usage-stats", f"--temp-dir={base / 'ray'}"]
    log = (base / "head.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    address = f"http://127.0.0.1:{dash}"
    try:
        token = (base / "home" / ".ray" / "auth_token").read_text().strip()
        req = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start --head exited {proc.returncode}:\n"
                                   f"{(base / 'head.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"head not up after {timeout_s} s:\n{(base / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        yield {"address": address, "gcs": f"127.0.0.1:{gcs}", "base": base,
               "env": {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}}
    finally:
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)  # --block heads ignore a plain TERM to the parent; end the whole group
                proc.wait(wait_s)
                break
            except (subprocess.TimeoutExpired, ProcessLookupError):
                continue
        log.close()
        shutil.rmtree(base, ignore_errors=True)


_LIST_ACTORS = """
import json, sys
from ray.util.state import list_actors
rows = list_actors(address=sys.argv[1], filters=[("state", "=", "ALIVE")], limit=10000, raise_on_missing_output=False)
print(json.dumps([{"class_name": a.class_name, "name": a.name, "pid": a.pid} for a in rows]))
"""


def actors(head: dict[str, Any]) -> list[dict[str, Any]]:
    """Alive actors of the cluster (class_name, name, pid) from Ray's state API, asked with the head's token (in a
    subprocess: the token lives in the head's private HOME)."""
    r = subprocess.run([sys.executable, "-c", _LIST_ACTORS, head["address"]], env=head["env"], text=True,
                       capture_output=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"list_actors failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
