"""Optional generation replicas: each holds a rollout engine (actors/engines: the native sampler, or vLLM) loaded
with a copy of the policy's weights and samples rollouts with it, so sampling scales independently of training.

No silent stale weights (a failure the anchors have): after every update the policy's full weights travel once
through the object store as a `WeightsMessage` (version, checksum, arrays); a worker loads them, recomputes the
checksum over what it now holds and reports it; every rollout it samples carries that version and checksum, and
the controller refuses a rollout whose (version, checksum) differ from the policy's (jobs/rl/controller.py).
vLLM's log-probs are not the trainer's: its rollouts say so (`exact_logprobs=False`) and the policy recomputes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actors.base import RolloutMeta, WeightsMessage, meta_of, rollout_from_generation
from actors.engines import make_engine
from actors.rollout import Rollout, RolloutError
from cluster.worker_group import DistributedWorker
from models.generation import SamplingParams


@dataclass(frozen=True)
class RolloutWorkerSpec:
    checkpoint: str  # the policy's initial checkpoint (architecture + version-0 weights)
    sampling: SamplingParams
    eos_id: int  # the token that ends a response
    engine: str = "native"  # rollout engine (actors/engines): "native" | "vllm"


class RolloutWorker(DistributedWorker):
    """A rollout engine holding a copy of the policy. Plain class; the RL job wires it with `ray.remote`."""

    role = "rollout"

    def __init__(self, spec: RolloutWorkerSpec, rank: int = 0, world_size: int = 1) -> None:
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.engine = make_engine(spec.engine, spec.checkpoint)
        self.version = -1  # nothing loaded yet: generating before the first load_weights is refused
        self.checksum = ""

    def load_weights(self, message: WeightsMessage) -> tuple[int, str]:
        """Push the policy's weights into the engine (vLLM: its in-place weight update, no disk); returns (version,
        checksum recomputed over the weights the engine now holds)."""
        checksum = self.engine.load_weights(message.state, message.version)
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
        gen = self.engine.generate(prompts, self.spec.sampling, eos_id=self.spec.eos_id, seeds=seeds, n=n)
        rollout = rollout_from_generation(gen, row_index, self.version, self.checksum, engine=self.engine.name,
                                          exact_logprobs=self.engine.exact_logprobs)
        return meta_of(rollout), rollout
