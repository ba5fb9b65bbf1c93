"""The value role: the PPO critic, V(s_t) for every response token, trained with the clipped value loss.

InstructGPT §3.5 ("RL"): the value function is initialised from the reward model, so `checkpoint` is normally the
RM directory loaded as kind "value" (models/checkpoint.py keeps the RM's head); from an LM checkpoint the head
starts fresh. V(s_t) is read at position P-1+t — the hidden state that has seen the prompt and a_<t, i.e. the
state in which a_t is chosen (TRL: `full_value[:, context_length - 1 : -1]`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from actors.base import ScoreMeta, device, load_model, score_meta
from actors.rollout import Rollout, RolloutError
from cluster.deepspeed_engine import EngineSpec, global_token_scale, initialize, load_engine, save_engine
from cluster.worker_group import DistributedWorker
from models.losses import value_loss
from models.seeding import derive_seed


@dataclass(frozen=True)
class ValueSpec:
    checkpoint: str  # RM (or LM) checkpoint directory the critic starts from
    engine: EngineSpec = field(default_factory=EngineSpec)
    epochs: int = 4
    minibatch_size: int = 4  # rows per rank per optimizer step
    clip_eps: float = 0.2  # value clipping range around the rollout-time values
    seed: int = 0


def response_values(model: Any, rollout: Rollout) -> Tensor:
    """(B, T) V(s_t) for each response position, 0 at padding."""
    dev = device()
    values = model(rollout.input_ids.to(dev), rollout.attention_mask.to(dev))[:, rollout.prompt_len - 1:-1].float()
    return torch.where(rollout.action_mask.to(dev).bool(), values, torch.zeros_like(values))


class ValueWorker(DistributedWorker):
    """One data-parallel rank of the critic. Plain class; jobs/ppo.py wires it with `ray.remote`."""

    role = "value"

    def __init__(self, spec: ValueSpec, rank: int = 0, world_size: int = 1) -> None:
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.engine: Any = None

    def setup(self, snapshot: tuple[str, str] | None = None) -> None:
        """Collective: build the engine from the init checkpoint, then restore `(directory, tag)` if given.

        From an LM checkpoint the value head starts fresh: seeding first makes that head the same in every run,
        every rank and after every restart (otherwise two runs of the same config would differ)."""
        torch.manual_seed(derive_seed(self.spec.seed, 4))
        self.engine = initialize(load_model(self.spec.checkpoint, "value"), self.spec.engine)
        if snapshot is not None:
            load_engine(self.engine, *snapshot)

    def save(self, directory: str, tag: str) -> None:
        save_engine(self.engine, directory, tag)

    @torch.no_grad()
    def compute_values(self, rollout: Rollout) -> tuple[ScoreMeta, Tensor]:
        """(meta, (B, T) old values V(s_t) of a generated shard, CPU float32)."""
        self.engine.module.eval()
        values = response_values(self.engine.module, rollout).cpu()
        return score_meta(values, rollout.action_mask), values

    def update(self, rollout: Rollout, iteration: int) -> dict[str, float]:
        """Collective: `epochs` passes of clipped value-loss minibatch steps on this rank's shard."""
        spec, eng, dev = self.spec, self.engine, device()
        if rollout.returns is None or rollout.values is None:
            raise RolloutError("returns: the rollout has not been finalized")
        if rollout.batch_size % spec.minibatch_size:
            raise RolloutError(f"minibatch_size: a shard of {rollout.batch_size} rows is not divisible by "
                               f"{spec.minibatch_size}")
        order = torch.Generator().manual_seed(derive_seed(spec.seed, iteration, self.rank, 2))
        torch.manual_seed(derive_seed(spec.seed, iteration, self.rank, 3))
        sums: dict[str, float] = defaultdict(float)
        steps = 0
        eng.train()
        for _ in range(spec.epochs):
            perm = torch.randperm(rollout.batch_size, generator=order)
            for k in range(rollout.batch_size // spec.minibatch_size):
                part = rollout.select(perm[k * spec.minibatch_size:(k + 1) * spec.minibatch_size])
                mask = part.action_mask.to(dev)
                values = response_values(eng, part)
                loss, m = value_loss(values, part.values.to(dev), part.returns.to(dev), mask, spec.clip_eps)
                eng.backward(loss * global_token_scale(mask))  # token mean over all ranks' minibatch rows
                eng.step()
                sums["vf_loss"] += float(loss.detach())
                sums["vf_clipfrac"] += float(m["vf_clipfrac"])
                sums["value_error"] += float(m["value_error"])
                steps += 1
        return {k: v / steps for k, v in sums.items()}
