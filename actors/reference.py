"""The reference role: the frozen SFT model π_ref, per-token log-probs of sampled responses.

Its log-probs enter the KL penalty of the reward (InstructGPT eq. 2, Ziegler et al. 2019 §2.2), taken under the
same softmax(logits / temperature) as the policy's sampling log-probs, so the KL compares like with like. Inference
only: replicas are independent (no collective), each scores the shards it is handed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from actors.base import ScoreMeta, load_model, response_logits, response_logprobs, score_meta
from actors.rollout import Rollout
from cluster.worker_group import DistributedWorker


@dataclass(frozen=True)
class ReferenceSpec:
    checkpoint: str  # the SFT checkpoint directory (the policy's starting point)
    temperature: float = 1.0  # the sampling temperature


class ReferenceWorker(DistributedWorker):
    """Frozen π_ref. Plain class; jobs/ppo.py wires it with `ray.remote`."""

    role = "reference"

    def __init__(self, spec: ReferenceSpec, rank: int = 0, world_size: int = 1) -> None:
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.model = load_model(spec.checkpoint, "lm").eval().requires_grad_(False)

    @torch.no_grad()
    def compute_logprobs(self, rollout: Rollout) -> tuple[ScoreMeta, Tensor]:
        """(meta, (B, T) log π_ref(a_t|s_t) under softmax(logits / temperature), 0 at padding, CPU float32)."""
        logits = response_logits(self.model, rollout)
        logprobs = response_logprobs(logits, rollout, self.spec.temperature).float().cpu()
        return score_meta(logprobs, rollout.action_mask), logprobs
