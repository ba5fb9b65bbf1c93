"""Typed group calls for each PPO role: one method per worker method, returning ObjectRefs.

A group dispatches one shard per replica (cluster/worker_group.py `assign`) and never fetches results; the
controller decides when to wait. Method names are spelled as attribute accesses on the actor handles, so grep and
readers find every call site (no `group.call("method_name")`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from actors.policy import PolicySpec, PolicyWorker
from actors.reference import ReferenceSpec, ReferenceWorker
from actors.reward import RewardSpec, RewardWorker
from actors.rollout_worker import RolloutWorker, RolloutWorkerSpec
from actors.value import ValueSpec, ValueWorker
from cluster.elastic import ElasticGroup
from cluster.placement import ElasticRole, PlacementSpec
from cluster.worker_group import WorkerGroup

Ref = Any  # ray.ObjectRef
Snapshot = tuple[str, str] | None  # (directory, tag) of a saved engine state


class PromptShard:
    """Prompts for one generator replica: token lists, and per row (n rows per prompt: its group of samples,
    prompt i's rows i·n .. i·n + n − 1) the global row index and seed."""

    def __init__(self, prompts: list[list[int]], row_index: list[int], seeds: list[int], n: int = 1) -> None:
        if len(prompts) * n != len(row_index) or len(row_index) != len(seeds):
            raise ValueError(f"PromptShard: {len(prompts)} prompts × n={n} need as many row indices and seeds, "
                             f"got {len(row_index)}/{len(seeds)}")
        self.prompts, self.row_index, self.seeds, self.n = prompts, row_index, seeds, n


class PolicyGroup(WorkerGroup[PolicyWorker]):
    def __init__(self, spec: PolicySpec, placement: PlacementSpec, pools: dict[str, Any], **kw: Any) -> None:
        super().__init__("policy", PolicyWorker, spec, placement, pools, distributed=True, **kw)

    def setup(self, snapshot: Snapshot = None) -> list[Ref]:
        return [a.setup.remote(snapshot) for a in self.actors]

    def generate(self, shards: Sequence[PromptShard]) -> list[tuple[Ref, Ref]]:
        """[(meta_ref, rollout_ref)] per shard."""
        return [tuple(a.generate.options(num_returns=2).remote(s.prompts, s.row_index, s.seeds, s.n))
                for a, s in self.assign(shards)]

    def update(self, rollouts: Sequence[Ref], ptx: Sequence[Ref | None], iteration: int, kl_coef: float = 0.0
               ) -> list[Ref]:
        return [a.update.remote(r, p, iteration, kl_coef) for (a, r), p in zip(self.assign(rollouts), ptx)]

    def save(self, directory: str, tag: str) -> list[Ref]:
        return [a.save.remote(directory, tag) for a in self.actors]

    def weights(self) -> Ref:
        """The full weights (rank 0's message); every rank takes part in the gather."""
        refs = [a.weights.remote() for a in self.actors]
        return refs[0]

    def averaged_weights(self) -> Ref:
        """The tail-averaged weights (rank 0's message; PolicyWorker.averaged_weights)."""
        refs = [a.averaged_weights.remote() for a in self.actors]
        return refs[0]

    def weights_info(self) -> list[Ref]:
        return [a.weights_info.remote() for a in self.actors]


class RolloutGroup(ElasticGroup[RolloutWorker]):
    """The rollout workers: an elastic pool (cluster/elastic.py). Shards outnumber workers when fewer than the
    maximum are alive: a worker then samples several shards, one call each, so every shard is the same call with
    the same padding whoever runs it."""

    def __init__(self, spec: RolloutWorkerSpec, placement: ElasticRole, **kw: Any) -> None:
        super().__init__("rollout", RolloutWorker, spec, placement, **kw)
        self._calls: list[tuple[Any, Ref, Ref]] = []  # the last generate: (worker, meta_ref, rollout_ref) per shard
        self._unchecked: list[tuple[Any, Ref]] = []  # every generate call not yet seen to succeed: (worker, meta)

    def load_weights(self, message: Ref, actors: Sequence[Any] | None = None) -> list[tuple[Any, Ref]]:
        """Send one weights object to these workers (default: every member; each reads it from the object
        store): [(worker, ref of its (version, checksum))]."""
        return [(a, a.load_weights.remote(message)) for a in (self.actors if actors is None else actors)]

    def generate(self, shards: Sequence[PromptShard], retry: bool = False) -> list[tuple[Ref, Ref]]:
        """[(meta_ref, rollout_ref)] per shard; shard i goes to member i mod n. `retry` (after `drop(lost())`):
        a shard whose worker is still a member keeps its call — it finishes there —, the shards of the lost
        workers are spread over the members."""
        members = self.actors
        if not members:
            raise RuntimeError("rollout: no rollout worker is alive (reconcile first)")
        kept = set(members) if retry else set()
        calls, k = [], 0
        for i, s in enumerate(shards):
            if retry and self._calls[i][0] in kept:
                calls.append(self._calls[i])
                continue
            a = members[k % len(members)]
            k += 1
            meta, rollout = a.generate.options(num_returns=2).remote(s.prompts, s.row_index, s.seeds, s.n)
            calls.append((a, meta, rollout))
            self._unchecked.append((a, meta))
        self._calls = calls
        return [(m, r) for _, m, r in calls]

    def lost_in_generate(self, hung: bool) -> list[Any]:
        """The workers that generate calls lost (see `ElasticGroup.lost`) — any call since the last check, so
        generations submitted ahead (max_staleness >= 1) count too."""
        import ray

        lost = self.lost(self._unchecked, hung)
        self._unchecked = [(a, m) for a, m in self._unchecked if a not in lost and not ray.wait([m], timeout=0)[0]]
        return lost


class ReferenceGroup(WorkerGroup[ReferenceWorker]):
    def __init__(self, spec: ReferenceSpec, placement: PlacementSpec, pools: dict[str, Any], **kw: Any) -> None:
        super().__init__("reference", ReferenceWorker, spec, placement, pools, distributed=False, **kw)

    def compute_logprobs(self, rollouts: Sequence[Ref]) -> list[tuple[Ref, Ref]]:
        """[(meta_ref, logprobs_ref)] per shard."""
        return [tuple(a.compute_logprobs.options(num_returns=2).remote(r)) for a, r in self.assign(rollouts)]


class RewardGroup(WorkerGroup[RewardWorker]):
    def __init__(self, spec: RewardSpec, placement: PlacementSpec, pools: dict[str, Any], **kw: Any) -> None:
        super().__init__("reward", RewardWorker, spec, placement, pools, distributed=False, **kw)

    def score(self, rollouts: Sequence[Ref]) -> list[tuple[Ref, Ref]]:
        """[(meta_ref, scores_ref)] per shard."""
        return [tuple(a.score.options(num_returns=2).remote(r)) for a, r in self.assign(rollouts)]


class ValueGroup(WorkerGroup[ValueWorker]):
    def __init__(self, spec: ValueSpec, placement: PlacementSpec, pools: dict[str, Any], **kw: Any) -> None:
        super().__init__("value", ValueWorker, spec, placement, pools, distributed=True, **kw)

    def setup(self, snapshot: Snapshot = None) -> list[Ref]:
        return [a.setup.remote(snapshot) for a in self.actors]

    def compute_values(self, rollouts: Sequence[Ref]) -> list[tuple[Ref, Ref]]:
        """[(meta_ref, values_ref)] per shard. Each rank scores whole shards (inference needs no collective), so
        any number of generator shards can be spread over the value ranks."""
        return [tuple(self.actors[i % len(self.actors)].compute_values.options(num_returns=2).remote(r))
                for i, r in enumerate(rollouts)]

    def update(self, rollouts: Sequence[Ref], iteration: int) -> list[Ref]:
        return [a.update.remote(r, iteration) for a, r in self.assign(rollouts)]

    def save(self, directory: str, tag: str) -> list[Ref]:
        return [a.save.remote(directory, tag) for a in self.actors]
