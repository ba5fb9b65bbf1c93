"""The RL job with vLLM rollout workers (issue: rollout engines). vLLM samples; the policy recomputes the old
log-probs with its own forward pass before it updates and logs the rollout-vs-trainer gap every iteration; the
controller still refuses a rollout worker whose weights are not the policy's. Skipped without the `vllm` extra."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from actors.base import WeightsMessage, weights_checksum
from actors.rollout import RolloutError
from actors.rollout_worker import RolloutWorker, RolloutWorkerSpec
from cluster.metrics import read_metrics
from jobs.config import ConfigError, from_dict
from jobs.rl.config import PPOJobConfig
from models.checkpoint import load_checkpoint
from models.generation import SamplingParams

pytest.importorskip("vllm", exc_type=ImportError)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    from cluster.runtime import init_ray, shutdown_ray

    init_ray(num_cpus=4)
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from ppo_setup import build_artifacts

    return build_artifacts(tmp_path_factory.mktemp("vllm-ppo"), n_head=1)  # head size 32: vLLM CPU kernels


def test_ppo_with_vllm_rollout_workers_logs_the_logprob_gap(ray_session, art: dict[str, Any], tmp_path: Path
                                                            ) -> None:
    from ppo_setup import tiny_overrides

    from jobs.ppo import run

    cfg = from_dict(PPOJobConfig, tiny_overrides(
        art, tmp_path, "vllm", engine="vllm", iterations=2, **{
            "placement.replicas": {"policy": 1, "value": 1, "rollout": 1},
            "ppo.zero_stage": 0, "ptx.coef": 0.0}))
    run(cfg)
    rows = read_metrics(tmp_path / "vllm")
    assert [r["engine"] for r in rows] == ["vllm", "vllm"]
    for r in rows:  # fp32 kernels on both sides: the gap is float noise, and it is measured, not assumed
        assert 0.0 <= r["logprob_gap_mean"] <= r["logprob_gap_max"] < 1e-3, r
    # the recompute makes the update on-policy: the first epoch's ratio starts at exactly the trainer's own
    assert abs(rows[0]["ratio"] - 1.0) < 0.05


def test_a_vllm_worker_refuses_weights_that_are_not_the_policys(ray_session, art: dict[str, Any]) -> None:
    import ray

    # an actor of its own: vLLM's CPU worker takes its process's threads over
    worker = ray.remote(RolloutWorker).options(num_cpus=1).remote(
        RolloutWorkerSpec(art["sft"], SamplingParams(max_new_tokens=4), 0, engine="vllm"))
    state = {k: v.numpy() for k, v in load_checkpoint(art["sft"], kind="lm").state_dict().items()}
    good = weights_checksum(state)
    assert ray.get(worker.load_weights.remote(WeightsMessage(1, good, state))) == (1, good)
    bad = {k: v.copy() for k, v in state.items()}
    bad["transformer.wte.weight"][0, 0] += 1.0  # a corrupted push: the engine holds other weights than announced
    with pytest.raises(RolloutError, match="weight_checksum"):
        ray.get(worker.load_weights.remote(WeightsMessage(2, good, bad)))
    with pytest.raises(RolloutError, match="no weights yet"):  # and it refuses to sample until a good push
        ray.get(worker.generate.remote([[1, 2]], [0], [0]))


def test_engine_vllm_without_rollout_workers_is_refused_before_anything_starts(art: dict[str, Any],
                                                                               tmp_path: Path) -> None:
    from ppo_setup import tiny_overrides

    with pytest.raises(ConfigError, match="engine: 'vllm' samples on rollout workers"):
        from_dict(PPOJobConfig, tiny_overrides(art, tmp_path, "x", engine="vllm"))
    with pytest.raises(ConfigError, match="engine: unknown rollout engine 'fast'"):
        from_dict(PPOJobConfig, tiny_overrides(art, tmp_path, "x", engine="fast"))
