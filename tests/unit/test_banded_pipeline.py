"""GPT-3's alternating dense/banded attention (Brown et al. 2020 §2.1) under pipeline parallelism: a 2-stage
DeepSpeed PipelineModule (models/pipeline.py) in 2 gloo processes without Ray equals the single-process GPT.

Independent reference: the unsplit GPT on the same weights and batch, plus a check that the banded model is a
different function from the dense one on that batch (so the test fails if the pipeline silently runs dense).
"""

from __future__ import annotations

import os
import tempfile
import traceback
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.config import GPTConfig
from models.gpt import GPT

WORLD = 2
CFG = GPTConfig.from_name("nano", vocab_size=64, n_layer=4, n_ctx=32, attention="alternating", local_window=3)


def _worker(rank: int, store_file: str, errors: Any) -> None:
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        for k, v in (("LOCAL_RANK", "0"), ("RANK", str(rank)), ("WORLD_SIZE", str(WORLD)),
                     ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
            os.environ[k] = v  # DeepSpeed reads these; the process group already exists, no socket is opened
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=WORLD)
        _check_pipeline(rank)
        dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def _check_pipeline(rank: int) -> None:
    import deepspeed
    import deepspeed.ops

    from models.losses import lm_loss
    from models.pipeline import to_pipeline

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build of the CPU shm op
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    gpt = GPT(CFG).eval()
    ids = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = gpt(ids)
        dense = GPT(CFG.replace(attention="dense")).eval()
        dense.load_state_dict(gpt.state_dict())
        assert (dense(ids) - ref).abs().max() > 1e-3, "banded and dense agree on this batch: the test cannot fail"
    topo = SimpleNamespace(pp=WORLD, dp=1, tp=1)
    pipe = to_pipeline(gpt, topo, lambda logits, labels: lm_loss(logits, labels), partition="type:Block").eval()
    blocks = [m for m in pipe.modules() if type(m).__name__ == "BlockPipe"]
    assert len(blocks) == CFG.n_layer // WORLD  # each stage holds one dense and one banded block
    assert sorted(b.block.attn.window is None for b in blocks) == [False, True]
    with torch.no_grad():
        if rank == 0:
            dist.send(pipe(ids).contiguous(), dst=1)
        else:
            hidden = torch.empty(2, 16, CFG.n_embd)
            dist.recv(hidden, src=0)
            torch.testing.assert_close(pipe(hidden), ref, atol=1e-5, rtol=1e-5)


def test_pipeline_two_stages_equal_single_process_for_alternating_attention() -> None:
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
