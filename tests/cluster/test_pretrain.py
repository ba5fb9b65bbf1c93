"""`raygpt pretrain` on Ray Train + DeepSpeed (2 CPU workers, gloo) against a plain single-process PyTorch loop.

The reference (`reference_run`) is independent of DeepSpeed and Ray: the same nano GPT from the same seed, the
same batches (every data-parallel rank's `TokenDataset.batch_at(step)`, concatenated), torch AdamW with the
same parameter groups, `clip_grad_norm_`, and the warmup/cosine schedule. fp32 tolerance: per-step losses within
2e-5 and final weights within 1e-4 (gloo all-reduces sum in a different order than one process; Adam's
normalisation amplifies last-bit differences in near-zero gradients).

Runs (each ~25–35 s on 2 cores) serve several assertions each:
- TP=2: losses + exported weights = reference; the exported directory loads in transformers with equal logits.
- PP=2: losses + exported weights (stages gathered, tied embedding) = reference.
- ZeRO-3 × DP=2 with rank 1 exiting (os._exit, `failure.inject: ["1:5"]`) during step 5: Ray Train restarts
  from the step-3 checkpoint; losses, weights and token count = the uninterrupted reference; every step appears
  once in metrics.jsonl.
- Resume: a new run from that run's step-3 checkpoint (N/2 of N=6) finishes with the same losses and weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.metrics import read_metrics
from jobs.config import load_config
from jobs.data.tokens import TokenDataset, prepare
from jobs.pretrain import PretrainConfig, run
from models.checkpoint import load_checkpoint
from models.config import GPTConfig
from models.gpt import GPT
from models.losses import lm_loss
from models.schedules import warmup_cosine

pytestmark = pytest.mark.slow

STEPS, SEQ, MBS, GA = 6, 32, 2, 2
LOSS_TOL, WEIGHT_TOL = 2e-5, 1e-4


@pytest.fixture(scope="module")
def ray_cluster():
    from cluster.runtime import init_ray, shutdown_ray

    init_ray(num_cpus=4)
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from jobs.data.corpus import load_texts
    from models.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("data")
    tok = Tokenizer.train(load_texts("pydoc"), vocab_size=512, min_frequency=2)
    tok.save(root / "tokenizer.json")
    prepare("pydoc", root / "tokenizer.json", root / "pydoc", row_tokens=256)
    return root / "pydoc"


def make_config(dataset: Path, root: Path, name: str, **sets: object) -> PretrainConfig:
    base = {
        "name": name, "runs_root": str(root), "log_every": 1, "seed": 3,
        "model": {"preset": "nano"},
        "data": {"dir": str(dataset), "tokenizer": str(dataset.parent / "tokenizer.json"), "seq_len": SEQ, "seed": 5},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "max_steps": STEPS, "micro_batch_size": MBS, "grad_accum": GA,
                  "grad_clip": 0.5, "weight_decay": 0.1},
        "parallel": {"num_workers": 2, "zero_stage": 1},
        "checkpoint": {"every_n_steps": 3, "keep": 2},
        "failure": {"max_failures": 0},
        "eval": {"every_n_steps": 3, "batches": 1},
    }
    return load_config(PretrainConfig, base=base, overrides=[f"{k}={v}" for k, v in sets.items()])


def reference_run(dataset: Path, dp: int, seed: int = 3, data_seed: int = 5) -> tuple[list[float], GPT]:
    """Plain single-process training: the losses of steps 1..STEPS and the final model."""
    meta = json.loads((dataset / "meta.json").read_text())
    cfg = GPTConfig.from_name("nano", vocab_size=meta["vocab_size"], bos_token_id=meta["eos_id"],
                              eos_token_id=meta["eos_id"])
    torch.manual_seed(seed)
    model = GPT(cfg)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 1.0, 2, STEPS, 0.1))
    shards = [TokenDataset(dataset, "train", r, dp, block_size=SEQ, seed=data_seed) for r in range(dp)]
    losses = []
    for step in range(STEPS):
        blocks = torch.from_numpy(np.concatenate([s.batch_at(step, MBS * GA) for s in shards])).long()
        opt.zero_grad()
        total = 0.0
        for mb in blocks.split(MBS):
            loss = lm_loss(model(mb[:, :-1]), mb[:, 1:])
            (loss / (len(blocks) // MBS)).backward()
            total += loss.item() / (len(blocks) // MBS)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        sched.step()
        losses.append(total)
    return losses, model


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def assert_same_weights(exported: Path, reference: GPT) -> None:
    got = load_checkpoint(exported).state_dict()
    for name, t in reference.state_dict().items():
        torch.testing.assert_close(got[name], t, atol=WEIGHT_TOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_tensor_parallel_matches_single_process(ray_cluster, dataset, tmp_path):
    ref_losses, ref_model = reference_run(dataset, dp=1)
    summary = run(make_config(dataset, tmp_path, "tp2", **{"parallel.tensor": 2}))
    run_dir = Path(summary["run_dir"])
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([losses[s] for s in range(1, STEPS + 1)], ref_losses, atol=LOSS_TOL, rtol=0)
    assert_same_weights(run_dir / "checkpoint", ref_model)

    # the exported directory is a GPT-2 checkpoint that transformers loads, with the reference's logits
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(run_dir / "checkpoint").eval()
    ids = torch.randint(0, ref_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref_model.eval()(ids), atol=1e-3, rtol=0)
    rows = read_metrics(run_dir)
    assert rows[0]["step"] == 0 and "val_ppl" in rows[0]  # the untrained model's validation perplexity
    assert {"tokens_per_s", "mfu", "lr", "grad_norm"} <= set(rows[-1]) and "val_ppl" in rows[-1]


def test_pipeline_parallel_matches_single_process(ray_cluster, dataset, tmp_path):
    ref_losses, ref_model = reference_run(dataset, dp=1)
    summary = run(make_config(dataset, tmp_path, "pp2", **{"parallel.pipeline": 2}))
    run_dir = Path(summary["run_dir"])
    losses = step_losses(run_dir)
    np.testing.assert_allclose([losses[s] for s in range(1, STEPS + 1)], ref_losses, atol=LOSS_TOL, rtol=0)
    assert_same_weights(run_dir / "checkpoint", ref_model)


@pytest.fixture(scope="module")
def zero3_run(ray_cluster, dataset, tmp_path_factory) -> Path:
    """ZeRO-3, DP=2; rank 1 exits during step 5 once; max_failures=1 restarts from the step-3 checkpoint."""
    root = tmp_path_factory.mktemp("zero3")
    cfg = make_config(dataset, root, "zero3", **{"parallel.zero_stage": 3, "failure.max_failures": 1,
                                                  "failure.inject": '["1:5"]'})
    summary = run(cfg)
    run_dir = Path(summary["run_dir"])
    # the fault's claim, written by rank 1 right before its os._exit (cluster/faults.py)
    assert (run_dir / ".faults" / "rank1-step5").is_file(), "the injected failure did not happen"
    return run_dir


def test_zero3_survives_worker_failure_and_matches_single_process(zero3_run, dataset):
    ref_losses, ref_model = reference_run(dataset, dp=2)
    rows = [r for r in read_metrics(zero3_run) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, STEPS + 1)), f"each step exactly once, got {steps}"
    np.testing.assert_allclose([r["loss"] for r in rows], ref_losses, atol=LOSS_TOL, rtol=0)
    assert rows[-1]["tokens"] == STEPS * 2 * MBS * GA * SEQ  # no step counted twice
    assert_same_weights(zero3_run / "checkpoint", ref_model)


def test_resume_from_half_way_equals_uninterrupted_run(zero3_run, dataset, tmp_path):
    ref_losses, ref_model = reference_run(dataset, dp=2)
    half = zero3_run / "trainer_state" / f"step-{STEPS // 2:08d}"
    assert (half / "trainer_state.json").is_file()
    cfg = make_config(dataset, tmp_path, "resumed", **{"parallel.zero_stage": 3, "checkpoint.resume_from": str(half)})
    run_dir = Path(run(cfg)["run_dir"])
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(STEPS // 2 + 1, STEPS + 1))  # starts after the restored step
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], ref_losses[STEPS // 2:], atol=LOSS_TOL, rtol=0)
    assert_same_weights(run_dir / "checkpoint", ref_model)
