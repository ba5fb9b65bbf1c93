"""A rollout engine for a text-to-text T5 (Raffel et al. 2020 §2.4), so the one held-out evaluator
(`jobs.rlhf.evaluation.compare_models`, through its `engines` argument) scores a fine-tuned T5's responses exactly as
it scores a GPT's: same prompts, same per-prompt seeds, same `SamplingParams`, same labeller.

The encoder reads task prefix + prompt + EOS (`models.t5_generation.text_to_text_generate`); the decoder samples the
response. The returned `Generation` has the GPT layout the evaluator reads: the left-padded prompt (without the
prefix) followed by the response. Log-probs come from the T5's own decoder, so they are exact; there is no
decoder-only forward pass to recompute them with, so KL to a reference and reward-model scores (GPT-only) are not
asked of this engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from actors.engines import RolloutEngine
from models.generation import Generation, SamplingParams
from models.t5 import T5
from models.t5_generation import text_to_text_generate


class TextToTextEngine(RolloutEngine):
    """Samples responses of a T5 held by this process to token prompts, behind the task prefix `prefix` (ids)."""

    name = "t5"
    exact_logprobs = True

    def __init__(self, model: T5, prefix: Sequence[int]) -> None:
        if not isinstance(model, T5):
            raise TypeError(f"model: the text-to-text engine samples with a T5, got {type(model).__name__}")
        self.model = model.eval().requires_grad_(False)
        self.prefix = list(prefix)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, eos_id: int,
                 seeds: Sequence[int], n: int = 1) -> Generation:
        rows = [list(p) for p in prompts for _ in range(n)]  # row i·n + j = sample j of prompt i
        if len(seeds) != len(rows):
            raise ValueError(f"seeds: expected len(prompts)·n = {len(rows)} seeds, got {len(seeds)}")
        out = text_to_text_generate(self.model, rows, self.prefix, params, eos_id=eos_id,
                                    seeds=[int(s) for s in seeds])
        P = max(len(r) for r in rows)
        prompt_ids = torch.full((len(rows), P), eos_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(rows), P), dtype=torch.long)
        for i, r in enumerate(rows):  # left-padded, as every engine returns prompts
            prompt_ids[i, P - len(r):], prompt_mask[i, P - len(r):] = torch.tensor(r, dtype=torch.long), 1
        response = out.sequences[:, 1:]  # drop decoder_start_token_id
        return Generation(sequences=torch.cat([prompt_ids, response], 1),
                          attention_mask=torch.cat([prompt_mask, out.response_mask], 1), prompt_len=P,
                          response_ids=response, response_mask=out.response_mask, logprobs=out.logprobs)

    def load_weights(self, state: Mapping[str, Any], version: int) -> str:
        raise NotImplementedError("the text-to-text engine evaluates a fixed checkpoint; it takes no weight updates")
