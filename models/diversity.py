"""Diversity and repetition of sampled responses: the metrics that show reward over-optimisation (a policy that
games its reward model by repeating what the model likes; Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization") and the penalty that holds it back. One place per formula:

- `distinct_n` — distinct n-grams over all sequences / all n-grams (Li et al. 2016 §4), corpus level;
- `repetition_rate` — the fraction of n-grams that repeat an earlier n-gram of the *same* sequence, pooled;
- `repeated_ngrams` — the same count on token tensors, per row (optionally also counting n-grams that occur in
  another row of the batch): the reward role's repetition penalty;
- `word_ids` — texts as (B, W) word ids, so that penalty counts the evaluator's unit (whitespace-split words).

The first two take any sequences of hashable items (the evaluator passes whitespace-split words); the third takes
(B, T) token ids with an explicit mask, no Python loop over rows.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Literal

import torch
from torch import Tensor


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")


def distinct_n(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
    """distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models" §4):
    the number of distinct n-grams over all `sequences` divided by their total number of n-grams — 1.0 when no
    n-gram repeats anywhere, → 0 as samples repeat themselves and each other. Sequences shorter than n contribute
    no n-gram; 0.0 when there is none at all."""
    _check_n(n)
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
    """Within-sequence repetition: over all sequences, (n-grams equal to an earlier n-gram of the same sequence) /
    (all n-grams). "love the love the love" has word bigrams (love the)(the love)(love the)(the love): 2 of 4
    repeat → 0.5. 0.0 when no sequence has an n-gram. Unlike distinct-n it ignores repeats *across* sequences, so
    it separates "each sample loops" from "all samples say the same thing"."""
    _check_n(n)
    repeats = total = 0
    for s in sequences:
        grams = [tuple(s[i:i + n]) for i in range(len(s) - n + 1)]
        repeats += len(grams) - len(set(grams))
        total += len(grams)
    return repeats / total if total else 0.0


def repeated_ngrams(ids: Tensor, mask: Tensor, n: int, across_rows: bool = False,
                    reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """(B,) float: per row, the fraction of its n-grams (all n tokens under `mask`) that repeat an earlier n-gram
    of the same row — `repetition_rate` of that row on tokens. With `across_rows`, an n-gram also counts as
    repeated when it occurs anywhere in another row (the batch-level repetition that lowers distinct-n). A row
    with no n-gram scores 0. `reduction="sum"` gives the number of such n-grams instead of their fraction: with
    `across_rows`, exactly how many fewer repeated n-grams the batch would have without this row — the part of
    corpus distinct-n's 1 − distinct/total that the row is to blame for, which grows with a long row's length
    where the fraction does not.

    ids: (B, T) token ids; mask: (B, T) 1 on the tokens to read (e.g. the response's action mask)."""
    _check_n(n)
    b, t = ids.shape
    if t < n:
        return torch.zeros(b, dtype=torch.float32, device=ids.device)
    grams = ids.unfold(1, n, 1)  # (B, T', n), T' = T - n + 1
    valid = mask.bool().unfold(1, n, 1).all(-1)  # (B, T')
    tp = grams.shape[1]
    # same[b, i, j]: n-gram i equals n-gram j of row b (both valid); a repeat is j with an equal i < j.
    same = (grams[:, :, None, :] == grams[:, None, :, :]).all(-1) & valid[:, :, None] & valid[:, None, :]
    earlier = torch.ones(tp, tp, dtype=torch.bool, device=ids.device).triu(1)  # [i, j] = i < j
    repeated = (same & earlier).any(1)  # (B, T')
    if across_rows:
        flat, fvalid = grams.reshape(b * tp, n), valid.reshape(b * tp)
        row = torch.arange(b, device=ids.device).repeat_interleave(tp)
        other = (flat[:, None, :] == flat[None, :, :]).all(-1) & fvalid[:, None] & fvalid[None, :] \
            & (row[:, None] != row[None, :])
        repeated = repeated | other.any(1).reshape(b, tp)
    hits = (repeated & valid).sum(1).float()
    if reduction == "sum":
        return hits
    if reduction != "mean":
        raise ValueError(f"reduction: 'mean' or 'sum', got {reduction!r}")
    count = valid.sum(1)
    return torch.where(count > 0, hits / count.clamp(min=1).float(),
                       torch.zeros(b, dtype=torch.float32, device=ids.device))


def word_ids(texts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """((B, W) int64 ids, (B, W) mask) of each text's whitespace-split words — the unit `distinct_n` is measured
    in by the evaluator — with ids from a vocabulary of this call's words (equal words, equal ids), right-padded
    to the longest text. `repeated_ngrams` on these counts word n-grams: on tokens, a shared sub-word piece
    ("," + newline, the pieces of a long word) counts as a repeat that distinct-2 over words never sees."""
    vocab: dict[str, int] = {}
    rows = [[vocab.setdefault(w, len(vocab)) for w in t.split()] for t in texts]
    width = max((len(r) for r in rows), default=0)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, :len(r)] = 1
    return ids, mask
