"""The experience record of PPO: one `Rollout` per data-parallel shard, passed between actors as ObjectRefs.

Shapes: B = rows (responses) in this shard, P = padded prompt length (left padding), T = padded response length
(right padding). A row's full sequence is `cat(prompt_ids, response_ids)` with mask `cat(prompt_mask,
action_mask)`, so the model input of row b is (B, P+T) and the log-prob of response token t comes from the logits
at position P-1+t. Pad tokens are the EOS id; masks say what is real.

Life of a rollout (jobs/ppo.py):
  generate  → prompt_ids, prompt_mask, response_ids, action_mask, old_logprobs, row_index, weight_version/checksum
  score     → ref_logprobs (reference), scores (reward), values (value) — computed in parallel, each returned as
              its own small object, never written back into the shared rollout object
  finalize  → kl, rewards, advantages, returns (`finalize`, the estimator named by the algorithm in
              models/advantages.py: GAE, GRPO, RLOO, REINFORCE++), over the WHOLE batch
              (whitening statistics must not depend on how the batch was sharded), then split per trainer rank
  update    → each policy/value rank receives only its shard: slicing happens before `ray.put`, as in OpenRLHF.

Object-store transfer: tensors are stored as NumPy arrays when pickled (`__reduce__`), which Ray's object store
reads back zero-copy, instead of torch's pickled tensor bytes (~3× slower on both ends; docs/ARCHITECTURE.md).
A rollout read from the store is not copied: its fields are `ReadOnlyTensor`s over the store's shared memory,
which every reader of the object maps. Reading ops give ordinary tensors (or, for views, read-only ones); an
in-place write raises, so a consumer that needs to write takes a copy first (`.clone()`) — the shared bytes can
never change under another reader.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.advantages import AdvantageInputs, compute_advantages, kl_k1, kl_penalty, whiten
from models.masked import masked_mean, masked_var

TENSOR_FIELDS = ("prompt_ids", "prompt_mask", "response_ids", "action_mask", "old_logprobs", "row_index",
                 "ref_logprobs", "scores", "values", "kl", "rewards", "advantages", "returns")


class RolloutError(ValueError):
    """A rollout is malformed (shape/dtype mismatch, stale weights, …); the message names the field."""


# In-place methods that change flags, not bytes: allowed on shared memory.
_FLAG_METHODS = frozenset({"requires_grad_", "retain_grad", "share_memory_"})
_INPLACE_OPERATORS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                                "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__",
                                "__irshift__", "__imatmul__"})


class ReadOnlyTensor(torch.Tensor):
    """A tensor over memory nobody may write: an array of a Ray object, mapped from the object store's shared memory
    (every process that reads the object sees these same bytes; torch has no read-only flag of its own).

    Any in-place op on it (`add_`, `x[i] = …`, `+=`, `out=`) raises RolloutError; ops that read return ordinary
    tensors in new memory, except views of it (`x[0]`, `x.view(…)`, a no-op `.to`), which stay read-only; `.numpy()`
    gives a read-only array. Copy (`.clone()`) to write. The check is a Python hook per torch call (~µs): rollouts
    go through a few hundred calls per update, not per element."""

    @classmethod
    def __torch_function__(cls, func: Callable[..., Any], types: Any, args: Sequence[Any] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        targets = kwargs.get("out")
        if targets is None and args and (name in _INPLACE_OPERATORS or
                                         (name.endswith("_") and not name.startswith("_") and
                                          name not in _FLAG_METHODS)):
            targets = args[0]
        for t in targets if isinstance(targets, (tuple, list)) else (targets,):
            if isinstance(t, ReadOnlyTensor):
                raise RolloutError(f"{name}: writes into a rollout tensor that lives in the object store's shared "
                                   f"memory (read-only; take a .clone() to write)")
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
            shared = {_storage(a) for a in (*args, *kwargs.values()) if isinstance(a, ReadOnlyTensor)}
            return _keep_read_only(out, shared - {None})


def _storage(t: Tensor) -> int | None:
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, sparse)
        return None


def _keep_read_only(out: Any, shared: set[int]) -> Any:
    """Outputs that alias a read-only input (views) stay read-only; everything else is returned as it is."""
    if isinstance(out, Tensor):
        return out.as_subclass(ReadOnlyTensor) if shared and _storage(out) in shared else out
    if isinstance(out, np.ndarray) and shared and out.base is not None:  # .numpy(): a view of the same memory
        out.flags.writeable = False
        return out
    if isinstance(out, (tuple, list)) and shared:
        return type(out)(_keep_read_only(o, shared) for o in out)
    return out


def read_only(array: np.ndarray) -> ReadOnlyTensor:
    """The array as a tensor over the same memory (no copy), writes refused (see ReadOnlyTensor)."""
    with warnings.catch_warnings():  # torch warns that a non-writable array makes an unsafe tensor: that is
        warnings.simplefilter("ignore", UserWarning)  # what ReadOnlyTensor makes safe
        return torch.from_numpy(array).as_subclass(ReadOnlyTensor)


@dataclass
class Rollout:
    """Experience of one shard. Every field: shape and meaning. Optional fields are filled by later stages."""

    prompt_ids: Tensor  # (B, P) long: prompt tokens, left-padded with the pad (EOS) id
    prompt_mask: Tensor  # (B, P) long: 1 = real prompt token, 0 = left padding
    response_ids: Tensor  # (B, T) long: sampled response tokens a_0..a_{T-1}, right-padded after EOS
    action_mask: Tensor  # (B, T) long: 1 = a generated token (up to and incl. EOS) = an action PPO trains on
    old_logprobs: Tensor  # (B, T) float32: log π_old(a_t|s_t) under softmax(logits/temperature) at sampling; 0 pad
    row_index: Tensor  # (B,) long: position of each row in the iteration's global batch (seeds, reassembly order)
    weight_version: int = 0  # policy version the responses were sampled with (number of updates applied)
    weight_checksum: str = ""  # SHA-256 of the sampling weights; the controller refuses a mismatch
    engine: str = "native"  # the rollout engine that sampled (actors/engines)
    exact_logprobs: bool = True  # old_logprobs are the trainer's own; False (vLLM): the policy recomputes them
    ref_logprobs: Tensor | None = None  # (B, T) float32: log π_ref(a_t|s_t), frozen SFT reference, same temperature
    scores: Tensor | None = None  # (B,) float32: sequence reward r(x, y) of the RM (or user function)
    values: Tensor | None = None  # (B, T) float32: critic V(s_t) at rollout time (the "old" values)
    kl: Tensor | None = None  # (B, T) float32: per-token KL estimate used in the reward (estimator per config)
    rewards: Tensor | None = None  # (B, T) float32: −β·kl_t, plus scores on the last real token
    advantages: Tensor | None = None  # (B, T) float32: GAE advantages (whitened if configured), 0 at padding
    returns: Tensor | None = None  # (B, T) float32: value targets A_t + V_t, 0 at padding

    # --- derived views ----------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def prompt_len(self) -> int:
        return int(self.prompt_ids.shape[1])

    @property
    def input_ids(self) -> Tensor:
        """(B, P+T) prompt then response: the model input for every scoring/training forward pass."""
        return torch.cat([self.prompt_ids, self.response_ids], 1)

    @property
    def attention_mask(self) -> Tensor:
        """(B, P+T) 1 = real token (prompt or generated)."""
        return torch.cat([self.prompt_mask, self.action_mask], 1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    # --- checks -----------------------------------------------------------------------------------------------
    def validate(self) -> Rollout:
        """Raise RolloutError naming the first field whose shape disagrees with (B, P) / (B, T) / (B,)."""
        b, p = self.prompt_ids.shape if self.prompt_ids.dim() == 2 else (-1, -1)
        if b < 1:
            raise RolloutError(f"prompt_ids: expected shape (B, P) with B >= 1, got {tuple(self.prompt_ids.shape)}")
        t = self.response_ids.shape[1] if self.response_ids.dim() == 2 else -1
        expected = {"prompt_mask": (b, p), "response_ids": (b, t), "action_mask": (b, t), "old_logprobs": (b, t),
                    "row_index": (b,), "ref_logprobs": (b, t), "scores": (b,), "values": (b, t), "kl": (b, t),
                    "rewards": (b, t), "advantages": (b, t), "returns": (b, t)}
        for name, shape in expected.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise RolloutError(f"{name}: expected shape {shape} (B={b}, P={p}, T={t}), got {tuple(value.shape)}")
        if bool((self.action_mask.sum(1) == 0).any()):
            row = int((self.action_mask.sum(1) == 0).nonzero()[0])
            raise RolloutError(f"action_mask: row {row} has an empty response")
        return self

    # --- slicing ----------------------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, Tensor]:
        return {f: getattr(self, f) for f in TENSOR_FIELDS if getattr(self, f) is not None}

    def replace(self, **fields: Any) -> Rollout:
        return dataclasses.replace(self, **fields)

    def select(self, rows: Tensor | Sequence[int]) -> Rollout:
        """The rows `rows` (a new Rollout; padding widths unchanged)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        return self.replace(**{k: v.index_select(0, idx) for k, v in self._tensors().items()})

    def split(self, n: int) -> list[Rollout]:
        """`n` contiguous near-equal shards (the first B mod n get one more row). Raises if B < n."""
        if not 1 <= n <= self.batch_size:
            raise RolloutError(f"split: cannot cut {self.batch_size} rows into {n} non-empty shards")
        bounds = [i * self.batch_size // n for i in range(n + 1)]
        return [self.select(range(bounds[i], bounds[i + 1])) for i in range(n)]

    @staticmethod
    def concat(parts: Sequence[Rollout]) -> Rollout:
        """Concatenate shards (in the given order), re-padding prompts on the left and responses on the right to
        the widest part. All parts must carry the same optional fields and the same weight version."""
        if not parts:
            raise RolloutError("concat: no rollouts")
        first = parts[0]
        have = set(first._tensors())
        for i, r in enumerate(parts):
            if set(r._tensors()) != have:
                raise RolloutError(f"concat: part {i} has fields {sorted(r._tensors())}, part 0 has {sorted(have)}")
            if (r.weight_version, r.weight_checksum) != (first.weight_version, first.weight_checksum):
                raise RolloutError(f"weight_version: part {i} was sampled with version {r.weight_version}, part 0 "
                                   f"with {first.weight_version}")
        p = max(r.prompt_len for r in parts)
        t = max(int(r.response_ids.shape[1]) for r in parts)
        pad_id = int(first.prompt_ids[first.prompt_mask == 0][0]) if bool((first.prompt_mask == 0).any()) else 0
        out: dict[str, Tensor] = {}
        for name in have:
            pieces = []
            for r in parts:
                v = getattr(r, name)
                if name in ("prompt_ids", "prompt_mask"):
                    fill = pad_id if name == "prompt_ids" else 0
                    v = torch.nn.functional.pad(v, (p - v.shape[1], 0), value=fill)
                elif v.dim() == 2:
                    fill = pad_id if name == "response_ids" else 0
                    v = torch.nn.functional.pad(v, (0, t - v.shape[1]), value=fill)
                pieces.append(v)
            out[name] = torch.cat(pieces, 0)
        return first.replace(**out)

    # --- object-store transfer --------------------------------------------------------------------------------
    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        arrays = {k: _to_pieces(v.detach().cpu().numpy()) for k, v in self._tensors().items()}
        return (_rebuild, (arrays, self.weight_version, self.weight_checksum, self.engine, self.exact_logprobs))


# Ray copies each out-of-band buffer over 1 MiB into the store with MEMCOPY_THREADS = 6 threads it spawns for that
# buffer (ray/_raylet serialization.pxi); on a 2-core machine the spawns cost more than the copy: a 25 MB record as
# 12 buffers of 2 MB puts at 4–6 GB/s, as 1 MiB pieces at 13–14 GB/s (docs/BENCHMARKS.md, object store). So a large
# array is pickled as ≤ 1 MiB pieces — views, no copy — and Ray lays consecutive buffers whose sizes are multiples of
# its 64-byte alignment end to end, so the reader sees one contiguous range and views it as the array again.
PIECE_BYTES = 1 << 20


@dataclass(frozen=True)
class _Pieces:
    """A C-contiguous array as consecutive ≤ PIECE_BYTES byte views (each a multiple of 64 bytes but the last)."""

    pieces: tuple[np.ndarray, ...]
    dtype: str
    shape: tuple[int, ...]


def _to_pieces(a: np.ndarray) -> np.ndarray | _Pieces:
    if a.nbytes <= PIECE_BYTES:
        return a
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)  # a view unless `a` was strided
    return _Pieces(tuple(flat[i:i + PIECE_BYTES] for i in range(0, flat.size, PIECE_BYTES)), a.dtype.str, a.shape)


