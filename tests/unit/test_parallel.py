"""Tensor parallelism (models/parallel.py) against the dense model, in 2 gloo processes without Ray.

Independent reference: the unsharded GPT in the same process, same weights, same batch. Tolerance: fp32 with
gloo sums in a different order than one matmul: forward ≤ 1e-5, gradients ≤ 1e-5 absolute.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.config import GPTConfig
from models.gpt import GPT
from models.parallel import shard_spec, shard_tensor, unshard_tensor

WORLD = 2


def test_shard_unshard_roundtrip_and_qkv_layout() -> None:
    cfg = GPTConfig.from_name("nano")
    torch.manual_seed(0)
    model = GPT(cfg)
    for name, t in model.state_dict().items():
        parts = [shard_tensor(t, name, r, WORLD) for r in range(WORLD)]
        assert torch.equal(unshard_tensor(parts, name), t), name
    # rank 1 of c_attn holds the q, k and v rows of head 1 (head_dim rows each), in that order
    w = model.transformer.h[0].attn.c_attn.weight.data
    c, hd = cfg.n_embd, cfg.head_dim
    local = shard_tensor(w, "transformer.h.0.attn.c_attn.weight", 1, WORLD)
    expected = torch.cat([w[i * c + hd:i * c + 2 * hd] for i in range(3)])
    assert torch.equal(local, expected)
    assert shard_spec("transformer.h.0.ln_1.weight") is None


def _worker(rank: int, store_file: str, errors: Any) -> None:
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=WORLD)
        _check_tp(rank)
        dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def _check_tp(rank: int) -> None:
    from models.parallel import gather_state_dict, shard_model

    cfg = GPTConfig.from_name("nano", vocab_size=64, n_head=4, n_embd=32)
    torch.manual_seed(0)
    dense = GPT(cfg)
    sharded = GPT(cfg)
    sharded.load_state_dict(dense.state_dict())
    shard_model(sharded, dist.group.WORLD, rank, WORLD)
    ids = torch.randint(0, cfg.vocab_size, (3, 10), generator=torch.Generator().manual_seed(1))

    ref = dense(ids)
    out = sharded(ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    # same loss → same gradients; compare each shard with the matching slice of the dense gradient
    (ref.square().mean() + ref[..., 3].sum()).backward()
    (out.square().mean() + out[..., 3].sum()).backward()
    dense_grads = {n: p.grad for n, p in dense.named_parameters()}
    for name, p in sharded.named_parameters():
        expected = shard_tensor(dense_grads[name], name, rank, WORLD)
        torch.testing.assert_close(p.grad, expected, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    flags = {n: getattr(p, "tensor_model_parallel", False) for n, p in sharded.named_parameters()}
    assert flags["transformer.h.0.attn.c_attn.weight"] and not flags["transformer.h.0.attn.c_proj.bias"]

    # gathering the shards gives back the dense state dict
    local = {n: p.detach() for n, p in sharded.named_parameters()}
    full = gather_state_dict(local, cfg, dist.group.WORLD, WORLD)
    for name, t in dense.named_parameters():
        assert torch.equal(full[name], t.detach()), name


def test_tensor_parallel_matches_dense_forward_backward_and_gathers_back() -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_worker, args=(r, os.path.join(d, "store"), errors)) for r in range(WORLD)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    if msgs or any(p.exitcode != 0 for p in procs):
        pytest.fail("\n".join(msgs) or f"exit codes {[p.exitcode for p in procs]}")
