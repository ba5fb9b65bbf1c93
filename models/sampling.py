"""What a sampler draws and how: the one sampling-parameters type, the temperature rule, top-k/top-p filtering,
per-row seeds and the draw of the next token (used by `models.generation` and `models.batching`).

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

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

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