def _from_pieces(p: np.ndarray | _Pieces) -> np.ndarray:
    """The array again: a view over the pieces' memory when they lie end to end (read from the object store), else
    one copy (e.g. pickled in-band, where each piece is its own bytes object)."""
    if isinstance(p, np.ndarray):
        return p
    first, offset, contiguous = p.pieces[0], p.pieces[0].__array_interface__["data"][0], True
    for x in p.pieces:
        contiguous = contiguous and x.__array_interface__["data"][0] == offset
        offset += x.size
    total = sum(x.size for x in p.pieces)
    if contiguous:
        # All pieces are slices of one Ray object, whose memory stays pinned while any of them is referenced; the
        # view's base is `first`, so it keeps that pin.
        flat = np.lib.stride_tricks.as_strided(first, shape=(total,), strides=(1,), writeable=False)
    else:
        flat = np.concatenate(p.pieces)
    return flat.view(np.dtype(p.dtype)).reshape(p.shape)


def _rebuild(arrays: dict[str, np.ndarray | _Pieces], version: int, checksum: str, engine: str = "native",
             exact_logprobs: bool = True) -> Rollout:
    # Arrays from the object store are read-only views of its shared memory: wrapped, not copied (zero-copy read).
    tensors = {k: read_only(_from_pieces(v)) for k, v in arrays.items()}
    return Rollout(**tensors, weight_version=version, weight_checksum=checksum, engine=engine,
                   exact_logprobs=exact_logprobs)


