"""A single-rank ZeRO-0 DeepSpeed engine (the PPO trainers' default) skips DeepSpeed's gradient all-reduce with
itself (cluster/deepspeed_engine.py `initialize`): the weights after a few steps must be bit-identical to an engine
that runs DeepSpeed's own all-reduce path. One process, a gloo world of 1, the `nano` GPT (~5 s).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cluster.deepspeed_engine import EngineSpec, initialize
from models.config import GPTConfig
from models.gpt import GPT


def train(engine: object, steps: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, 300, (4, 16), generator=g)
        loss = torch.nn.functional.cross_entropy(engine(x).flatten(0, 1), x.flatten())
        engine.backward(loss)
        engine.step()
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def test_single_rank_engine_skips_the_self_allreduce_with_identical_weights(tmp_path) -> None:
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        weights = []
        for deepspeed_path in (False, True):
            torch.manual_seed(0)
            engine = initialize(GPT(GPTConfig.from_name("nano", vocab_size=300)), EngineSpec())
            assert engine.enable_backward_allreduce is False  # nothing to average on one rank
            engine.enable_backward_allreduce = deepspeed_path  # DeepSpeed's bucket → all-reduce → ÷1 → copy back
            weights.append(train(engine))
        assert weights[0].keys() == weights[1].keys()
        for k in weights[0]:
            assert torch.equal(weights[0][k], weights[1][k]), k
        torch.manual_seed(0)
        start = GPT(GPTConfig.from_name("nano", vocab_size=300)).state_dict()
        assert not torch.equal(weights[0]["lm_head.weight"], start["lm_head.weight"])  # the steps did train
    finally:
        if started:
            dist.destroy_process_group()
