"""What every PPO role shares: loading a checkpoint onto the right device without dropout, the response-token
log-probs of a rollout, sampling a rollout shard, and the weights message that carries a version + checksum.

No math lives here beyond indexing: log-probs come from `models.generation.token_logprobs`, sampling from
`models.generation.generate`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from actors.rollout import Rollout
from models.checkpoint import Kind, load_checkpoint
from models.generation import Generation, SamplingParams, generate, tempered_logprobs, tempered_logprobs_and_entropy
from models.gpt import GPT


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off everywhere: PPO's ratio π_θ/π_old must be exactly 1 before the first step, and the reference
    and value passes must be deterministic (TRL's PPO disables dropout for the same reason)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "attn_pdrop"):
            m.attn_pdrop = 0.0
    return model


def load_model(path: str, kind: Kind) -> nn.Module:
    """A checkpoint directory as `kind`, dropout off, on this worker's device."""
    return disable_dropout(load_checkpoint(path, kind=kind)).to(device())


def response_logits(model: nn.Module, rollout: Rollout) -> Tensor:
    """(B, T, V) logits that predict response tokens: position P-1+t of the full sequence predicts a_t.

    The unembedding runs on those T positions only, not on all P+T: for small models the vocabulary projection is
    the largest matmul, and PPO never needs the prompt's next-token distributions. `model` is a GPT or a DeepSpeed
    engine wrapping one (its submodules are called directly; ZeRO's parameter hooks sit on the submodules)."""
    dev = device()
    lm = getattr(model, "module", model)
    hidden = lm.transformer(rollout.input_ids.to(dev), rollout.attention_mask.to(dev))  # (B, P+T, C)
    return lm.lm_head(hidden[:, rollout.prompt_len - 1:-1])


def response_logprobs(logits: Tensor, rollout: Rollout, temperature: float) -> Tensor:
    """(B, T) log softmax(logits / T)[a_t]; padding positions are zeroed."""
    return _zero_padding(tempered_logprobs(logits, rollout.response_ids.to(logits.device), temperature), rollout)


def response_logprobs_and_entropy(logits: Tensor, rollout: Rollout, temperature: float) -> tuple[Tensor, Tensor]:
    """`response_logprobs` and the (B, T) entropy of the same distribution, in one pass over the vocabulary."""
    lp, entropy = tempered_logprobs_and_entropy(logits, rollout.response_ids.to(logits.device), temperature)
    return _zero_padding(lp, rollout), entropy


def _zero_padding(lp: Tensor, rollout: Rollout) -> Tensor:
    return torch.where(rollout.action_mask.to(lp.device).bool(), lp, torch.zeros_like(lp))


def weights_checksum(state: dict[str, Tensor] | dict[str, np.ndarray]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor in name order: equal iff the weights are."""
    h = hashlib.sha256()
    for name in sorted(state):
        a = state[name]
        arr = a.detach().cpu().contiguous().numpy() if isinstance(a, Tensor) else np.ascontiguousarray(a)
        h.update(f"{name}|{arr.dtype}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


@dataclass
class WeightsMessage:
    """The policy's weights after `version` updates, as NumPy arrays (zero-copy out of the object store)."""

    version: int
    checksum: str
    state: dict[str, np.ndarray]


def sample_rollout(model: GPT, prompts: Sequence[Sequence[int]], row_index: Sequence[int], seeds: Sequence[int],
                   sampling: SamplingParams, eos_id: int, version: int, checksum: str, n: int = 1) -> Rollout:
    """Sample `n` responses per prompt with per-row seeds (a row's sample depends only on its seed and the weights,
    not on its batch-mates, shard or prefix sharing) and record them as a Rollout: rows i·n .. i·n + n − 1 are
    prompt i's group (the layout of the group estimators, models/advantages.py), and the sampler prefills each
    prompt once for its n samples. row_index and seeds have one entry per row (len(prompts)·n)."""
    if not (len(prompts) * n == len(row_index) == len(seeds)) or n < 1:
        raise ValueError(f"prompts/row_index/seeds: {len(prompts)} prompts × n={n} samples need as many row "
                         f"indices and seeds, got {len(row_index)}/{len(seeds)}")
    gen = generate(model, [list(p) for p in prompts], sampling, eos_id=eos_id, seeds=[int(s) for s in seeds],
                   pad_id=eos_id, n=n)
    return rollout_from_generation(gen, row_index, version, checksum)


def rollout_from_generation(gen: Generation, row_index: Sequence[int], version: int, checksum: str,
                            engine: str = "native", exact_logprobs: bool = True) -> Rollout:
    """A sampler's output (any rollout engine) as a Rollout. `exact_logprobs=False` (vLLM) tells the policy to
    recompute the old log-probs with its own forward pass before it updates (and to log the gap)."""
    mask = gen.response_mask.long()
    return Rollout(
        prompt_ids=gen.sequences[:, :gen.prompt_len].long(),
        prompt_mask=gen.attention_mask[:, :gen.prompt_len].long(),
        response_ids=gen.response_ids.long(),
        action_mask=mask,
        old_logprobs=torch.where(mask.bool(), gen.logprobs.float(), torch.zeros_like(gen.logprobs.float())),
        row_index=torch.as_tensor(list(row_index), dtype=torch.long),
        weight_version=version,
        weight_checksum=checksum,
        engine=engine,
        exact_logprobs=exact_logprobs,
    ).validate()


@dataclass(frozen=True)
class RolloutMeta:
    """What the controller needs to know about a generated shard without fetching it."""

    rows: int
    weight_version: int
    weight_checksum: str
    nbytes: int


@dataclass(frozen=True)
class ScoreMeta:
    """The small half of a scoring call's result (the tensor stays in the object store): the controller waits on
    it, so a dead scorer surfaces here without moving the scores through the controller."""

    rows: int
    mean: float
    components: dict[str, float] = field(default_factory=dict)  # reward role: mean of each reward component


def score_meta(scores: Tensor, mask: Tensor | None = None) -> ScoreMeta:
    """Rows and mean of (B,) scores or (B, T) per-token values (over `mask`)."""
    if mask is None:
        return ScoreMeta(int(scores.shape[0]), float(scores.float().mean()))
    m = mask.bool()
    return ScoreMeta(int(scores.shape[0]), float(scores[m].float().mean()) if bool(m.any()) else 0.0)


def meta_of(rollout: Rollout) -> RolloutMeta:
    return RolloutMeta(rollout.batch_size, rollout.weight_version, rollout.weight_checksum, rollout.nbytes())