# --- finalize: rewards and advantages over the whole batch -----------------------------------------------------
def finalize(shards: Sequence[Rollout], ref_logprobs: Sequence[Tensor], scores: Sequence[Tensor],
             values: Sequence[Tensor] | None, *, beta: float, kl_estimator: str, gamma: float, lam: float,
             whiten_advantages: bool, splits: Sequence[int], estimator: str = "gae", group_size: int = 1,
             scale: str = "group", kl_in_reward: bool = True) -> tuple[dict[str, float], list[list[Rollout]]]:
    """Assemble the scored batch and compute per-token rewards, advantages and returns with the estimator named
    `estimator` ("gae" | "grpo" | "rloo" | "reinforce_pp"; models/advantages.py `compute_advantages`).

    shards[i] comes with ref_logprobs[i] (B_i, T_i), scores[i] (B_i,) and values[i] (B_i, T_i) (values None for
    the critic-free estimators). The batch is put back in global row order, so the result does not depend on how
    generation was sharded, and rows [g·G, (g+1)·G) are prompt g's group (G = group_size). kl_in_reward: −β·KL_t
    in the per-token reward (InstructGPT; PPO, RLOO, REINFORCE++); False = KL is a loss term instead (GRPO), the
    reward is the score alone. Returns (stats, outputs) where outputs[j] is the batch split into `splits[j]`
    shards (one list per trainer group; each shard is then a separate object in the store).

    stats: batch means as Python floats — "kl" (Σ_t k1 per sequence, what the adaptive controller steers),
    "kl_penalty" (Σ_t of the configured estimator), "proxy_reward" (scores), "non_score_reward" (Σ_t −β·kl in
    the reward), "response_len", "advantage_mean/std" (before whitening), and "return_mean", "value_mean" where
    the estimator has them.
    """
    if values is None:
        values = [None] * len(shards)  # type: ignore[list-item]
    if not (len(shards) == len(ref_logprobs) == len(scores) == len(values)):
        raise RolloutError(f"finalize: {len(shards)} shards but {len(ref_logprobs)} ref_logprobs, {len(scores)} "
                           f"scores, {len(values)} values")
    scored = [s.replace(ref_logprobs=r.float(), scores=c.float(), values=None if v is None else v.float())
              for s, r, c, v in zip(shards, ref_logprobs, scores, values)]
    batch = Rollout.concat(scored)
    batch = batch.select(torch.argsort(batch.row_index)).validate()
    mask = batch.action_mask
    kl = kl_penalty(batch.old_logprobs, batch.ref_logprobs, kl_estimator)  # type: ignore[arg-type]
    kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    in_reward = beta if kl_in_reward else 0.0
    result = compute_advantages(estimator, AdvantageInputs(
        scores=batch.scores, mask=mask, kl=kl if kl_in_reward else None, kl_coef=in_reward,  # type: ignore[arg-type]
        values=batch.values, gamma=gamma, lam=lam, whiten_advantages=False, group_size=group_size,
        scale=scale))  # type: ignore[arg-type]
    raw_adv = advantages = result.advantages
    if estimator == "gae" and whiten_advantages:  # PPO's batch normalisation (the other estimators normalise
        advantages = whiten(advantages, mask)     # in their own formula, or not at all)
    batch = batch.replace(kl=kl, rewards=result.rewards, advantages=advantages, returns=result.returns)
    k1 = torch.where(mask.bool(), kl_k1(batch.old_logprobs, batch.ref_logprobs), torch.zeros_like(kl))
    stats = {
        "kl": float(k1.sum(1).mean()),
        "kl_penalty": float(kl.sum(1).mean()),
        "proxy_reward": float(batch.scores.mean()),
        "non_score_reward": float((-in_reward * kl).sum(1).mean()),
        "response_len": float(mask.sum(1).float().mean()),
        "advantage_mean": float(masked_mean(raw_adv, mask)),
        "advantage_std": float(masked_var(raw_adv, mask).sqrt()),
    }
    if result.returns is not None:
        stats["return_mean"] = float(masked_mean(result.returns, mask))
    if batch.values is not None:
        stats["value_mean"] = float(masked_mean(batch.values, mask))
    return stats, [batch.split(n) for n in splits]
