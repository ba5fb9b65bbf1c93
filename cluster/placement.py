"""Placement as data: role → resource pool → bundles (the idea of veRL's resource pools).

A *pool* is one Ray placement group of identical bundles. A *role* (policy, reference, reward, value, rollout)
names its pool, its number of replicas and what each replica takes from its bundle; replica i sits in bundle
i mod (bundles of the pool). Several roles in one pool share its bundles — the *colocated* layout, where every
bundle hosts one replica of each role and the actors split its CPU/GPU — and one pool per role is the
*disaggregated* layout. Both come from config alone (`PlacementConfig.layout`), and `custom` takes the pools and
roles verbatim. `PlacementSpec.validate` checks that every bundle holds what its roles ask for and names the pool,
bundle and roles when it does not, before anything starts.

The rollout role is elastic and never in a pool: a placement group has a fixed number of bundles and cannot grow,
so every rollout worker gets a placement group of its own (one bundle: `ElasticRole`), and the job runs with
between `min` and `max` of them as the cluster allows (cluster/elastic.py). `placement.replicas.rollout: n` is
the fixed case min = max = n.

Pure data + a few Ray calls at the bottom (placement groups are created and removed there, nowhere else).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from models.config import ConfigError, field

ROLES: tuple[str, ...] = ("policy", "reference", "reward", "value", "rollout")
DEFAULT_REPLICAS: dict[str, int] = {"policy": 1, "reference": 1, "reward": 1, "value": 1, "rollout": 0}
Layout = Literal["colocated", "disaggregated", "custom"]
Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
_EPS = 1e-9


class PlacementError(ConfigError):
    """The placement spec is inconsistent or does not fit; the message names the field."""


@dataclass
class PoolSpec:
    """One placement group of `bundles` identical bundles."""

    bundles: int = field(1, "number of bundles in the pool")
    cpus: float = field(1.0, "CPUs per bundle")
    gpus: float = field(0.0, "GPUs per bundle")
    strategy: Strategy = field("PACK", "Ray placement strategy: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")

    def resources(self) -> dict[str, float]:
        out = {"CPU": float(self.cpus)}
        if self.gpus > 0:
            out["GPU"] = float(self.gpus)
        return out


@dataclass
class RoleSpec:
    """Where a role's replicas run and what each replica takes from its bundle (custom layout: `roles.rollout`
    gives the rollout workers' cpus/gpus and, without rollout_workers, their fixed count; its pool is unused)."""

    pool: str = field("shared", "name of the pool (key of placement.pools)")
    replicas: int = field(1, "replicas (data-parallel ranks) of the role; 0 = role not started")
    cpus: float = field(0.25, "CPUs each replica takes from its bundle")
    gpus: float = field(0.0, "GPUs each replica takes from its bundle (fractions share one GPU)")


@dataclass
class WorkerRange:
    """`placement.rollout_workers`: the job starts with what fits (at least `min`) and takes more rollout workers,
    up to `max`, whenever the cluster has room at the start of an iteration; a lost one is dropped (docs/CLUSTER.md)."""

    min: int = field(0, "fewest rollout workers the run goes on with (it waits for them up to "
                        "fault.stage_timeout_s, then fails)")
    max: int = field(0, "most rollout workers (and the number of prompt shards); 0 = placement.replicas.rollout")


@dataclass(frozen=True)
class ElasticRole:
    """The rollout workers: between `min` and `max` replicas, each in its own one-bundle placement group of
    `cpus`/`gpus`."""

    min: int
    max: int
    cpus: float
    gpus: float

    def bundle(self) -> dict[str, float]:
        return PoolSpec(cpus=self.cpus, gpus=self.gpus).resources()


