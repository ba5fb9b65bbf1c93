"""Optional generation replicas: they hold a copy of the policy's weights and sample rollouts with it, so
sampling can scale (and later move to a faster engine) independently of training.

No silent stale weights (a failure the anchors have): after every update the policy's full weights travel once
through the object store as a `WeightsMessage` (version, checksum, arrays); a worker loads them, recomputes the
checksum over what it now holds and reports it; every rollout it samples carries that version and checksum, and
the controller refuses a rollout whose (version, checksum) differ from the policy's (jobs/ppo.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actors.base import (
    RolloutMeta,
    WeightsMessage,
    device,
    disable_dropout,
    meta_of,
    sample_rollout,
    weights_checksum,
)
from actors.rollout import Rollout, RolloutError
from cluster.worker_group import DistributedWorker
from models.checkpoint import read_config
from models.generation import SamplingParams
from models.gpt import GPT


@dataclass(frozen=True)
class RolloutWorkerSpec:
    checkpoint: str  # the policy's initial checkpoint (architecture + version-0 weights)
    sampling: SamplingParams
    eos_id: int  # the token that ends a response


class RolloutWorker(DistributedWorker):
    """A sampler with a copy of the policy. Plain class; jobs/ppo.py wires it with `ray.remote`."""

    role = "rollout"

    def __init__(self, spec: RolloutWorkerSpec, rank: int = 0, world_size: int = 1) -> None:
        self.spec, self.rank, self.world_size = spec, rank, world_size
        cfg, _, _ = read_config(spec.checkpoint)
        self.model = disable_dropout(GPT(cfg)).to(device()).eval().requires_grad_(False)
        self.version = -1  # nothing loaded yet: generating before the first load_weights is refused
        self.checksum = ""

    def load_weights(self, message: WeightsMessage) -> tuple[int, str]:
        """Load the policy's weights; returns (version, checksum recomputed over the loaded weights)."""
        state = {k: torch.from_numpy(v.copy()) for k, v in message.state.items()}
        self.model.load_state_dict(state, strict=True)
        checksum = weights_checksum(self.model.state_dict())
        if checksum != message.checksum:
            self.version, self.checksum = -1, ""  # refuse to sample with weights that are not the policy's
            raise RolloutError(f"weight_checksum: weights of version {message.version} loaded as {checksum[:12]}…, "
                               f"the policy sent {message.checksum[:12]}…")
        self.version, self.checksum = message.version, checksum
        return self.version, self.checksum

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], row_index: list[int], seeds: list[int], n: int = 1
                 ) -> tuple[RolloutMeta, Rollout]:
        """`n` samples per prompt (prefill shared), one row per (prompt, sample): see `sample_rollout`."""
        if self.version < 0:
            raise RolloutError("weight_version: the rollout worker has no weights yet (load_weights first)")
        rollout = sample_rollout(self.model, prompts, row_index, seeds, self.spec.sampling, self.spec.eos_id,
                                 self.version, self.checksum, n=n)
        return meta_of(rollout), rollout
