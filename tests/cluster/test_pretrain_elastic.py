"""Elastic pretraining (Ray Train V2, `parallel.min_workers..num_workers`) on a local multi-node cluster.

`ray.cluster_utils.Cluster` with 1-CPU fake nodes: the run starts on the head alone (1 worker), a node joins
after the step-8 checkpoint (Ray Train grows the group to 2 workers at its next resize check, restarting from
the latest checkpoint, which the engine converts to a universal checkpoint because the ZeRO partitioning
changes with DP), then that node is removed after the step-24 checkpoint (its worker dies; the run restarts
with the 1 worker left from step 24, again from a converted checkpoint).
Checked: the data-parallel size of the rows goes 1 → 2 → 1, every step appears once, and the token count is
the sum over steps of what each step trained on (no step counted twice).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from cluster.metrics import read_metrics

pytestmark = pytest.mark.slow

STEPS, EVERY, SEQ, ROWS = 40, 8, 32, 2


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    from cluster.runtime import init_ray

    # Restarting after the node loss waits this long for the lost worker's resources before shrinking.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "10"
    # The controller polls workers (and takes one report per worker) every 2 s by default; poll faster (it
    # also notices the lost worker sooner). Both settings reach the controller through the raylets' environment.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    init_ray(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()
    os.environ.pop("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", None)
    os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from jobs.data.corpus import load_texts
    from jobs.data.tokens import prepare
    from models.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("data")
    Tokenizer.train(load_texts("pydoc"), vocab_size=512, min_frequency=2).save(root / "tokenizer.json")
    prepare("pydoc", root / "tokenizer.json", root / "pydoc", row_tokens=256)
    return root / "pydoc"


def _wait(cond, what: str, timeout: float = 180.0) -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise TimeoutError(what)
        time.sleep(0.5)


def test_elastic_scale_up_then_down(cluster, dataset, tmp_path):
    from jobs.config import load_config
    from jobs.pretrain import PretrainConfig, run

    # The 1-worker group waits before step 13 and the 2-worker group before step 29 while their hold files
    # exist (`failure.hold`, cluster/faults.py), so each resize happens at a known point whatever the machine's
    # speed.
    holds = [tmp_path / "hold-1", tmp_path / "hold-2"]
    for h in holds:
        h.touch()
    cfg = load_config(PretrainConfig, base={
        "name": "elastic", "runs_root": str(tmp_path), "log_every": 4, "model": {"preset": "nano"},
        "data": {"dir": str(dataset), "seq_len": SEQ},
        "optim": {"max_steps": STEPS, "warmup_steps": 2, "micro_batch_size": ROWS, "grad_accum": 1},
        "parallel": {"num_workers": 2, "min_workers": 1, "zero_stage": 1, "elastic_interval_s": 2.0,
                     "rendezvous": "file"},
        "checkpoint": {"every_n_steps": EVERY, "keep": 3},
        "failure": {"max_failures": 2, "hold": [f"1:13:{holds[0]}", f"2:29:{holds[1]}"]},
        "eval": {"every_n_steps": STEPS, "batches": 1},
    })
    run_dir = tmp_path / "elastic"

    def checkpoint_at(dp: int, step: int = 0) -> bool:
        """Ray Train has registered (all ranks uploaded) a checkpoint written by a group of `dp` workers."""
        try:
            snapshot = json.loads((run_dir / "trainer_state" / "checkpoint_manager_snapshot.json").read_text())
            latest = snapshot["latest_checkpoint_result"]["metrics"]
            return latest["dp"] == dp and latest["step"] >= step
        except (OSError, ValueError, KeyError, TypeError):  # not written yet / being replaced
            return False

    # Ray's fake nodes start/stop with signals, which only the main thread may use: the run goes to a thread.
    result: dict = {}

    def train() -> None:
        try:
            result["summary"] = run(cfg)
        except BaseException as e:  # reported below
            result["error"] = e

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    alive = thread.is_alive
    try:
        _wait(lambda: not alive() or checkpoint_at(1), "a checkpoint of the 1-worker group")
        assert alive(), result
        node = cluster.add_node(num_cpus=1)
        _wait(lambda: not alive() or checkpoint_at(2, 3 * EVERY), "the step-24 checkpoint of the 2-worker group")
        assert alive(), result
        cluster.remove_node(node)
    finally:
        for h in holds:  # never leave the run waiting
            h.unlink(missing_ok=True)
        thread.join(timeout=300)
    assert "error" not in result, result.get("error")
    summary = result["summary"]

    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, STEPS + 1)), f"each step exactly once, got {steps}"
    dps = [r["dp"] for r in rows]
    phases = [d for i, d in enumerate(dps) if i == 0 or d != dps[i - 1]]
    assert phases == [1, 2, 1], dps
    assert summary["tokens"] == sum(ROWS * SEQ * d for d in dps)
    assert (run_dir / "checkpoint" / "model.safetensors").is_file()
