"""Elastic workers on Ray's multi-node test cluster (`ray.cluster_utils.Cluster`: real raylets on one machine):
a node that joins is used, a node that leaves does not kill the run, and every item is answered exactly once
with the right result.
"""

from __future__ import annotations

import socket
import sys
import time

import pytest
import ray
import ray.cloudpickle
from ray.cluster_utils import Cluster

from cluster.elastic import ElasticPool, PoolError

pytestmark = pytest.mark.slow
SLOT = "raygpt_test_slot"  # custom resource: one per worker, so the test decides where workers fit


class Squarer:
    """A stand-in generation worker: a pure function of the item, slow enough that work is in flight."""

    def square(self, x: int) -> tuple[int, str]:
        time.sleep(0.05)
        return x * x, ray.get_runtime_context().get_node_id()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    # Workers unpickle Squarer by value: the test module is not importable on them.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {SLOT: 1}, "include_dashboard": False, "node_ip_address": "127.0.0.1",
        "dashboard_agent_listen_port": _free_port(), "object_store_memory": 100 * 1024 * 1024,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    ray.init(address=c.address, logging_level="WARNING")
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_pool_grows_onto_new_node_and_survives_its_removal(cluster):
    head_node = ray.get_runtime_context().get_node_id()
    pool = ElasticPool(Squarer, min_workers=1, max_workers=3, num_cpus=0, resources={SLOT: 1}, ready_timeout_s=60)
    results: dict[int, int] = {}
    nodes_of: dict[int, str] = {}
    state = {"phase": "one node", "stop": False, "added": None, "mark": 0, "ready_after_loss": None}

    def feed():
        i = 0
        while not state["stop"]:
            yield i
            i += 1

    fed_deadline = time.time() + 120
    try:
        for index, (sq, node) in pool.map_unordered(lambda w, x: w.square.remote(x), feed()):
            assert index not in results, f"item {index} answered twice"
            results[index], nodes_of[index] = sq, node
            assert time.time() < fed_deadline, f"stuck in phase {state['phase']}: {pool.stats}"
            if state["phase"] == "one node" and len(results) >= 10:
                assert pool.num_ready == 1 and set(nodes_of.values()) == {head_node}
                state["added"] = cluster.add_node(num_cpus=1, resources={SLOT: 2}, node_ip_address="127.0.0.1")
                state["phase"] = "grown"
            elif state["phase"] == "grown" and node == state["added"].node_id and pool.num_ready == 3:
                # the two pending workers landed on the new node and take work; now take the node away
                cluster.remove_node(state["added"])
                state["phase"], state["mark"] = "shrunk", len(results)
            elif state["phase"] == "shrunk" and len(results) >= state["mark"] + 30:
                state["ready_after_loss"] = pool.num_ready
                state["stop"] = True
    finally:
        stats = pool.stats
        pool.close()

    assert state["phase"] == "shrunk" and state["stop"], state
    # every fed item answered exactly once, correctly, whichever worker (or retry) ran it
    assert sorted(results) == list(range(len(results)))
    assert all(results[i] == i * i for i in results)
    added = state["added"].node_id
    assert stats.per_node.get(added, 0) >= 1, "the node that joined was never used"
    assert stats.lost >= 2, "the removed node's workers should have died"
    assert stats.ready_peak == 3
    # after the loss, the run continued on the head's single slot (replacements stay pending, no room)
    assert state["ready_after_loss"] == 1
    late = [i for i in results if i >= state["mark"] + 5]
    assert late and {nodes_of[i] for i in late} == {head_node}


def test_pool_refuses_to_start_below_min_workers(cluster):
    pool = ElasticPool(Squarer, min_workers=2, max_workers=2, num_cpus=0, resources={SLOT: 1}, ready_timeout_s=3)
    try:
        with pytest.raises(PoolError, match="min_workers: only 1 of 2"):
            list(pool.map_unordered(lambda w, x: w.square.remote(x), range(3)))
    finally:
        pool.close()
