"""Rollout engines: one interface for everything that samples responses (PPO/GRPO rollout workers, `raygpt
comparisons`, `raygpt eval`, `raygpt generate`), with two implementations chosen by config (`engine: native |
vllm`): `actors.engines.native` (the project's own sampler, no extra dependency) and `actors.engines.vllm`
(vLLM, the engine every peer uses; installed with the `raygpt[vllm]` extra).

The contract (`RolloutEngine`):
- `generate(prompts, params, eos_id=, seeds=, n=1)` → `models.generation.Generation` with len(prompts)·n rows;
  row i·n + j is sample j of prompt i and uses seeds[i·n + j] (a row's sample is a pure function of its seed and
  the weights, never of its batch-mates). `params` is the one `models.generation.SamplingParams`.
- `load_weights(state, version)` → checksum of the weights now held (`actors.base.weights_checksum` over the
  state's names), so a caller can refuse a stale or corrupted engine.
- `logprobs` in the returned Generation are the engine's own; only the native engine guarantees they are the
  trainer's (vLLM's are recomputed by the policy before an update).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from models.generation import Generation, SamplingParams


class RolloutEngine(ABC):
    """Samples responses to token prompts with a copy of a policy's weights."""

    name: str = "engine"
    exact_logprobs: bool = False  # True when Generation.logprobs equal the trainer's forward pass

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, eos_id: int,
                 seeds: Sequence[int], n: int = 1) -> Generation:
        """len(prompts)·n rows; row i·n + j = sample j of prompt i, seeded by seeds[i·n + j]."""

    @abstractmethod
    def load_weights(self, state: Mapping[str, Any], version: int) -> str:
        """Replace the weights (models/ parameter names, NumPy arrays or tensors); returns their checksum."""
