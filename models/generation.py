"""Sampling: greedy, temperature, top-k, top-p, EOS stop, left-padded prompts, per-row seeds (a row's sample does
not depend on what else is in the batch), per-token log-probs for PPO.

`generate` decodes with continuous batching (`models.batching`: finished rows leave the batch, waiting prompts take
their KV-cache slots, a prompt's prefill is shared by its n samples); `stream` is the static-batch step-by-step
sampler the server streams from. Both draw row i's step-t token with the counter-based uniform U(seed_i, t)
(`models.rng`), so the same seed gives the same tokens in either, in any batch.

The sampling parameters, the temperature rule and the draw of one token live in `models.sampling` (re-exported
here, where callers look for them).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from models.batching import decode
from models.gpt import GPT
from models.packed import available, packed_twin
from models.sampling import (
    SamplingParams,
    Seeds,
    filter_logits,
    left_pad,
    row_seeds,
    sample_next,
    tempered,
    tempered_logprobs,
    tempered_logprobs_and_entropy,
    token_logprobs,
    token_logprobs_and_entropy,
)

__all__ = ["Generation", "SamplingParams", "Seeds", "filter_logits", "generate", "left_pad", "row_seeds",
           "sample_next", "stream", "tempered", "tempered_logprobs", "tempered_logprobs_and_entropy",
           "token_logprobs", "token_logprobs_and_entropy"]


@dataclass
class Generation:
    """Result of `generate`. P = padded prompt length, N = generated steps (≤ max_new_tokens)."""

    sequences: Tensor  # (B, P+N) left-padded prompt followed by the response (pad after EOS)
    attention_mask: Tensor  # (B, P+N) 1 = real token (prompt tokens and response tokens up to and incl. EOS)
    prompt_len: int  # P
    response_ids: Tensor  # (B, N)
    response_mask: Tensor  # (B, N) 1 for generated tokens up to and including EOS
    logprobs: Tensor  # (B, N) log π(token) under softmax(logits / T); 0 where response_mask is 0


@torch.no_grad()
def stream(model: GPT, input_ids: Tensor, attention_mask: Tensor, params: SamplingParams, *,
           eos_id: int | None = None, seeds: Seeds = None, packed: bool | None = None
           ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield (tokens (B,), logprobs (B,), active (B,) bool) once per decoding step.

    `active[i]` is False for rows that had already finished before this step (their token is padding).
    Stops when every row has emitted EOS or after max_new_tokens. `packed`: oneDNN-packed weights for the
    matmuls (`models.packed`; None = whenever available). Logits are computed for the last position only.
    """
    B, P = input_ids.shape
    n_ctx = model.config.n_ctx
    if P > n_ctx:
        raise ValueError(f"prompt: {P} tokens is longer than the model context n_ctx={n_ctx}")
    if P + params.max_new_tokens > n_ctx:
        raise ValueError(
            f"max_new_tokens: prompt ({P}) + max_new_tokens ({params.max_new_tokens}) exceeds n_ctx={n_ctx}"
        )
    device = model.lm_head.weight.device
    row_seed = row_seeds(seeds, B, device)
    cache = model.new_cache(B, P + params.max_new_tokens)
    mask = torch.zeros((B, P + params.max_new_tokens), dtype=torch.long, device=device)
    mask[:, :P] = attention_mask.to(device)
    net = packed_twin(model) if (packed if packed is not None else available(model)) else model
    logits = net.lm_head(net.transformer(input_ids.to(device), mask[:, :P], cache=cache)[:, -1])
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    pad = eos_id if eos_id is not None else 0
    for t in range(params.max_new_tokens):
        tokens, logprobs = sample_next(logits, params, row_seed, t)
        active = ~finished
        tokens = torch.where(active, tokens, torch.full_like(tokens, pad))
        yield tokens, torch.where(active, logprobs, torch.zeros_like(logprobs)), active
        if eos_id is not None:
            finished = finished | (tokens == eos_id)
        if bool(finished.all()) or t == params.max_new_tokens - 1:
            return
        mask[:, P + t] = active.long()
        logits = net.lm_head(net.transformer(tokens[:, None], mask[:, :P + t + 1], cache=cache)[:, -1])


@torch.no_grad()
def generate(model: GPT, prompts: Sequence[Sequence[int]] | Tensor, params: SamplingParams, *,
             eos_id: int | None = None, seeds: Seeds = None, attention_mask: Tensor | None = None,
             pad_id: int | None = None, n: int = 1, max_rows: int | None = None,
             packed: bool | None = None, compile: bool = False) -> Generation:
    """Sample n continuations of each prompt (token lists, or already left-padded ids + mask): len(prompts)·n
    rows, row i·n + j = sample j of prompt i. Rows stop at `eos_id` (None: run max_new_tokens); `seeds` give
    every row its own draws (see `Seeds`; an int s seeds row r with s + r).

    Decoding is `models.batching.decode`: continuous batching over at most `max_rows` slots (None: every row at
    once), each prompt prefilled once for its n samples. A row's tokens do not depend on `max_rows`, `n`-sharing
    or its batch-mates (same seeds, same tokens). `packed`: oneDNN-packed weights for the matmuls (None = on CPU);
    `compile`: torch.compile the decode step (see `models.batching.decode`)."""
    pad = pad_id if pad_id is not None else (eos_id or 0)
    if isinstance(prompts, Tensor):
        ids = prompts
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        lists = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    else:
        ids, mask = left_pad(prompts, pad)
        lists = [list(p) for p in prompts]
    if not lists:
        raise ValueError("prompts: empty batch")
    rows = len(lists) * n
    out = decode(model, lists, params, seeds=row_seeds(seeds, rows, model.lm_head.weight.device), eos_id=eos_id,
                 n=n, max_rows=max_rows, pad_id=pad, packed=packed,
                 compile=compile)
    N = int(out.lengths.max())
    response_mask = (torch.arange(N) < out.lengths[:, None]).long()
    if n > 1:
        ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    response = out.tokens[:, :N]
    return Generation(
        sequences=torch.cat([ids, response], 1),
        attention_mask=torch.cat([mask, response_mask], 1),
        prompt_len=ids.size(1),
        response_ids=response,
        response_mask=response_mask,
        logprobs=out.logprobs[:, :N],
    )
