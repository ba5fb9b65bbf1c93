"""The one DeepSpeed layer (cluster/deepspeed_engine.py): its rules against hand-worked values, and a real
DeepSpeed ZeRO-1 engine in a 2-process gloo world against a hand-written AdamW loop (CPU, ~15 s).

Independent references: the parameter split and the ds config are spelled out by hand for a toy model; the
engine's update is checked against AdamW written out from Loshchilov & Hutter (2019, Algorithm 2: decoupled decay
p ← p − lr·(m̂/(√v̂+ε) + λ·p)) with the warmup + cosine learning rates worked out by hand, on the gradient of
the mean of the two ranks' losses (what DeepSpeed's data-parallel averaging computes).
"""

from __future__ import annotations

import copy
import os
import tempfile
import traceback
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from cluster.deepspeed_engine import (
    EngineSpec,
    OptimConfig,
    build_optimizer,
    ds_config,
    param_groups,
    resolve_precision,
)
from models.config import ConfigError


def toy() -> nn.Module:
    """Linear(3→4) · LayerNorm(4) · Linear(4→2): matrices '0.weight', '2.weight'; vectors the rest."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def test_param_groups_decay_matrices_only_once_each_and_skip_frozen() -> None:
    model = toy()
    emb = nn.Embedding(5, 3)
    model.append(emb)  # an embedding is a matrix: decayed
    model[2].weight = nn.Parameter(torch.zeros(2, 4))
    model.add_module("head", nn.Linear(4, 2, bias=False))
    model.head.weight = model[2].weight  # tied: must appear once
    model[0].bias.requires_grad_(False)  # frozen: must not appear
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [names[id(p)] for p in groups[0]["params"]] == ["0.weight", "2.weight", "3.weight"]
    assert [names[id(p)] for p in groups[1]["params"]] == ["1.weight", "1.bias", "2.bias"]
    # a model without vectors gets no empty group (ZeRO flattens each group into one buffer)
    assert [len(g["params"]) for g in param_groups(nn.Linear(2, 2, bias=False), 0.1)] == [1]


def test_ds_config_is_the_hand_written_dict() -> None:
    spec = EngineSpec(OptimConfig(micro_batch_size=2, grad_accum=3, grad_clip=0.5), zero_stage=3, precision="bf16")
    assert ds_config(spec, dp_size=4, bf16=True, load_universal=True) == {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 3,
        "train_batch_size": 24,
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": True},
    }
    cfg = ds_config(EngineSpec(OptimConfig.constant(1e-5, micro_batch_size=4), zero_stage=1), dp_size=2, bf16=False)
    assert (cfg["train_batch_size"], cfg["gradient_accumulation_steps"], cfg["zero_optimization"]) == (8, 1,
                                                                                                      {"stage": 1})
    assert cfg["bf16"] == {"enabled": False}


def test_precision_rule() -> None:
    assert [resolve_precision("auto", gpu) for gpu in (True, False)] == ["bf16", "fp32"]
    assert [resolve_precision(p, gpu) for p in ("fp32", "bf16") for gpu in (True, False)] == \
        ["fp32", "fp32", "bf16", "bf16"]


def test_schedules_warmup_cosine_and_constant() -> None:
    model = toy()
    opt, sched = build_optimizer(model, OptimConfig(lr=0.1, warmup_steps=2, max_steps=4, min_lr_ratio=0.1))
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warmup (s+1)/2, then 0.1 + 0.45·(1 + cos(π·(s−2)/2)), then the floor
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.055, 0.01, 0.01], abs=1e-12)
    opt, sched = build_optimizer(model, OptimConfig.constant(3e-4))
    for _ in range(3):
        assert opt.param_groups[0]["lr"] == 3e-4  # exactly: the factor is 1.0 at every step
        opt.step()
        sched.step()


def test_bad_spec_names_the_field() -> None:
    with pytest.raises(ConfigError, match="zero_stage"):
        EngineSpec(zero_stage=4)
    with pytest.raises(ConfigError, match="lr"):
        EngineSpec(OptimConfig.constant(0.0))


# --- a real engine in a 2-rank world ---------------------------------------------------------------------------
WORLD, STEPS, LR, WD, BETAS, EPS = 2, 4, 0.1, 0.5, (0.9, 0.95), 1e-8
HAND_LRS = [0.05, 0.1, 0.1, 0.055]  # warmup 2, cosine to 10% at step 4 (see test_schedules_…)
DECAYED = {"0.weight", "2.weight"}


def batches() -> torch.Tensor:
    return torch.randn(STEPS, WORLD * 2, 3, generator=torch.Generator().manual_seed(1))


def hand_adamw(model: nn.Module) -> nn.Module:
    """Loshchilov & Hutter's AdamW, written out, on the gradient of the mean of the ranks' losses."""
    ref = copy.deepcopy(model)
    state = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in ref.named_parameters()}
    for t, x in enumerate(batches(), start=1):
        ref.zero_grad()
        sum(ref(x[2 * r:2 * r + 2]).pow(2).mean() for r in range(WORLD)).div(WORLD).backward()
        lr = HAND_LRS[t - 1]
        with torch.no_grad():
            for n, p in ref.named_parameters():
                m, v = state[n]
                m.mul_(BETAS[0]).add_(p.grad, alpha=1 - BETAS[0])
                v.mul_(BETAS[1]).addcmul_(p.grad, p.grad, value=1 - BETAS[1])
                m_hat, v_hat = m / (1 - BETAS[0] ** t), v / (1 - BETAS[1] ** t)
                decay = WD * p if n in DECAYED else 0.0
                p.sub_(lr * (m_hat / (v_hat.sqrt() + EPS) + decay))
    return ref


def _worker(rank: int, store_file: str, errors: Any, results: Any) -> None:
    try:
        import torch.distributed as dist

        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=WORLD)
        from cluster.deepspeed_engine import full_state_dict, global_token_scale, initialize

        model = toy()
        reference = hand_adamw(model)
        optim = OptimConfig(lr=LR, warmup_steps=2, max_steps=STEPS, min_lr_ratio=0.1, weight_decay=WD,
                            betas=list(BETAS), eps=EPS, grad_clip=0.0, micro_batch_size=2)
        engine = initialize(model, EngineSpec(optim, zero_stage=1))
        lrs = []
        for x in batches():
            lrs.append(engine.get_lr()[0])
            engine.backward(engine(x[2 * rank:2 * rank + 2]).pow(2).mean())
            engine.step()
        weights = full_state_dict(engine)  # collective: ZeRO-1 master weights gathered
        mask = torch.tensor([[1, 1, 1, 0]]) if rank == 0 else torch.tensor([[1, 0, 0, 0]])
        scale = global_token_scale(mask)
        if rank == 0:
            # numpy, not tensors: a tensor crosses the queue through shared memory that dies with this process
            results.put((lrs, {k: v.numpy() for k, v in weights.items()},
                         {k: v.detach().numpy() for k, v in reference.state_dict().items()}, scale))
        else:
            results.put(("rank1", scale))
        dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def test_zero1_engine_equals_hand_written_adamw_with_the_param_split() -> None:
    ctx = mp.get_context("spawn")
    errors, results = ctx.Queue(), ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_worker, args=(r, os.path.join(d, "store"), errors, results))
                 for r in range(WORLD)]
        for p in procs:
            p.start()
        got = [results.get(timeout=300) for _ in range(WORLD)]
        for p in procs:
            p.join(timeout=60)
    assert errors.empty(), errors.get()
    rank0 = next(g for g in got if g[0] != "rank1")
    rank1 = next(g for g in got if g[0] == "rank1")
    lrs, weights, reference, scale0 = rank0
    assert lrs == pytest.approx(HAND_LRS, abs=1e-12)
    assert set(weights) == set(reference)
    for name, ref in reference.items():
        torch.testing.assert_close(torch.from_numpy(weights[name]), torch.from_numpy(ref), atol=1e-6, rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")
    # token mean over ranks: 3 and 1 tokens → world · n_local / n_global = 2·3/4 and 2·1/4
    assert (scale0, rank1[1]) == (1.5, 0.5)
