"""bf16 pretraining on GPUs through `jobs.pretrain.run` (Ray Train + DeepSpeed, nccl), and its MFU.

- one GPU, bf16, the `gpt2` preset (124 M) for 30 steps: the loss falls and every row reports an MFU in (0, 1);
  the measured tokens/s and MFU (against the peak the job measures with a bf16 matmul) are recorded;
- tensor parallel (TP = 2) and pipeline parallel (PP = 2, 2 micro-batches in flight) on two GPUs: the same run as
  one GPU (same seed, same global batch) within bf16 tolerance — relative 3e-2 on every step's loss.
Skipped without CUDA (tests/gpu/conftest.py); needs 1 or 2 devices as marked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gpu_util import GPUS, pydoc_dataset, record, requires_gpus

pytestmark = [pytest.mark.gpu, pytest.mark.slow, requires_gpus(1), pytest.mark.timeout(900)]
BF16_REL = 3e-2


@pytest.fixture(scope="module")
def ray_cluster():
    from cluster.runtime import init_ray, shutdown_ray

    init_ray(num_cpus=8, num_gpus=GPUS)
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pydoc_dataset(tmp_path_factory.mktemp("gpu-data"))


def pretrain(dataset: Path, root: Path, name: str, preset: str, steps: int, **parallel: int) -> list[dict]:
    from cluster.metrics import read_metrics
    from jobs.config import load_config
    from jobs.pretrain import PretrainConfig, run

    base = {
        "name": name, "runs_root": str(root), "log_every": 1, "seed": 3, "model": {"preset": preset},
        "data": {"dir": str(dataset), "seq_len": 256, "seed": 5},
        "optim": {"lr": 6e-4, "warmup_steps": 5, "max_steps": steps, "micro_batch_size": 16, "grad_accum": 2},
        "parallel": {"num_workers": parallel.get("tensor", 1) * parallel.get("pipeline", 1), "use_gpu": True,
                     "precision": "bf16", "zero_stage": 0 if parallel.get("pipeline", 1) > 1 else 1, **parallel},
        "checkpoint": {"every_n_steps": steps}, "eval": {"every_n_steps": steps, "batches": 1},
    }
    run(load_config(PretrainConfig, base=base, overrides=[]))
    return [r for r in read_metrics(root / name) if "loss" in r]


def test_bf16_single_gpu_pretraining_learns_and_reports_mfu(ray_cluster, dataset, tmp_path) -> None:
    rows = pretrain(dataset, tmp_path, "gpt2-bf16", "gpt2", steps=30)
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.5, (first, last)
    steady = rows[5:]  # after warm-up/compilation
    mfu = sum(r["mfu"] for r in steady) / len(steady)
    tps = sum(r["tokens_per_s"] for r in steady) / len(steady)
    assert all(0 < r["mfu"] < 1 for r in steady)
    record("pretrain_gpt2_bf16_1gpu", tokens_per_s=round(tps), mfu=round(mfu, 4),
           peak_flops=rows[-1].get("peak_flops"), loss_first5=round(first, 3), loss_last5=round(last, 3))


@requires_gpus(2)
@pytest.mark.parametrize("layout", [{"tensor": 2}, {"pipeline": 2}], ids=["tp2", "pp2"])
def test_bf16_model_parallel_matches_one_gpu(ray_cluster, dataset, tmp_path, layout: dict[str, int]) -> None:
    ref = pretrain(dataset, tmp_path, "tiny-1gpu", "tiny", steps=8)
    got = pretrain(dataset, tmp_path, f"tiny-{'-'.join(f'{k}{v}' for k, v in layout.items())}", "tiny", steps=8,
                   **layout)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, 9))
    diffs = [abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(got, ref)]
    record(f"pretrain_tiny_bf16_{'_'.join(layout)}", max_rel_loss_diff=max(diffs),
           tokens_per_s=round(got[-1]["tokens_per_s"]), mfu=round(got[-1]["mfu"], 4))
    assert max(diffs) < BF16_REL, list(zip([a["loss"] for a in got], [b["loss"] for b in ref]))
