"""N replicas of one role as Ray actors forming one data-parallel world (the start-up of OpenRLHF's launcher).

Start-up, as in OpenRLHF's `PPORayActorGroup`: the replicas are placed in their pool's bundles
(cluster/placement.py); rank 0 publishes a rendezvous address and every rank joins one `torch.distributed`
world with it. On the embedded single-machine cluster the address is a FileStore file
(`file:///…/store-<uuid>`) — torch's TCPStore binds every interface whatever host it is given, a file binds
nothing (docs/ARCHITECTURE.md, "Networking"); on a multi-node cluster rank 0 publishes
`tcp://<its node ip>:<free port>`. gloo on CPU, nccl on GPU.

Failure: actors are created with `max_restarts`, so Ray restarts a crashed independent replica by itself and
`ready()` waits for it. A DP world cannot continue with a member missing (its collectives would hang), so
`replace()` ends every replica of the group, starts fresh ones in the same bundles and forms a fresh world with a
fresh rendezvous. Reloading state is the caller's business (it knows the last weights); see jobs/rl/controller.py.

Worker classes stay plain Python; `ray.remote` is applied here, when the job wires the cluster. Role groups
subclass `WorkerGroup` with explicit typed methods (`ValueGroup.compute_values(shards)`), never method names as
strings. Fault injection (cluster/faults.py) is applied here too, and only when asked for: `faults=("update",)`
wires the role class wrapped by `instrument_actor`, and `arm_fault` arms one replica's next call of that method.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from cluster.faults import instrument_actor
from cluster.placement import PlacementSpec, actor_options

Rendezvous = Literal["file", "tcp"]
W = TypeVar("W")
T = TypeVar("T")


class DistributedWorker:
    """Mixin giving a role class what its group needs: readiness, thread count, rendezvous and world joining.

    Role classes are constructed as `Cls(config, rank=i, world_size=n)` and keep `rank`/`world_size`.
    """

    role: str = "worker"
    rank: int = 0
    world_size: int = 1

    def prepare(self, threads: int) -> int:
        """Set torch's intra-op threads (one actor per fraction of a core must not spawn a thread per core, and a
        fixed count keeps CPU reductions bitwise reproducible across layouts); returns the process id."""
        import torch

        torch.set_num_threads(max(1, threads))
        return os.getpid()

    def rendezvous(self, kind: Rendezvous, directory: str) -> str:
        """Rank 0 publishes the address the world meets at (see the module docstring)."""
        if kind == "file":
            Path(directory).mkdir(parents=True, exist_ok=True)
            return f"file://{Path(directory).resolve()}/store-{uuid.uuid4().hex}"
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        return f"tcp://{ip}:{port}"

    def join_world(self, init_method: str, timeout_s: float, backend: str | None = None) -> int:
        """Join the world as `self.rank` of `self.world_size` (collective: every rank calls it). Returns the rank."""
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        if dist.is_initialized():  # a second join in the same process means a re-formed world
            dist.destroy_process_group()
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, init_method=init_method, rank=self.rank, world_size=self.world_size,
                                timeout=timedelta(seconds=timeout_s))
        return dist.get_rank()


def remote_class(worker_cls: type[W], faults: frozenset[str]) -> Any:
    """`ray.remote` of a role class — wrapped by `instrument_actor` only when fault injection is configured."""
    import ray

    return ray.remote(instrument_actor(worker_cls, faults) if faults else worker_cls)


def arm_fault(actor: Any, role: str, faults: frozenset[str], method: str, after_engine_steps: int | None,
              timeout_s: float) -> None:
    """Arm `actor`'s next call of `method` to crash (cluster/faults.py) and wait until it is armed, so a call
    submitted afterwards is the one that crashes."""
    import ray

    if method not in faults:
        raise ValueError(f"{role}: {method} is not instrumented for faults (faults={sorted(faults)})")
    ray.get(actor.arm_fault.remote(method, after_engine_steps), timeout=timeout_s)


class WorkerGroup(Generic[W]):
    """The replicas of `role`, created in their placement bundles. `distributed=True` forms a DP world."""

    def __init__(self, role: str, worker_cls: type[W], config: Any, spec: PlacementSpec, pools: dict[str, Any], *,
                 distributed: bool, rendezvous: Rendezvous = "file", rendezvous_dir: str | Path = ".tmp/rendezvous",
                 max_restarts: int = 3, timeout_s: float = 300.0, faults: Collection[str] = ()) -> None:
        if role not in spec.roles or spec.roles[role].replicas < 1:
            raise ValueError(f"placement.roles.{role}: the role has no replicas")
        self.role = role
        self.distributed = distributed
        self.rendezvous_kind = rendezvous
        self.rendezvous_dir = str(Path(rendezvous_dir).resolve())
        self.timeout_s = timeout_s
        self.faults = frozenset(faults)
        rs = spec.roles[role]
        self.threads = max(1, int(rs.cpus))
        remote_cls = remote_class(worker_cls, self.faults)
        self._options = [dict(actor_options(spec, pools, role, i), max_restarts=max_restarts, max_task_retries=0)
                         for i in range(rs.replicas)]
        self._new = lambda i: remote_cls.options(**self._options[i]).remote(config, rank=i, world_size=rs.replicas)
        self._spawn()

    def _spawn(self) -> None:
        # Construction proceeds in the background; `ready()` waits. The controller creates every group first and
        # then waits, so all roles load their models in parallel.
        self.actors = [self._new(i) for i in range(len(self._options))]
        self._pending = [a.prepare.remote(self.threads) for a in self.actors]

    def __len__(self) -> int:
        return len(self.actors)

    # --- life cycle -------------------------------------------------------------------------------------------
    def ready(self) -> list[int]:
        """Wait until every replica is constructed (or restarted by Ray), set its threads and, for a distributed
        group, form the world. Returns the replicas' process ids."""
        import ray
        from ray.exceptions import ActorUnavailableError

        pending = self._pending or [a.prepare.remote(self.threads) for a in self.actors]
        self._pending = []
        deadline = time.monotonic() + self.timeout_s
        pids: list[int] = []
        for i, ref in enumerate(pending):
            while True:  # a replica Ray is still restarting answers "unavailable" for a moment: ask again
                try:
                    pids.append(ray.get(ref, timeout=max(1.0, deadline - time.monotonic())))
                    break
                except ActorUnavailableError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
                    ref = self.actors[i].prepare.remote(self.threads)
        if self.distributed:
            address = self.get(self.actors[0].rendezvous.remote(self.rendezvous_kind, self.rendezvous_dir))
            self.get([a.join_world.remote(address, self.timeout_s) for a in self.actors])
        return pids

    def replace(self) -> list[int]:
        """End every replica and start fresh ones in the same bundles, then form a fresh world; returns the pids.

        Why not `ray.kill(no_restart=False)` and wait: a replica that already crashed is being restarted by Ray at
        the same moment, and a kill racing that restart can land after the new process answered — the next call
        would then fail with "actor was restarted". New handles leave no doubt which process answers. Survivors
        must go too: they may be blocked in a collective with the dead rank."""
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self._spawn()
        return self.ready()

    def arm_fault(self, method: str, after_engine_steps: int | None = None, replica: int = 0) -> None:
        """Fault injection: replica `replica` exits in its next call of `method` (cluster/faults.py). Waits until
        the replica is armed, so a call submitted afterwards is the one that crashes."""
        arm_fault(self.actors[replica], self.role, self.faults, method, after_engine_steps, self.timeout_s)

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []

    # --- dispatch ---------------------------------------------------------------------------------------------
    def assign(self, shards: Sequence[T]) -> list[tuple[Any, T]]:
        """Pair shards with replicas. A DP world takes exactly one shard per rank; independent replicas
        (`distributed=False`) take shard i on replica i mod n."""
        if self.distributed and len(shards) != len(self.actors):
            raise ValueError(f"{self.role}: {len(shards)} shards for a data-parallel world of {len(self.actors)}")
        return [(self.actors[i % len(self.actors)], s) for i, s in enumerate(shards)]

    def get(self, refs: Any) -> Any:
        """`ray.get` with the group's timeout (every wait has one)."""
        import ray

        return ray.get(refs, timeout=self.timeout_s)
