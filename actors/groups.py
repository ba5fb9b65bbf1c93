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
from cluster.placement import PlacementSpec
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

    def weights_info(self) -> list[Ref]:
        return [a.weights_info.remote() for a in self.actors]


class RolloutGroup(WorkerGroup[RolloutWorker]):
    def __init__(self, spec: RolloutWorkerSpec, placement: PlacementSpec, pools: dict[str, Any], **kw: Any) -> None:
        super().__init__("rollout", RolloutWorker, spec, placement, pools, distributed=False, **kw)

    def load_weights(self, message: Ref) -> list[Ref]:
        """Broadcast one weights object to every replica (each reads it from the object store)."""
        return [a.load_weights.remote(message) for a in self.actors]

    def generate(self, shards: Sequence[PromptShard]) -> list[tuple[Ref, Ref]]:
        return [tuple(a.generate.options(num_returns=2).remote(s.prompts, s.row_index, s.seeds, s.n))
                for a, s in self.assign(shards)]


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
