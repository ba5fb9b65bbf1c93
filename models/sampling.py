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
from typing import Any

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


def tempered_logprobs_and_entropy(logits: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """`tempered_logprobs` and the entropy (nats) of the same tempered distribution, from one pass over the
    vocabulary: logits (..., V), tokens (...) → ((...), (...)), fp32."""
    return token_logprobs_and_entropy(tempered(logits, temperature), tokens)


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
    return log_softmax_at(logits.float(), targets)[0]


def token_logprobs_and_entropy(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """`token_logprobs` and the entropy of softmax(logits), fp32, in one pass over the vocabulary."""
    return log_softmax_at(logits.float(), targets, entropy=True)


def log_softmax_at(z: Tensor, targets: Tensor, entropy: bool = False) -> tuple[Tensor, Tensor]:
    """(log softmax(z)[targets], H(softmax(z)) or an empty tensor): z (..., V), targets (...) → ((...), (...)) in
    z's dtype. H = logsumexp(z) − Σ softmax(z)·z (no log 0 for tokens of vanishing probability). Both are
    differentiable. The one place of both formulas (`models.losses.entropy_from_logits` is H alone)."""
    logp, h = _LogSoftmaxAt.apply(z, targets, entropy)
    return logp, h


class _LogSoftmaxAt(torch.autograd.Function):
    """log softmax(z)[a] (and, if asked, the entropy of softmax(z)) from one exp pass over the vocabulary.

    Why not `F.log_softmax(z).gather(a)`: its autograd writes a (..., V) log-prob tensor, a zero-filled (..., V)
    gather gradient and a (..., V) log-softmax gradient, and an entropy beside it two more (..., V) passes — for a
    small model those vocabulary-wide passes were ~20% of a PPO step (docs/BENCHMARKS.md). Here: e = exp(z − m) once
    (saved for the backward, as log_softmax saves its output), log p_a = z_a − m − log Σe,
    ∂ log p_a/∂z = onehot(a) − p and ∂H/∂z = −p ⊙ (z − Σ p·z), with p = e / Σe. The same formula as torch's
    log_softmax kernel, up to the order of the sum.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, targets: Tensor, entropy: bool) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)  # an unused output costs nothing in the backward
        m = z.amax(-1, keepdim=True)
        e = (z - m).exp_()
        total = e.sum(-1, keepdim=True)
        log_total = total.log()
        logp = (z.gather(-1, targets.unsqueeze(-1)) - m - log_total).squeeze(-1)
        if entropy:  # H = m + log Σe − Σ e·z / Σe; the dot product as a batched matmul: no (..., V) temporary
            mean_z = (e.unsqueeze(-2) @ z.unsqueeze(-1)).squeeze(-1) / total  # Σ p·z, (..., 1)
            h = (m + log_total - mean_z).squeeze(-1)
            # z itself is not kept (a second (..., V) tensor for every step, wanted or not): the backward rebuilds
            # p ⊙ (z − Σ p·z) from e, as (e·log e + e·(m − Σ p·z)) / Σe, since z = log e + m.
            ctx.save_for_backward(e, total, targets, m - mean_z)
        else:
            h = logp.new_empty(0)
            ctx.mark_non_differentiable(h)
            ctx.save_for_backward(e, total, targets)
        return logp, h

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor | None, grad_h: Tensor | None) -> tuple[Tensor | None, None, None]:
        e, total, targets, *rest = ctx.saved_tensors
        if grad_logp is None and (grad_h is None or not rest):
            return None, None, None
        dz = None
        if grad_logp is not None:
            g = grad_logp.unsqueeze(-1)
            dz = e * (-g / total)  # −g · p in one pass over (..., V)
            dz.scatter_add_(-1, targets.unsqueeze(-1), g)  # + g at the taken token
        if grad_h is not None and rest:
            (shift,) = rest  # m − Σ p·z, (..., 1)
            # −g_H · p ⊙ (z − Σ p·z); xlogy: e·log e = 0 where e underflowed to 0
            dh = torch.special.xlogy(e, e).add_(e * shift).mul_(-grad_h.unsqueeze(-1) / total)
            dz = dh if dz is None else dz.add_(dh)
        return dz, None, None


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
