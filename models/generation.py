"""Sampling: greedy, temperature, top-k, top-p, EOS stop, left-padded prompts, per-row seeds (a row's sample does
not depend on what else is in the batch), per-token log-probs for PPO.

`generate` decodes with continuous batching (`models.batching`: finished rows leave the batch, waiting prompts take
their KV-cache slots, a prompt's prefill is shared by its n samples); `stream` is the static-batch step-by-step
sampler the server streams from. Both draw row i's step-t token with the counter-based uniform U(seed_i, t)
(`models.rng`), so the same seed gives the same tokens in either, in any batch.

`SamplingParams` is the one sampling-parameters type of the project: job configs embed it as their `sampling`
section, the RLHF actors, evaluation and the server pass it here. Which token ends a row (`eos_id`) and the
per-row seeds are arguments of the call, not parameters of the distribution.

Log-probs are those of the *temperature-scaled, unfiltered* distribution, log softmax(`tempered(logits, T)`)
[token] (top-k/top-p only restrict what is sampled). This is the distribution PPO's policy ratio is taken under, as
in TRL/OpenRLHF, so old log-probs and the PPO update agree. Greedy (temperature 0) reports log softmax(logits).
`tempered` is the one place the temperature rule lives: the sampler, the policy update, the reference, serving and
evaluation all call it (a ratio is only right while they agree).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from models.gpt import GPT
from models.packed import available, packed_twin
from models.rng import sample_categorical, uniform


@dataclass(frozen=True)
class SamplingParams:
    """How responses are sampled. Field help doubles as the `sampling` section's `--help` of every job."""

    max_new_tokens: int = field(default=24, metadata={"help": "response length cap in tokens (a response also "
                                                               "ends at EOS)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature (0 = greedy)"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens (0 = off)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1 = off)"})

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k: must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")


Seeds = int | Sequence[int] | None  # one seed for the batch (row i uses seed + i), one per row, or None


def tempered(logits: Tensor, temperature: float) -> Tensor:
    """logits / T for T > 0; greedy (T = 0) keeps the logits as they are. The one temperature rule.
    (T = 1 skips the division: x / 1 == x exactly, and a (B, V) pass per decoding step is not free.)"""
    return logits / temperature if temperature > 0 and temperature != 1 else logits


def tempered_logprobs(logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    """log softmax(tempered(logits, T))[tokens]: logits (..., V), tokens (...) → (...), fp32."""
    return token_logprobs(tempered(logits, temperature), tokens)


@dataclass
class Generation:
    """Result of `generate`. P = padded prompt length, N = generated steps (≤ max_new_tokens)."""

    sequences: Tensor  # (B, P+N) left-padded prompt followed by the response (pad after EOS)
    attention_mask: Tensor  # (B, P+N) 1 = real token (prompt tokens and response tokens up to and incl. EOS)
    prompt_len: int  # P
    response_ids: Tensor  # (B, N)
    response_mask: Tensor  # (B, N) 1 for generated tokens up to and including EOS
    logprobs: Tensor  # (B, N) log π(token) under softmax(logits / T); 0 where response_mask is 0


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token lists → (ids (B, P), mask (B, P)) padded on the left, so the next token of every row is at -1."""
    if not prompts:
        raise ValueError("prompts: empty batch")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}]: empty prompt (encode at least one token, e.g. <|endoftext|>)")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[targets]: logits (..., V), targets (...) → (...). Computed in fp32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus of mass top_p (Holtzman et al. 2020).
    The most likely token is always kept."""
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token if the mass strictly before it already reaches top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def row_seeds(seeds: Seeds, batch: int, device: torch.device | str = "cpu") -> Tensor:
    """(batch,) int64 seeds, one per row: `seeds + i` for an int, the given list, or — for None — a base drawn
    from torch's global RNG (so `torch.manual_seed` still makes an unseeded call reproducible). Python ints of
    any size are reduced to their low 64 bits."""
    if seeds is None:
        return torch.randint(0, 2**62, (1,)).to(device) + torch.arange(batch, device=device)
    values = [seeds + i for i in range(batch)] if isinstance(seeds, int) else [int(s) for s in seeds]
    if len(values) != batch:
        raise ValueError(f"seeds: got {len(values)} seeds for a batch of {batch}")
    return torch.tensor([(v + 2**63) % 2**64 - 2**63 for v in values], dtype=torch.long, device=device)


def sample_next(logits: Tensor, params: SamplingParams, seeds: Tensor, steps: Tensor | int) -> tuple[Tensor, Tensor]:
    """logits (B, V) of the next position → (tokens (B,), logprobs (B,)).

    Row i draws with the counter-based uniform U(seeds[i], steps[i]) (`models.rng`): its token depends on its own
    seed, step and logits only. Greedy (T = 0) takes the argmax and reports log softmax(logits)."""
    logits = logits.float()
    scaled = tempered(logits, params.temperature)
    logp = F.log_softmax(scaled, -1)
    if params.temperature == 0:
        tokens = logits.argmax(-1)
    else:
        tokens = sample_categorical(scaled, uniform(seeds, steps), params.top_k, params.top_p)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


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
    from models.batching import decode  # batching builds on this module's sampler

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
