"""Batched sampling with a pre-allocated KV cache: greedy, temperature, top-k, top-p, EOS stop, left padding,
per-row seeds (a row's sample does not depend on what else is in the batch), per-token log-probs for PPO.

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
    """logits / T for T > 0; greedy (T = 0) keeps the logits as they are. The one temperature rule."""
    return logits / temperature if temperature > 0 else logits


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


def _generators(seed: Seeds, batch: int) -> list[torch.Generator] | None:
    if seed is None:
        return None
    seeds = [seed + i for i in range(batch)] if isinstance(seed, int) else list(seed)
    if len(seeds) != batch:
        raise ValueError(f"seed: got {len(seeds)} seeds for a batch of {batch}")
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def sample_next(logits: Tensor, params: SamplingParams, gens: list[torch.Generator] | None) -> tuple[Tensor, Tensor]:
    """logits (B, V) of the next position → (tokens (B,), logprobs (B,))."""
    logits = logits.float()
    if params.temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, F.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    scaled = tempered(logits, params.temperature)
    probs = filter_logits(scaled, params.top_k, params.top_p).softmax(-1)
    if gens is None:
        tokens = torch.multinomial(probs, 1).squeeze(-1)
    else:  # one generator per row: a row's draw is independent of its batch-mates
        tokens = torch.cat([torch.multinomial(probs[i].cpu(), 1, generator=g) for i, g in enumerate(gens)])
        tokens = tokens.to(logits.device)
    return tokens, F.log_softmax(scaled, -1).gather(-1, tokens[:, None]).squeeze(-1)


@torch.no_grad()
def stream(model: GPT, input_ids: Tensor, attention_mask: Tensor, params: SamplingParams, *,
           eos_id: int | None = None, seeds: Seeds = None) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield (tokens (B,), logprobs (B,), active (B,) bool) once per decoding step.

    `active[i]` is False for rows that had already finished before this step (their token is padding).
    Stops when every row has emitted EOS or after max_new_tokens.
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
    gens = _generators(seeds, B)
    cache = model.new_cache(B, P + params.max_new_tokens)
    mask = torch.zeros((B, P + params.max_new_tokens), dtype=torch.long, device=device)
    mask[:, :P] = attention_mask.to(device)
    logits = model(input_ids.to(device), mask[:, :P], cache=cache)[:, -1]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    pad = eos_id if eos_id is not None else 0
    for t in range(params.max_new_tokens):
        tokens, logprobs = sample_next(logits, params, gens)
        active = ~finished
        tokens = torch.where(active, tokens, torch.full_like(tokens, pad))
        yield tokens, torch.where(active, logprobs, torch.zeros_like(logprobs)), active
        if eos_id is not None:
            finished = finished | (tokens == eos_id)
        if bool(finished.all()) or t == params.max_new_tokens - 1:
            return
        mask[:, P + t] = active.long()
        logits = model(tokens[:, None], mask[:, :P + t + 1], cache=cache)[:, -1]


@torch.no_grad()
def generate(model: GPT, prompts: Sequence[Sequence[int]] | Tensor, params: SamplingParams, *,
             eos_id: int | None = None, seeds: Seeds = None, attention_mask: Tensor | None = None,
             pad_id: int | None = None) -> Generation:
    """Sample continuations for a batch of prompts (token lists, or already left-padded ids + mask). Rows stop
    at `eos_id` (None: run max_new_tokens); `seeds` make each row's draws its own (see `Seeds`)."""
    pad = pad_id if pad_id is not None else (eos_id or 0)
    if isinstance(prompts, Tensor):
        ids = prompts
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
    else:
        ids, mask = left_pad(prompts, pad)
    steps = list(stream(model, ids, mask, params, eos_id=eos_id, seeds=seeds))
    response = torch.stack([s[0] for s in steps], 1).cpu()
    logprobs = torch.stack([s[1] for s in steps], 1).cpu()
    response_mask = torch.stack([s[2] for s in steps], 1).long().cpu()
    return Generation(
        sequences=torch.cat([ids, response], 1),
        attention_mask=torch.cat([mask, response_mask], 1),
        prompt_len=ids.size(1),
        response_ids=response,
        response_mask=response_mask,
        logprobs=logprobs,
    )