@dataclass
class PlacementSpec:
    """The resolved placement: pools by name, roles by name (never `rollout`), and the elastic rollout workers
    (None: the policy samples)."""

    pools: dict[str, PoolSpec]
    roles: dict[str, RoleSpec]
    rollout: ElasticRole | None = None

    def bundle_of(self, role: str, replica: int) -> int:
        spec = self.roles[role]
        return replica % self.pools[spec.pool].bundles

    def validate(self) -> PlacementSpec:
        for name, pool in self.pools.items():
            if pool.bundles < 1:
                raise PlacementError(f"pools.{name}.bundles: must be >= 1, got {pool.bundles}")
            if pool.cpus < 0 or pool.gpus < 0 or pool.cpus + pool.gpus <= 0:
                raise PlacementError(f"pools.{name}: a bundle needs cpus > 0 or gpus > 0 "
                                     f"(got cpus={pool.cpus}, gpus={pool.gpus})")
            if pool.strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
                raise PlacementError(f"pools.{name}.strategy: unknown strategy {pool.strategy!r}")
        for role, spec in self.roles.items():
            if role not in ROLES:
                raise PlacementError(f"roles.{role}: unknown role (known: {', '.join(ROLES)})")
            if spec.replicas < 0:
                raise PlacementError(f"roles.{role}.replicas: must be >= 0, got {spec.replicas}")
            if spec.replicas and spec.pool not in self.pools:
                raise PlacementError(f"roles.{role}.pool: no pool named {spec.pool!r} "
                                     f"(pools: {', '.join(self.pools) or 'none'})")
            if spec.cpus < 0 or spec.gpus < 0:
                raise PlacementError(f"roles.{role}: cpus/gpus must be >= 0")
            if role == "rollout":
                raise PlacementError("roles.rollout: rollout workers are placed one per placement group of their "
                                     "own (PlacementConfig.resolve), never in a pool")
        if self.rollout is not None:
            lo, hi = self.rollout.min, self.rollout.max
            if hi < 1 or not 1 <= lo <= hi:
                raise PlacementError(f"rollout_workers: needs 1 <= min <= max, got min={lo}, max={hi}")
            if self.rollout.cpus < 0 or self.rollout.gpus < 0 or self.rollout.cpus + self.rollout.gpus <= 0:
                raise PlacementError(f"rollout_workers: a rollout worker needs cpus > 0 or gpus > 0 (got "
                                     f"cpus={self.rollout.cpus}, gpus={self.rollout.gpus})")
        # Capacity: the sum of what the replicas in a bundle ask for must fit in that bundle.
        for name, pool in self.pools.items():
            for b in range(pool.bundles):
                users = [(r, i) for r, s in self.roles.items() if s.pool == name
                         for i in range(s.replicas) if i % pool.bundles == b]
                cpus = sum(self.roles[r].cpus for r, _ in users)
                gpus = sum(self.roles[r].gpus for r, _ in users)
                who = ", ".join(f"{r}[{i}]" for r, i in users)
                if cpus > pool.cpus + _EPS or gpus > pool.gpus + _EPS:
                    raise PlacementError(
                        f"pools.{name}: bundle {b} holds cpus={pool.cpus}, gpus={pool.gpus} but "
                        f"{who} ask for cpus={cpus:g}, gpus={gpus:g}")
        return self

    def describe(self) -> str:
        lines = []
        for name, pool in self.pools.items():
            lines.append(f"pool {name}: {pool.bundles} × {pool.resources()} ({pool.strategy})")
            for b in range(pool.bundles):
                here = [f"{r}[{i}] ({s.cpus:g} CPU{f', {s.gpus:g} GPU' if s.gpus else ''})"
                        for r, s in self.roles.items() if s.pool == name
                        for i in range(s.replicas) if i % pool.bundles == b]
                lines.append(f"  bundle {b}: {', '.join(here) or '(empty)'}")
        if self.rollout is not None:
            r = self.rollout
            count = f"{r.min}" if r.min == r.max else f"{r.min}..{r.max} (elastic)"
            lines.append(f"rollout: {count} worker(s), each in its own placement group of {r.bundle()}")
        return "\n".join(lines)


