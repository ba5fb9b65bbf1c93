"""A role whose replicas come and go with the cluster: between `min` and `max` Ray actors, each in a placement
group of its own (cluster/placement.py `ElasticRole`). The RL rollout workers are one (actors/groups.py).

Why one placement group per worker: a placement group's bundles are fixed when it is created, so a pool that must
grow onto a node that joins later, or shrink when one dies, cannot be one group. Each of the `max` slots holds a
placement group; one the cluster cannot place yet stays pending (on an autoscaling cluster that pending demand is
what adds a node), and a worker starts in it once it is placed.

The caller reconciles at points of its choosing (the RL controller: the start of every generate stage):
`reconcile()` drops members that died (node removed, process crashed), starts workers in the slots whose group
has been placed and waits for them to be constructed, refills the slots up to `max` with fresh pending groups,
and while fewer than `min` are alive waits for room up to its timeout, then fails (`ElasticError`). Ray never
restarts a member (max_restarts=0): the restarted process would have lost the state the caller gave it (a
rollout worker's weights). A replacement joins through `reconcile`, and the caller hands it that state.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cluster.placement import ElasticRole, create_worker_group, is_placed, remove_pools, worker_options
from cluster.worker_group import arm_fault, remote_class

W = TypeVar("W")
Ref = Any  # ray.ObjectRef


class ElasticError(RuntimeError):
    """Fewer than `min` workers could be placed within the timeout."""


@dataclass
class _Slot:
    group: Any  # its placement group
    placed: Ref  # ready once the group is placed (to wait on; `is_placed` asks without waiting)
    actor: Any = None  # the worker, once started
    starting: Ref | None = None  # its first `prepare` call, until it answered


class ElasticGroup(Generic[W]):
    """Between `spec.min` and `spec.max` replicas of `worker_cls`, constructed as `worker_cls(config, rank=k,
    world_size=spec.max)` (k counts every worker ever started, so a replacement never reuses a rank)."""

    def __init__(self, role: str, worker_cls: type[W], config: Any, spec: ElasticRole, *, name_prefix: str,
                 timeout_s: float = 300.0, faults: Collection[str] = ()) -> None:
        self.role, self.spec, self.config, self.timeout_s = role, spec, config, timeout_s
        self.faults = frozenset(faults)
        self.threads = max(1, int(spec.cpus))
        self._remote = remote_class(worker_cls, self.faults)
        self._name = f"{name_prefix}-{role}"
        self._serial = 0
        self._slots: list[_Slot] = []
        self._fill()

    @property
    def actors(self) -> list[Any]:
        """The members: started workers that answered, in the order they joined."""
        return [s.actor for s in self._slots if s.actor is not None and s.starting is None]

    def __len__(self) -> int:
        return len(self.actors)

    # --- life cycle -------------------------------------------------------------------------------------------
    def ready(self) -> list[Any]:
        """Start-up: the first reconcile (waits for `min` workers). Returns the workers that joined."""
        return self.reconcile()

    def reconcile(self, check_alive: bool = True) -> list[Any]:
        """Drop the members that died (`check_alive`: ask each — only when they are idle, else an answer waits for
        their queued calls), start workers wherever a slot's group has been placed, and wait until at least `min`
        are members (ElasticError after `timeout_s`). Returns the workers that joined now: constructed, given
        nothing yet."""
        import ray

        deadline = time.monotonic() + self.timeout_s
        if check_alive:
            self.drop(self._dead(deadline))
        joined: list[Any] = []
        while True:
            joined += self._start(deadline)
            if len(self.actors) >= self.spec.min:
                return joined
            left = deadline - time.monotonic()
            if left <= 0:
                raise ElasticError(
                    f"placement.rollout_workers.min: {len(self.actors)} of at least {self.spec.min} {self.role} "
                    f"workers of {self.spec.bundle()} could be placed within {self.timeout_s:g}s (cluster has "
                    f"{ray.available_resources()} free)")
            ray.wait([s.placed for s in self._slots if s.actor is None], num_returns=1, timeout=min(left, 5.0))

    def drop(self, actors: Collection[Any]) -> None:
        """End these workers (lost or hung), release their placement groups and put fresh pending groups in
        their slots."""
        import ray

        for slot in [s for s in self._slots if s.actor is not None and s.actor in actors]:
            ray.kill(slot.actor, no_restart=True)
            remove_pools({self._name: slot.group})
            self._slots.remove(slot)
        self._fill()

    def shutdown(self) -> None:
        import ray

        for s in self._slots:
            if s.actor is not None:
                ray.kill(s.actor, no_restart=True)
        remove_pools({str(i): s.group for i, s in enumerate(self._slots)})
        self._slots = []

    def lost(self, calls: Sequence[tuple[Any, Ref]], hung: bool) -> list[Any]:
        """After a failed stage: the workers of these (worker, ref) calls that died with their process, and with
        `hung` (the wait timed out) also those whose call never answered."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        out = []
        for actor, ref in calls:
            if not ray.wait([ref], timeout=0)[0]:
                if hung:
                    out.append(actor)
                continue
            try:
                ray.get(ref)
            except (RayActorError, ActorUnavailableError):
                out.append(actor)
            except Exception:  # noqa: BLE001 - the call's own error: the caller re-raises it, the worker lives
                pass
        return out

    def arm_fault(self, method: str, after_engine_steps: int | None = None, replica: int = 0) -> None:
        """Fault injection: member `replica` exits in its next call of `method` (cluster/faults.py)."""
        arm_fault(self.actors[replica], self.role, self.faults, method, after_engine_steps, self.timeout_s)

    def get(self, refs: Any) -> Any:
        """`ray.get` with the group's timeout (every wait has one)."""
        import ray

        return ray.get(refs, timeout=self.timeout_s)

    # --- slots ------------------------------------------------------------------------------------------------
    def _fill(self) -> None:
        while len(self._slots) < self.spec.max:
            group = create_worker_group(self.spec, f"{self._name}-{self._serial}")
            self._serial += 1
            self._slots.append(_Slot(group, group.ready()))

    def _dead(self, deadline: float) -> list[Any]:
        """Members that do not answer: a member is idle when the caller reconciles, so it answers at once unless
        its process or node is gone (Ray then fails the call) or it hangs (no answer before the deadline)."""
        import ray

        pings = [(a, a.prepare.remote(self.threads)) for a in self.actors]
        if not pings:
            return []
        ray.wait([p for _, p in pings], num_returns=len(pings), timeout=max(0.0, deadline - time.monotonic()))
        return self.lost(pings, hung=True)

    def _start(self, deadline: float) -> list[Any]:
        """Start a worker in every slot whose group has been placed and wait until each is constructed; one that
        dies on the way is dropped, one whose constructor raised re-raises (a broken worker would fail forever)."""
        import ray
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

        for s in self._slots:
            if s.actor is None and is_placed(s.group):
                s.actor = self._remote.options(**worker_options(self.spec, s.group), max_restarts=0,
                                               max_task_retries=0).remote(self.config, rank=self._serial,
                                                                          world_size=self.spec.max)
                self._serial += 1
                s.starting = s.actor.prepare.remote(self.threads)
        joined, failed = [], []
        for s in [s for s in self._slots if s.starting is not None]:
            try:
                ray.get(s.starting, timeout=max(0.0, deadline - time.monotonic()))
            except RayActorError as e:
                if e.actor_init_failed:
                    raise
                failed.append(s.actor)
                continue
            except (ActorUnavailableError, GetTimeoutError):
                failed.append(s.actor)
                continue
            s.starting = None
            joined.append(s.actor)
        self.drop(failed)
        return joined
