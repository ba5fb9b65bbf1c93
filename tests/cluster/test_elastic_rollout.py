"""Elastic rollout workers (`placement.rollout_workers: {min, max}`) on a multi-node `ray.cluster_utils.Cluster`.

The head (4 logical CPUs) holds the three trainer roles (1 CPU each) and room for one 1-CPU rollout worker; 1-CPU
nodes join and leave at known points of the run: a wrapper of `Controller.prompts` runs the change on the driver
(the main thread, which Ray's fake nodes need) before an iteration's generate stage — where the controller
reconciles the pool — and waits until Ray has placed what can be placed. Real Ray, real workers, no mocks.

Checked, with ppo_setup's tiny artifacts (GRPO, group_size 2: shards hold whole groups):
- a fixed-size run (placement.replicas.rollout = 2, i.e. min = max = 2, one worker on the head, one on a node)
  is the reference;
- an elastic run (min 1, max 2) starts with the 1 worker that fits, takes a second when a node joins, loses the
  head's worker mid-generate (fault.inject: its shard is resubmitted to the survivor), and goes on with 1 when
  the node is removed: `rollout_workers` in metrics.jsonl is [1, 2, 1], and every metric and the final weights
  equal the fixed-size run's bit for bit (the prompt shards are as many as `max` whatever the worker count, and a
  shard's samples are a pure function of (seed, iteration, row): nothing depends on who sampled it);
- a pool that cannot place `min` workers fails with an error naming placement.rollout_workers.min.
One cluster for the module.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cluster.metrics import read_metrics
from jobs.config import from_dict
from jobs.ppo import run
from jobs.rl.config import PPOJobConfig
from jobs.rl.controller import Controller

pytestmark = pytest.mark.slow

VOLATILE = ("time", "samples_per_s", "recoveries", "rollout_workers")  # wall-clock and bookkeeping, not results


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    from cluster.runtime import init_ray

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    init_ray(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from ppo_setup import build_artifacts

    return build_artifacts(tmp_path_factory.mktemp("elastic-artifacts"))


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("elastic-runs")


def config(art: dict[str, Any], runs_root: Path, name: str, **extra: Any) -> PPOJobConfig:
    from ppo_setup import tiny_overrides

    return from_dict(PPOJobConfig, tiny_overrides(art, runs_root, name, **{
        "iterations": 3, "algorithm": "grpo", "group_size": 2, "batch_size": 4, "prompts.eval_size": 0,
        "placement.cpus_per_worker": 1.0, "placement.replicas": {"policy": 1, "value": 0},
        "ppo.zero_stage": 0, **extra}))


def results(runs_root: Path, name: str) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    rows = [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in read_metrics(runs_root / name)]
    return rows, load_file(str(runs_root / name / "checkpoint" / "model.safetensors"))


def before_iterations(monkeypatch: pytest.MonkeyPatch, actions: dict[int, Callable[[], None]]) -> None:
    """Run actions[it] on the driver right before iteration `it` cuts its prompts (hence before its generate)."""
    prompts = Controller.prompts

    def wrapped(self: Controller, it: int) -> Any:
        if it in actions:
            actions.pop(it)()
        return prompts(self, it)

    monkeypatch.setattr(Controller, "prompts", wrapped)


def wait_placed(prefix: str, timeout: float = 60.0) -> None:
    """Until no placement group named `prefix…` is pending: what the cluster has room for is placed."""
    from ray.util import placement_group_table

    deadline = time.monotonic() + timeout
    while any(pg["name"].startswith(prefix) and pg["state"] not in ("CREATED", "REMOVED")
              for pg in placement_group_table().values()):
        assert time.monotonic() < deadline, placement_group_table()
        time.sleep(0.2)


@pytest.fixture(scope="module")
def fixed_run(cluster, art, runs_root) -> tuple[list[dict], dict]:
    node = cluster.add_node(num_cpus=1)  # room for the second worker
    cluster.wait_for_nodes()
    try:
        run(config(art, runs_root, "fixed", **{"placement.replicas.rollout": 2}))
    finally:
        cluster.remove_node(node)
    rows = read_metrics(runs_root / "fixed")
    assert [r["rollout_workers"] for r in rows] == [2, 2, 2]
    return results(runs_root, "fixed")


def test_pool_grows_when_a_node_joins_and_shrinks_when_workers_are_lost(fixed_run, cluster, art, runs_root,
                                                                         monkeypatch) -> None:
    nodes = []

    def add_node() -> None:
        nodes.append(cluster.add_node(num_cpus=1))
        cluster.wait_for_nodes()
        wait_placed("ppo-elastic-rollout")  # the pending group of the second slot lands on the new node

    before_iterations(monkeypatch, {1: add_node, 2: lambda: cluster.remove_node(nodes.pop())})
    # Iteration 1 also loses the head's worker mid-generate: its shard goes to the worker on the new node.
    summary = run(config(art, runs_root, "elastic", **{"placement.rollout_workers": {"min": 1, "max": 2},
                                                       "fault.inject": ["rollout:1:generate"]}))
    rows = read_metrics(runs_root / "elastic")
    assert [r["rollout_workers"] for r in rows] == [1, 2, 1]
    assert summary["recoveries"] == 1 and rows[-1]["recoveries"] == 1
    got, want = results(runs_root, "elastic"), fixed_run
    assert [r["iteration"] for r in got[0]] == [r["iteration"] for r in want[0]] == [1, 2, 3]
    for r, ref in zip(*(rows for rows, _ in (got, want))):
        assert r == ref, {k: (r.get(k), ref.get(k)) for k in r.keys() | ref.keys() if r.get(k) != ref.get(k)}
    assert got[1].keys() == want[1].keys()
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k], rtol=0, atol=0)


def test_too_few_workers_for_min_is_a_clear_error(cluster, art) -> None:
    import ray

    from actors.groups import RolloutGroup
    from actors.rollout_worker import RolloutWorkerSpec
    from cluster.elastic import ElasticError
    from cluster.placement import ElasticRole
    from models.generation import SamplingParams

    # The head's 4 CPUs (nothing else runs now) hold one 3-CPU worker; min asks for 2. The previous runs' placement
    # groups are removed asynchronously: wait until their CPUs are back (a group that never goes is a leak).
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 4:
        assert time.monotonic() < deadline, f"earlier runs still hold CPUs: {ray.available_resources()}"
        time.sleep(0.5)
    group = RolloutGroup(RolloutWorkerSpec(art["sft"], SamplingParams(), eos_id=0), ElasticRole(2, 2, 3.0, 0.0),
                         name_prefix="too-few", timeout_s=3.0)
    try:
        with pytest.raises(ElasticError, match=r"placement.rollout_workers.min: 1 of at least 2 rollout workers"):
            group.ready()
    finally:
        group.shutdown()
