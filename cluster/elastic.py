"""Elastic worker pools: `min_workers..max_workers` actors of one class (generation/rollout/scoring workers)
that grow onto nodes that join the cluster and survive the loss of nodes.

Elasticity comes from Ray's scheduler rather than from polling the cluster: the pool keeps up to
`max_workers` actors *requested* while work remains. Those that fit start at once; the rest stay pending, and
their resource demand is what makes Ray's autoscaler (KubeRay, cluster launcher) add nodes. A pending actor
becomes ready when a node with room joins, and from then on takes work. When a node is removed, its actors
die: their in-flight items go back to the front of the queue (each item is retried up to `max_item_retries`
times) and replacement actors are requested, so the run goes on with the workers left. When the input runs
out, idle workers are released, so the autoscaler can remove the nodes.

A worker method call is pure with respect to the item (same item → same result, whichever worker runs it),
which is what makes retrying an item on another worker correct. Errors raised by the worker method itself are
not retried: they propagate, naming the item.

    pool = ElasticPool(Generator, (ckpt,), min_workers=1, max_workers=8, num_cpus=1)
    for index, samples in pool.map_unordered(lambda w, prompt: w.generate.remote(prompt), prompts):
        ...
    pool.close()
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError


class PoolError(RuntimeError):
    """The pool cannot make progress (fewer than min_workers ready in time, an item failed too often)."""


@dataclass
class PoolStats:
    started: int = 0        # actors requested in total (replacements included)
    ready_peak: int = 0     # most workers ready at once
    lost: int = 0           # workers that died (node removed, OOM-killed, ...)
    retried: int = 0        # items re-run after their worker died
    released: int = 0       # idle or pending workers let go when the input ran out
    per_node: dict[str, int] = field(default_factory=dict)  # results per node id
    sizes: list[tuple[float, int]] = field(default_factory=list)  # (time, ready workers) at each change


@dataclass
class _Worker:
    handle: Any
    ready_ref: Any
    ready: bool = False
    node_id: str | None = None


def _node_of_actor() -> str:
    return ray.get_runtime_context().get_node_id()


class ElasticPool:
    """`max_workers` actors requested, at least `min_workers` ready before work starts (see module doc).

    `actor_cls` is a plain class (wrapped with `ray.remote` here); `options` are Ray actor options such as
    num_cpus, num_gpus, resources, runtime_env.
    """

    def __init__(self, actor_cls: type, args: tuple = (), min_workers: int = 1, max_workers: int = 1,
                 max_item_retries: int = 3, ready_timeout_s: float = 120.0, **options: Any) -> None:
        if min_workers < 1:
            raise ValueError(f"min_workers: must be >= 1, got {min_workers}")
        if max_workers < min_workers:
            raise ValueError(f"max_workers: must be >= min_workers ({min_workers}), got {max_workers}")
        self.min_workers, self.max_workers = min_workers, max_workers
        self.max_item_retries, self.ready_timeout_s = max_item_retries, ready_timeout_s
        self._args = args
        # max_restarts=0: a dead actor is replaced by the pool (a fresh request that may land on any node).
        self._cls = ray.remote(max_restarts=0, max_task_retries=0, **options)(_with_node_id(actor_cls))
        self._workers: list[_Worker] = []
        self.stats = PoolStats()
        for _ in range(max_workers):
            self._spawn()

    # --- membership -------------------------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        handle = self._cls.remote(*self._args)
        w = _Worker(handle, handle.raygpt_node_id.remote())
        self._workers.append(w)
        self.stats.started += 1
        return w

    def _drop(self, w: _Worker, replace: bool) -> None:
        self._workers.remove(w)
        ray.kill(w.handle, no_restart=True)
        if replace:
            self._spawn()
        self._record_size()

    def _record_size(self) -> None:
        n = self.num_ready
        if not self.stats.sizes or self.stats.sizes[-1][1] != n:
            self.stats.sizes.append((round(time.time(), 3), n))
        self.stats.ready_peak = max(self.stats.ready_peak, n)

    @property
    def num_ready(self) -> int:
        return sum(w.ready for w in self._workers)

    @property
    def ready_nodes(self) -> list[str]:
        return [w.node_id for w in self._workers if w.ready and w.node_id]

    def _check_ready(self, refs: list[Any]) -> None:
        for ref in refs:
            w = next(x for x in self._workers if x.ready_ref is ref)
            try:
                w.node_id = ray.get(ref)
                w.ready = True
            except RayActorError:  # died before it ever became ready (its node went away)
                self.stats.lost += 1
                self._drop(w, replace=True)
        self._record_size()

    def wait_ready(self, n: int | None = None, timeout_s: float | None = None) -> int:
        """Block until at least `n` (default min_workers) workers are ready; return the number ready."""
        n = self.min_workers if n is None else n
        deadline = time.time() + (self.ready_timeout_s if timeout_s is None else timeout_s)
        while self.num_ready < n:
            pending = [w.ready_ref for w in self._workers if not w.ready]
            left = deadline - time.time()
            if left <= 0 or not pending:
                raise PoolError(f"min_workers: only {self.num_ready} of {n} workers became ready in "
                                f"{self.ready_timeout_s:g} s (the cluster lacks the resources they ask for)")
            done, _ = ray.wait(pending, num_returns=1, timeout=min(left, 1.0))
            self._check_ready(done)
        return self.num_ready

    # --- work -------------------------------------------------------------------------------------------
    def map_unordered(self, call: Callable[[Any, Any], Any], items: Iterable[Any]) -> Iterator[tuple[int, Any]]:
        """Yield `(index, result)` of `call(worker_handle, item)` (which returns an ObjectRef) for each item, in
        completion order. Items are pulled from `items` lazily, one per idle worker, so `items` may be an
        unbounded generator that its consumer ends."""
        self.wait_ready()
        source = enumerate(items)
        queue: collections.deque[tuple[int, Any, int]] = collections.deque()  # (index, item, attempts)
        in_flight: dict[Any, tuple[_Worker, int, Any, int]] = {}
        exhausted = False
        last_progress = time.time()
        while True:
            busy = {id(v[0]) for v in in_flight.values()}
            for w in [w for w in self._workers if w.ready and id(w) not in busy]:
                if not queue and not exhausted:
                    nxt = next(source, None)
                    if nxt is None:
                        exhausted = True
                    else:
                        queue.append((nxt[0], nxt[1], 0))
                if not queue:
                    break
                index, item, attempts = queue.popleft()
                in_flight[call(w.handle, item)] = (w, index, item, attempts)
            if exhausted and not queue:
                self._release_idle(busy_ids={id(v[0]) for v in in_flight.values()})
                if not in_flight:
                    return
            pending_ready = [w.ready_ref for w in self._workers if not w.ready]
            done, _ = ray.wait(list(in_flight) + pending_ready, num_returns=1, timeout=1.0)
            if not done:
                if not in_flight and self.num_ready == 0 and time.time() - last_progress > self.ready_timeout_s:
                    raise PoolError(f"no worker ready for {self.ready_timeout_s:g} s (all nodes lost?)")
                continue
            ref = done[0]
            if ref not in in_flight:
                self._check_ready([ref])
                continue
            w, index, item, attempts = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError:
                self.stats.lost += 1
                self._drop(w, replace=True)  # released again below if the work turns out to be done
                if attempts + 1 > self.max_item_retries:
                    raise PoolError(f"item {index}: its worker died {attempts + 1} times; giving up") from None
                self.stats.retried += 1
                queue.appendleft((index, item, attempts + 1))
                continue
            except RayTaskError as e:
                raise PoolError(f"item {index}: the worker raised {e.cause!r}") from e
            last_progress = time.time()
            self.stats.per_node[w.node_id or "?"] = self.stats.per_node.get(w.node_id or "?", 0) + 1
            yield index, result

    def _release_idle(self, busy_ids: set[int]) -> None:
        """Input exhausted: let go of pending and idle workers beyond min_workers (resources back to the
        cluster; the autoscaler may then remove their nodes)."""
        for w in list(self._workers):
            if len(self._workers) <= self.min_workers:
                break
            if id(w) not in busy_ids:
                self.stats.released += 1
                self._drop(w, replace=False)

    def close(self) -> None:
        for w in self._workers:
            ray.kill(w.handle, no_restart=True)
        self._workers.clear()

    def __enter__(self) -> ElasticPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _with_node_id(cls: type) -> type:
    """Subclass adding `raygpt_node_id()`: the readiness probe, which also tells where the worker landed."""

    class Worker(cls):  # type: ignore[misc, valid-type]
        def raygpt_node_id(self) -> str:
            return _node_of_actor()

    Worker.__name__ = Worker.__qualname__ = cls.__name__
    return Worker