@dataclass
class PlacementConfig:
    """How the PPO roles are placed. `colocated`: one pool whose bundles each host one replica of every role;
    `disaggregated`: one pool per role; `custom`: `pools` and `roles` as given."""

    layout: Layout = field("colocated", "colocated | disaggregated | custom")
    replicas: dict[str, int] = field({r: n for r, n in DEFAULT_REPLICAS.items() if r != "value"},
                                     "replicas per role; a role left out keeps its default (the job's: value = 1 "
                                     "for an algorithm with a critic, else 0; rollout = separate generation "
                                     "workers, 0 = the policy generates)")
    cpus_per_worker: float = field(0.5, "CPUs each actor takes (colocated: a bundle holds one of each role)")
    gpus_per_worker: float = field(0.0, "GPUs each actor takes (colocated: the roles of a bundle share this)")
    pools: dict[str, PoolSpec] = field({}, "custom layout: pools by name")
    roles: dict[str, RoleSpec] = field({}, "custom layout: roles by name")
    rollout_workers: WorkerRange = field(WorkerRange(), "elastic rollout workers {min, max} (instead of "
                                         "replicas.rollout, which is min = max): more join when the cluster has "
                                         "room, lost ones are dropped; each takes cpus_per_worker/gpus_per_worker "
                                         "(custom: roles.rollout's) in a placement group of its own")

    def check(self, defaults: dict[str, int] | None = None) -> PlacementSpec:
        """Validate and resolve (raises PlacementError with the field path relative to the placement config).
        `defaults`: replicas of roles the config leaves out, overriding DEFAULT_REPLICAS (a job without a critic
        passes {"value": 0})."""
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0 or self.cpus_per_worker + self.gpus_per_worker <= 0:
            raise PlacementError(f"cpus_per_worker/gpus_per_worker: must be >= 0 and not both 0, got "
                                 f"{self.cpus_per_worker}/{self.gpus_per_worker}")
        for role, n in self.replicas.items():
            if role not in ROLES:
                raise PlacementError(f"replicas.{role}: unknown role (known: {', '.join(ROLES)})")
            if n < 0:
                raise PlacementError(f"replicas.{role}: must be >= 0, got {n}")
        lo, hi = self.rollout_workers.min, self.rollout_workers.max
        if (lo, hi) != (0, 0):
            fixed = "replicas.rollout" if self.replicas.get("rollout", 0) > 0 else \
                "roles.rollout.replicas" if self.layout == "custom" and "rollout" in self.roles else None
            if fixed:
                raise PlacementError(f"rollout_workers: give either {fixed} (a fixed count) or rollout_workers "
                                     "{min, max}, not both")
            if lo > hi:
                raise PlacementError(f"rollout_workers.min: must be <= rollout_workers.max, got min={lo} > max={hi}")
            if lo < 1:
                raise PlacementError(f"rollout_workers.min: must be >= 1 (the run needs a worker to sample; "
                                     f"without rollout workers the policy samples), got {lo}")
        return self.resolve(defaults)

    def resolve(self, defaults: dict[str, int] | None = None) -> PlacementSpec:
        if self.layout == "custom":
            if not self.roles:
                raise PlacementError("roles: the custom layout needs placement.roles (and placement.pools)")
            roles = {r: s for r, s in self.roles.items() if r != "rollout"}
            worker = self.roles.get("rollout", RoleSpec(replicas=0, cpus=self.cpus_per_worker,
                                                        gpus=self.gpus_per_worker))
            spec = PlacementSpec(dict(self.pools), roles, self._rollout(worker.replicas, worker.cpus, worker.gpus))
            return spec.validate()
        fallback = {**DEFAULT_REPLICAS, **(defaults or {})}
        replicas = {r: self.replicas.get(r, fallback[r]) for r in ROLES if r != "rollout"}
        layout = colocated if self.layout == "colocated" else disaggregated
        spec = layout(replicas, self.cpus_per_worker, self.gpus_per_worker)
        spec.rollout = self._rollout(self.replicas.get("rollout", fallback["rollout"]), self.cpus_per_worker,
                                     self.gpus_per_worker)
        return spec.validate()

    def _rollout(self, fixed: int, cpus: float, gpus: float) -> ElasticRole | None:
        """The rollout workers: rollout_workers {min, max} if given, else `fixed` of them (None for 0)."""
        lo, hi = (self.rollout_workers.min, self.rollout_workers.max) if self.rollout_workers.max else (fixed, fixed)
        return ElasticRole(lo, hi, cpus, gpus) if hi > 0 else None


