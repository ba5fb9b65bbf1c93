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
    assert "rollout: 2 worker(s), each in its own placement group of {'CPU': 0.5}" in plan(col)
    assert "rollout" not in col.placement_spec().roles  # no rollout worker sits in the trainers' bundles
    with pytest.raises(ConfigError, match="placement.replicas.critic: unknown role"):
        from_dict(PPOJobConfig, {**base, "placement": {"replicas": {"critic": 1}}})
    with pytest.raises(ConfigError, match="ppo.minibatch_size: 6 is not divisible by the 4 policy replicas"):
        from_dict(PPOJobConfig, {**base, "ppo": {"minibatch_size": 6}, "placement": {"replicas": {"policy": 4}}})
    with pytest.raises(ConfigError, match="ppo.zero_stage: stage 3"):
        from_dict(PPOJobConfig, {**base, "ppo": {"zero_stage": 3}})
    with pytest.raises(ConfigError, match="ppo.entropy_coef: must be >= 0, got -0.1"):
        from_dict(PPOJobConfig, {**base, "ppo": {"entropy_coef": -0.1}})
    with pytest.raises(ConfigError, match="fault.inject"):
        from_dict(PPOJobConfig, {**base, "fault": {"inject": ["value:one:score"]}})
    with pytest.raises(ConfigError, match="reward_model: give exactly one"):
        from_dict(PPOJobConfig, {**base, "reward_function": "m:f"})


def test_rollout_workers_min_max_resolve_and_bad_ranges_are_refused_naming_the_field() -> None:
    base = {"policy": "p", "reward_model": "r"}

    def cfg(**placement: object) -> PPOJobConfig:
        return from_dict(PPOJobConfig, {**base, "placement": placement})

    elastic = cfg(layout="disaggregated", rollout_workers={"min": 1, "max": 4}, cpus_per_worker=0.25)
    spec = elastic.placement_spec()
    assert (spec.rollout.min, spec.rollout.max, spec.rollout.bundle()) == (1, 4, {"CPU": 0.25})
    assert "rollout" not in spec.pools and "rollout" not in spec.roles
    assert elastic.generators() == ("rollout", 4)  # shards = max, whatever number of workers is alive
    assert "rollout: 1..4 (elastic) worker(s)" in plan(elastic)
    fixed = cfg(replicas={"rollout": 3}).placement_spec().rollout  # replicas.rollout is min = max
    assert (fixed.min, fixed.max) == (3, 3)
    assert cfg().placement_spec().rollout is None and cfg().generators() == ("policy", 1)
    custom = cfg(layout="custom", pools={"a": {"bundles": 1, "cpus": 2.0}},
                 roles={r: {"pool": "a", "cpus": 0.5} for r in ("policy", "reference", "reward", "value")}
                 | {"rollout": {"replicas": 2, "cpus": 1.0, "gpus": 0.5}}).placement_spec()
    assert (custom.rollout.min, custom.rollout.max, custom.rollout.bundle()) == (2, 2, {"CPU": 1.0, "GPU": 0.5})
    for placement, match in [
        ({"rollout_workers": {"min": 3, "max": 2}}, r"placement.rollout_workers.min: must be <= "
                                                   r"rollout_workers.max, got min=3 > max=2"),
        ({"rollout_workers": {"min": 0, "max": 2}}, r"placement.rollout_workers.min: must be >= 1 .* got 0"),
        ({"rollout_workers": {"min": -1, "max": 1}}, r"placement.rollout_workers.min: must be >= 1 .* got -1"),
        ({"rollout_workers": {"min": 0, "max": -1}}, r"placement.rollout_workers.min: must be <= .* max=-1"),
        ({"rollout_workers": {"min": 1, "max": 2}, "replicas": {"rollout": 2}},
         r"placement.rollout_workers: give either replicas.rollout .* or rollout_workers"),
        ({"rollout_workers": {"min": 1, "max": 2}, "cpus_per_worker": 0.0, "gpus_per_worker": 0.0},
         r"placement.cpus_per_worker/gpus_per_worker"),
    ]:
        with pytest.raises(ConfigError, match=match):
            cfg(**placement)
    with pytest.raises(ConfigError, match="engine: 'vllm' samples on rollout workers"):
        from_dict(PPOJobConfig, {**base, "engine": "vllm"})
    assert from_dict(PPOJobConfig, {**base, "engine": "vllm",
                                    "placement": {"rollout_workers": {"min": 1, "max": 2}}}).engine == "vllm"
