"""Preference pairs for offline preference optimisation (`raygpt dpo`): K-wise comparisons → all C(K,2) (chosen,
rejected) pairs, tokenised like the SFT and RM data, batched for one forward pass per pair, the frozen reference's
sequence log-probs computed once by Ray tasks, and the per-micro-batch loss the Ray Train engine runs.

The pairs of a comparison are the reward model's (`models.dpo.ranking_to_pairs` enumerates them through
`models.losses.ranked_pairs`, InstructGPT §3.5), so DPO and the RM learn from exactly the same comparisons of the
same file. A response is `encode_example`'s: response tokens + EOS, the loss/log-prob mask on those tokens only.
Pure functions except `reference_logprobs_on_ray` (Ray tasks, one shard each).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import ray
import torch
from torch import Tensor, nn

from actors.base import disable_dropout
from jobs.config import ConfigError
from jobs.data.examples import encode_example, sft_batch
from jobs.data.tasks.user_data import read_preferences
from models.checkpoint import load_checkpoint
from models.dpo import preference_loss, ranking_to_pairs, sequence_logprobs


class Pair(NamedTuple):
    """One comparison pair, tokenised: (prompt ids, chosen response ids + EOS, rejected response ids + EOS)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def load_pairs(path: str | Path, tokenizer: Any, max_tokens: int) -> tuple[list[Pair], dict[str, int]]:
    """All C(K,2) pairs of every comparison in `path` (K-wise or pairwise rows; jobs/data/tasks/user_data.py) whose
    longest prompt + response + EOS fits `max_tokens`; (pairs, counts). ConfigError naming `comparisons` (and the
    file/row) for an unreadable file or rows without a ranking."""
    try:
        comparisons = read_preferences(path)
    except (ConfigError, OSError) as e:
        raise ConfigError(f"comparisons: {e}") from None
    pairs: list[Pair] = []
    dropped = 0
    for c in comparisons:
        encoded = [encode_example(tokenizer, c.prompt, r) for r in c.responses]
        if max(len(p) + len(r) for p, r in encoded) > max_tokens:
            dropped += 1
            continue
        for i, j in ranking_to_pairs(c.ranking):
            pairs.append(Pair(encoded[i][0], encoded[i][1], encoded[j][1]))
    return pairs, {"comparisons": len(comparisons), "dropped_too_long": dropped, "pairs": len(pairs)}


def pair_batch(pairs: Sequence[Pair], pad_id: int, ref_chosen: Sequence[float] | np.ndarray | None = None,
               ref_rejected: Sequence[float] | np.ndarray | None = None) -> dict[str, Tensor]:
    """B pairs → {"chosen_ids", "chosen_targets", "chosen_mask", "rejected_ids", "rejected_targets",
    "rejected_mask"}: (B, T) each, both sides padded to one width T (so they share one forward pass), masks on
    response tokens only (`sft_batch`); plus "ref_chosen"/"ref_rejected" (B,) float32 when given. Rows first, so
    the engine splits micro-batches by pair."""
    if not pairs:
        raise ValueError("pairs: empty batch")
    width = max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs) - 1
    out: dict[str, Tensor] = {}
    for side in ("chosen", "rejected"):
        b = sft_batch([(p.prompt, getattr(p, side)) for p in pairs], pad_id, width)
        out.update({f"{side}_ids": b["input_ids"], f"{side}_targets": b["targets"], f"{side}_mask": b["loss_mask"]})
    if ref_chosen is not None and ref_rejected is not None:
        out["ref_chosen"] = torch.as_tensor(np.asarray(ref_chosen, dtype=np.float32))
        out["ref_rejected"] = torch.as_tensor(np.asarray(ref_rejected, dtype=np.float32))
    return out


def pair_logprobs(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(chosen (B,), rejected (B,)) sequence log-probs log π(y|x) under `model`, chosen and rejected in one forward
    pass of 2B rows (`models.dpo.sequence_logprobs`, fp32)."""
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
    targets = torch.cat([batch["chosen_targets"], batch["rejected_targets"]])
    mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
    lp = sequence_logprobs(model(ids), targets, mask)
    n = batch["chosen_ids"].shape[0]
    return lp[:n], lp[n:]


def preference_loss_fn(loss_type: str, beta: float, model: Any, batch: dict[str, Tensor]
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """The engine's loss for a `pair_batch` with reference log-probs: `models.dpo.preference_loss` (sigmoid = DPO,
    ipo = IPO with per-token normalisation by the response lengths). Bind loss_type and beta with
    functools.partial. Metrics: reward_chosen/rejected/margin and accuracy of the implicit reward β·log π/π_ref."""
    chosen, rejected = pair_logprobs(model, batch)
    return preference_loss(loss_type, chosen, rejected, batch["ref_chosen"].to(chosen.dtype),  # type: ignore[arg-type]
                           batch["ref_rejected"].to(chosen.dtype), beta,
                           chosen_lengths=batch["chosen_mask"].sum(-1), rejected_lengths=batch["rejected_mask"].sum(-1))


@torch.no_grad()
def reference_logprobs(model: nn.Module, pairs: Sequence[Pair], pad_id: int, batch_size: int = 64
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(chosen (P,), rejected (P,)) float32 log π_ref(y|x) of every pair under the frozen `model` (eval mode)."""
    model.eval()
    chosen: list[Tensor] = []
    rejected: list[Tensor] = []
    for i in range(0, len(pairs), batch_size):
        c, r = pair_logprobs(model, pair_batch(pairs[i:i + batch_size], pad_id))
        chosen.append(c.float())
        rejected.append(r.float())
    if not chosen:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return torch.cat(chosen).numpy(), torch.cat(rejected).numpy()


def _reference_task(checkpoint: str, pairs: list[Pair], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Ray task body: load the frozen reference (dropout off) and score one shard of pairs."""
    torch.set_num_threads(1)
    return reference_logprobs(disable_dropout(load_checkpoint(checkpoint, kind="lm")), pairs, pad_id)


def reference_logprobs_on_ray(checkpoint: str, pairs: Sequence[Pair], pad_id: int, workers: int,
                              timeout_s: float = 1800.0) -> tuple[np.ndarray, np.ndarray]:
    """`reference_logprobs` of all pairs as `workers` Ray tasks over contiguous shards (1 CPU each); the shards'
    arrays come back through the object store and are concatenated in pair order. Computed once, before
    training: the reference is frozen, so the trainers never hold a second model."""
    if not pairs:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    n = max(1, min(workers, len(pairs)))
    bounds = [i * len(pairs) // n for i in range(n + 1)]
    task = ray.remote(_reference_task).options(num_cpus=1, max_retries=2)
    refs = [task.remote(checkpoint, list(pairs[a:b]), pad_id) for a, b in zip(bounds, bounds[1:])]
    parts = ray.get(refs, timeout=timeout_s)
    return np.concatenate([c for c, _ in parts]), np.concatenate([r for _, r in parts])
