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
from pathlib import Path
from typing import Any, Literal

from models.config import ConfigError
from models.generation import Generation, SamplingParams

EngineName = Literal["native", "vllm"]
ENGINES: tuple[str, ...] = ("native", "vllm")


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


def check_engine(name: str, checkpoint: str | Path, field_name: str = "engine") -> None:
    """Everything that would make `make_engine(name, checkpoint)` fail, as a ConfigError naming `field_name`,
    before anything starts: an unknown engine, vLLM not installed (with how to install it), a model vLLM cannot
    run the way our GPT does."""
    if name not in ENGINES:
        raise ConfigError(f"{field_name}: unknown rollout engine {name!r} (engines: {', '.join(ENGINES)})")
    if name == "vllm":
        from actors.engines.vllm import check_vllm_model  # lazy: the vllm extra is optional

        try:
            check_vllm_model(checkpoint)
        except ConfigError as e:
            raise ConfigError(f"{field_name}: {str(e).removeprefix('engine: ')}") from None
        except ValueError as e:  # CheckpointError: a model vLLM cannot load
            raise ConfigError(f"{field_name}: {e}") from None


def make_engine(name: str, checkpoint: str | Path, **options: Any) -> RolloutEngine:
    """The rollout engine `name` ("native" | "vllm") loaded with `checkpoint`'s architecture and weights."""
    check_engine(name, checkpoint)
    if name == "vllm":
        from actors.engines.vllm import VLLMEngine  # lazy: the vllm extra is optional

        return VLLMEngine(checkpoint, **options)
    from actors.engines.native import NativeEngine  # native imports this module: import here, not at the top

    return NativeEngine.from_checkpoint(checkpoint, **options)
