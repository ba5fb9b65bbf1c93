"""Placement as data: role → resource pool → bundles (the idea of veRL's resource pools).

A *pool* is one Ray placement group of identical bundles. A *role* (policy, reference, reward, value, rollout)
names its pool, its number of replicas and what each replica takes from its bundle; replica i sits in bundle
i mod (bundles of the pool). Several roles in one pool share its bundles — the *colocated* layout, where every
bundle hosts one replica of each role and the actors split its CPU/GPU — and one pool per role is the
*disaggregated* layout. Both come from config alone (`PlacementConfig.layout`), and `custom` takes the pools and
roles verbatim. `PlacementSpec.validate` checks that every bundle holds what its roles ask for and names the pool,
bundle and roles when it does not, before anything starts.

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
    """Where a role's replicas run and what each replica takes from its bundle."""

    pool: str = field("shared", "name of the pool (key of placement.pools)")
    replicas: int = field(1, "replicas (data-parallel ranks) of the role; 0 = role not started")
    cpus: float = field(0.25, "CPUs each replica takes from its bundle")
    gpus: float = field(0.0, "GPUs each replica takes from its bundle (fractions share one GPU)")


@dataclass
class PlacementSpec:
    """The resolved placement: pools by name, roles by name."""

    pools: dict[str, PoolSpec]
    roles: dict[str, RoleSpec]

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
        return self.resolve(defaults)

    def resolve(self, defaults: dict[str, int] | None = None) -> PlacementSpec:
        if self.layout == "custom":
            if not self.roles:
                raise PlacementError("roles: the custom layout needs placement.roles (and placement.pools)")
            return PlacementSpec(dict(self.pools), dict(self.roles)).validate()
        fallback = {**DEFAULT_REPLICAS, **(defaults or {})}
        replicas = {r: self.replicas.get(r, fallback[r]) for r in ROLES}
        if self.layout == "colocated":
            return colocated(replicas, self.cpus_per_worker, self.gpus_per_worker)
        return disaggregated(replicas, self.cpus_per_worker, self.gpus_per_worker)


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


def remove_pools(groups: dict[str, Any]) -> None:
    from ray.util.placement_group import remove_placement_group

    for pg in groups.values():
        try:
            remove_placement_group(pg)
        except Exception:  # noqa: BLE001 - already gone with a shut-down cluster; nothing else to release
            pass
