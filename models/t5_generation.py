"""Greedy and sampled decoding for T5 with an encoder-decoder KV cache.

The encoder runs once; each decoder layer projects the encoder states to cross-attention keys/values once (first
step) and appends one self-attention key/value per step (`models.t5.T5Cache`), so step t costs O(t + S) instead
of re-running the decoder over the whole prefix. Sampling (temperature, top-k, top-p, per-row seeds, log-probs)
is `models.generation.sample_next`, the project's one sampling rule (counter-based per-row draws: row i's token at
step t depends only on its seed, t and its logits). Rows stop at EOS; later steps are padding.
`text_to_text_generate` answers token sources in the fine-tuned text-to-text format (task prefix + source + EOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from models.generation import SamplingParams, Seeds, row_seeds, sample_next
from models.span_corruption import right_pad, text_to_text_input
from models.t5 import T5


@dataclass
class Seq2SeqGeneration:
    """Result of `t5_generate`. N = generated steps (≤ max_new_tokens)."""

    sequences: Tensor  # (B, 1+N) decoder_start_token_id followed by the generated tokens (pad after EOS)
    response_mask: Tensor  # (B, N) 1 for generated tokens up to and including EOS
    logprobs: Tensor  # (B, N) log π(token) under the tempered distribution; 0 where response_mask is 0


@torch.no_grad()
def t5_generate(model: T5, input_ids: Tensor, attention_mask: Tensor | None, params: SamplingParams, *,
                eos_id: int | None = None, seeds: Seeds = None) -> Seq2SeqGeneration:
    """Decode continuations of the encoder inputs `input_ids` (B, S) (right- or left-padded, `attention_mask`
    (B, S) 1 = real). `eos_id` defaults to the config's; temperature 0 is greedy. `seeds`: one for the batch
    (row i uses seed + i) or one per row, so a row's sample does not depend on its batch-mates."""
    cfg = model.config
    eos = cfg.eos_token_id if eos_id is None else eos_id
    device = model.lm_head.weight.device
    B = input_ids.shape[0]
    input_ids = input_ids.to(device)
    mask = attention_mask.to(device) if attention_mask is not None else None
    enc = model.encode(input_ids, mask)
    cache = model.new_cache(B, params.max_new_tokens)
    row_seed = row_seeds(seeds, B, device)
    step = torch.full((B, 1), cfg.decoder_start_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    tokens_out, logp_out, active_out = [], [], []
    for t in range(params.max_new_tokens):
        logits = model.decode(step, enc, mask, cache=cache)[:, -1]
        tokens, logprobs = sample_next(logits, params, row_seed, t)
        active = ~finished
        tokens = torch.where(active, tokens, torch.full_like(tokens, cfg.pad_token_id))
        tokens_out.append(tokens)
        logp_out.append(torch.where(active, logprobs, torch.zeros_like(logprobs)))
        active_out.append(active)
        finished = finished | (tokens == eos)
        if bool(finished.all()):
            break
        step = tokens[:, None]
    start = torch.full((B, 1), cfg.decoder_start_token_id, dtype=torch.long)
    return Seq2SeqGeneration(
        sequences=torch.cat([start, torch.stack(tokens_out, 1).cpu()], 1),
        response_mask=torch.stack(active_out, 1).long().cpu(),
        logprobs=torch.stack(logp_out, 1).cpu(),
    )


def text_to_text_generate(model: T5, sources: Sequence[Sequence[int]], prefix: Sequence[int], params: SamplingParams,
                          *, eos_id: int | None = None, seeds: Seeds = None,
                          max_input_len: int | None = None) -> Seq2SeqGeneration:
    """Responses of a text-to-text T5 (§2.4) to token `sources`: the encoder reads task prefix + source + EOS
    (`models.span_corruption.text_to_text_input`, the rule the fine-tuning batches use), right-padded; the decoder
    samples from `decoder_start_token_id`. Row i is seeded like `t5_generate`'s."""
    if not sources:
        raise ValueError("sources: empty batch")
    cfg = model.config
    eos = cfg.eos_token_id if eos_id is None else eos_id
    rows = [torch.tensor(text_to_text_input(s, prefix, eos, max_input_len), dtype=torch.long) for s in sources]
    ids, mask = right_pad(rows, cfg.pad_token_id)
    return t5_generate(model, ids, mask, params, eos_id=eos, seeds=seeds)