def colocated(replicas: dict[str, int], cpus_per_worker: float, gpus_per_bundle: float = 0.0) -> PlacementSpec:
    """One pool `shared`: bundle b hosts replica b of every role that has one; the roles of a bundle split its
    `gpus_per_bundle` evenly (so four roles share one GPU at 0.25 each, as veRL colocates them)."""
    active = {r: n for r, n in replicas.items() if n > 0}
    if not active:
        raise PlacementError("replicas: no role has a replica")
    width = max(active.values())
    per_bundle = max(sum(1 for n in active.values() if n > b) for b in range(width))
    pool = PoolSpec(bundles=width, cpus=cpus_per_worker * per_bundle, gpus=gpus_per_bundle)
    roles = {r: RoleSpec(pool="shared", replicas=n, cpus=cpus_per_worker, gpus=gpus_per_bundle / per_bundle)
             for r, n in active.items()}
    return PlacementSpec({"shared": pool}, roles).validate()


def disaggregated(replicas: dict[str, int], cpus_per_worker: float, gpus_per_worker: float = 0.0) -> PlacementSpec:
    """One pool per role, one bundle per replica: no two roles share a bundle."""
    pools, roles = {}, {}
    for r, n in replicas.items():
        if n > 0:
            pools[r] = PoolSpec(bundles=n, cpus=cpus_per_worker, gpus=gpus_per_worker)
            roles[r] = RoleSpec(pool=r, replicas=n, cpus=cpus_per_worker, gpus=gpus_per_worker)
    if not roles:
        raise PlacementError("replicas: no role has a replica")
    return PlacementSpec(pools, roles).validate()


# --- Ray ----------------------------------------------------------------------------------------------------------
def create_pools(spec: PlacementSpec, timeout_s: float = 60.0, name_prefix: str = "raygpt") -> dict[str, Any]:
    """Create one placement group per pool that some role uses and wait until all are ready.

    Raises PlacementError naming the pool if the cluster cannot provide it within `timeout_s` (the group is
    removed again, so nothing is left reserved).
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    used = {s.pool for s in spec.roles.values() if s.replicas > 0}
    groups: dict[str, Any] = {}
    try:
        for name in sorted(used):
            pool = spec.pools[name]
            groups[name] = placement_group([pool.resources() for _ in range(pool.bundles)], strategy=pool.strategy,
                                           name=f"{name_prefix}-{name}")
        for name, pg in groups.items():
            ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
            if not ready:
                pool = spec.pools[name]
                raise PlacementError(
                    f"pools.{name}: {pool.bundles} bundle(s) of {pool.resources()} not available within "
                    f"{timeout_s:g}s (cluster has {ray.available_resources()})")
    except BaseException:
        for pg in groups.values():
            remove_placement_group(pg)
        raise
    return groups


def actor_options(spec: PlacementSpec, groups: dict[str, Any], role: str, replica: int) -> dict[str, Any]:
    """`.options(...)` for replica `replica` of `role`: its bundle of its pool's placement group and its share."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    rs = spec.roles[role]
    if not 0 <= replica < rs.replicas:
        raise PlacementError(f"roles.{role}: replica {replica} outside 0..{rs.replicas - 1}")
    strategy = PlacementGroupSchedulingStrategy(placement_group=groups[rs.pool],
                                                placement_group_bundle_index=spec.bundle_of(role, replica),
                                                placement_group_capture_child_tasks=False)
    return {"num_cpus": rs.cpus, "num_gpus": rs.gpus, "scheduling_strategy": strategy}


def create_worker_group(role: ElasticRole, name: str) -> Any:
    """One rollout worker's placement group (one bundle), not waited for: it is placed when the cluster has room
    (on an autoscaling cluster its pending demand is what adds a node)."""
    from ray.util.placement_group import placement_group

    return placement_group([role.bundle()], name=name)


def is_placed(group: Any) -> bool:
    """Whether the cluster has placed this placement group now (its state in the GCS, not a wait)."""
    from ray.util import placement_group_table

    return placement_group_table(group)["state"] == "CREATED"


def worker_options(role: ElasticRole, group: Any) -> dict[str, Any]:
    """`.options(...)` for a rollout worker in its own placement group."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=0,
                                                placement_group_capture_child_tasks=False)
    return {"num_cpus": role.cpus, "num_gpus": role.gpus, "scheduling_strategy": strategy}


def remove_pools(groups: dict[str, Any]) -> None:
    from ray.util.placement_group import remove_placement_group

    for pg in groups.values():
        try:
            remove_placement_group(pg)
        except Exception:  # noqa: BLE001 - already gone with a shut-down cluster; nothing else to release
            pass
