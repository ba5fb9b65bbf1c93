"""cluster/placement.py: colocated / disaggregated / custom layouts from config alone, capacity checks that name
the pool and bundle, and the PPO config's cross-field rules (no Ray)."""

from __future__ import annotations

import pytest

from cluster.placement import PlacementConfig, PlacementError, PoolSpec, RoleSpec, colocated, disaggregated
from jobs.config import ConfigError, from_dict
from jobs.rl.config import PPOJobConfig, plan

FOUR = {"policy": 2, "reference": 1, "reward": 1, "value": 2, "rollout": 0}


def test_colocated_puts_one_replica_of_every_role_in_each_bundle() -> None:
    spec = colocated(FOUR, cpus_per_worker=0.5, gpus_per_bundle=1.0)
    assert list(spec.pools) == ["shared"]
    pool = spec.pools["shared"]
    assert pool.bundles == 2 and pool.cpus == 2.0 and pool.gpus == 1.0  # bundle 0 hosts all four roles
    assert [spec.bundle_of("policy", i) for i in range(2)] == [0, 1]
    assert spec.bundle_of("reward", 0) == 0
    assert spec.roles["value"].gpus == pytest.approx(0.25)  # four roles share bundle 0's GPU
    assert "rollout" not in spec.roles


def test_disaggregated_gives_every_role_its_own_pool() -> None:
    spec = disaggregated(FOUR, cpus_per_worker=1.0, gpus_per_worker=1.0)
    assert sorted(spec.pools) == ["policy", "reference", "reward", "value"]
    assert spec.pools["policy"].bundles == 2 and spec.pools["reward"].bundles == 1
    assert all(spec.roles[r].pool == r for r in spec.roles)
    assert {p.gpus for p in spec.pools.values()} == {1.0}


def test_capacity_error_names_pool_bundle_and_roles() -> None:
    cfg = PlacementConfig(layout="custom", pools={"a": PoolSpec(bundles=1, cpus=1.0)},
                          roles={"policy": RoleSpec(pool="a", cpus=0.75), "value": RoleSpec(pool="a", cpus=0.5)})
    with pytest.raises(PlacementError, match=r"pools.a: bundle 0 .* policy\[0\], value\[0\] ask for cpus=1.25"):
        cfg.check()
    with pytest.raises(PlacementError, match="roles.value.pool: no pool named 'b'"):
        PlacementConfig(layout="custom", pools={"a": PoolSpec()}, roles={"value": RoleSpec(pool="b")}).check()


def test_layout_is_chosen_by_config_alone_and_errors_name_the_field() -> None:
    base = {"policy": "p", "reward_model": "r"}
    dis = from_dict(PPOJobConfig, {**base, "placement": {"layout": "disaggregated"}})
    assert len(dis.placement_spec().pools) == 4
    col = from_dict(PPOJobConfig, {**base, "placement": {"layout": "colocated", "replicas": {"rollout": 2}}})
    assert col.generators() == ("rollout", 2)
    assert "rollout[1]" in plan(col)
    with pytest.raises(ConfigError, match="placement.replicas.critic: unknown role"):
        from_dict(PPOJobConfig, {**base, "placement": {"replicas": {"critic": 1}}})
    with pytest.raises(ConfigError, match="ppo.minibatch_size: 6 is not divisible by the 4 policy replicas"):
        from_dict(PPOJobConfig, {**base, "ppo": {"minibatch_size": 6}, "placement": {"replicas": {"policy": 4}}})
    with pytest.raises(ConfigError, match="ppo.zero_stage: stage 3"):
        from_dict(PPOJobConfig, {**base, "ppo": {"zero_stage": 3}})
    with pytest.raises(ConfigError, match="fault.inject"):
        from_dict(PPOJobConfig, {**base, "fault": {"inject": ["value:one:score"]}})
    with pytest.raises(ConfigError, match="reward_model: give exactly one"):
        from_dict(PPOJobConfig, {**base, "reward_function": "m:f"})
