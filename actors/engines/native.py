"""The native rollout engine: the project's own sampler (`models.generation.generate`, continuous batching in
`models.batching`) on a private copy of the policy's GPT. No extra dependency; the default on CPU.

Its log-probs are the trainer's: the same modules and the same tempered, unfiltered distribution
(`models.generation.tempered_logprobs`), so PPO can use them as old log-probs without a recompute
(`exact_logprobs = True`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.base import device, disable_dropout, load_model, weights_checksum
from actors.engines import RolloutEngine
from models.config import GPTConfig
from models.generation import Generation, SamplingParams, generate
from models.gpt import GPT


class NativeEngine(RolloutEngine):
    """Samples with a GPT held by this process. `max_rows` caps the decode batch (KV-cache slots); None decodes
    every row of a call at once (finished rows still leave the batch)."""

    name = "native"
    exact_logprobs = True

    def __init__(self, model: GPT, *, max_rows: int | None = None) -> None:
        if not isinstance(model, GPT):
            raise TypeError(f"model: the native engine samples with a GPT, got {type(model).__name__}")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows: must be >= 1 or None, got {max_rows}")
        self.model = disable_dropout(model).eval().requires_grad_(False)
        self.max_rows = max_rows
        self.version = -1  # set by load_weights; -1 = the weights it was built with

    @classmethod
    def from_config(cls, cfg: GPTConfig, *, max_rows: int | None = None) -> NativeEngine:
        """An engine with freshly initialised weights of shape `cfg` on this worker's device (load_weights next)."""
        return cls(GPT(cfg).to(device()), max_rows=max_rows)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, max_rows: int | None = None) -> NativeEngine:
        model = load_model(str(path), "lm")
        assert isinstance(model, GPT)
        return cls(model, max_rows=max_rows)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, eos_id: int,
                 seeds: Sequence[int], n: int = 1) -> Generation:
        if len(seeds) != len(prompts) * n:
            raise ValueError(f"seeds: expected len(prompts)·n = {len(prompts)}·{n} = {len(prompts) * n} seeds, "
                             f"got {len(seeds)}")
        return generate(self.model, [list(p) for p in prompts], params, eos_id=eos_id,
                        seeds=[int(s) for s in seeds], pad_id=eos_id, n=n, max_rows=self.max_rows)

    def load_weights(self, state: Mapping[str, Any], version: int) -> str:
        """Load a full state (models/ names; NumPy arrays or tensors) strictly; returns the checksum of the weights
        now held, over the same names (`actors.base.weights_checksum`)."""
        own = self.model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"state: {'missing ' + missing[0] if missing else 'unexpected ' + unexpected[0]} "
                             f"({len(missing)} missing, {len(unexpected)} unexpected parameter names)")
        tensors = {}
        for name, value in state.items():
            t = torch.as_tensor(np.array(value, copy=True) if isinstance(value, np.ndarray) else value)
            if tuple(t.shape) != tuple(own[name].shape):
                raise ValueError(f"state[{name!r}]: shape {tuple(t.shape)}, the engine's model has "
                                 f"{tuple(own[name].shape)}")
            tensors[name] = t
        self.model.load_state_dict(tensors, strict=True)
        self.version = version
        return weights_checksum(self.model.state_dict())
