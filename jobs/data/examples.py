"""Tokenised training examples of the human-feedback stages, and the order they are read in.

- SFT demonstrations: (prompt ids, response ids + EOS) → right-padded LM batches with a response-only loss mask.
- K-wise comparisons: K sequences prompt + response_j + EOS and the ranking → (B, K, T) reward-model batches.
- `batch_indices`: the examples of an optimizer step, a pure function of (seed, step), so resume is exact.
Pure functions, testable without Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from jobs.data.tasks import Comparison, read_comparisons
from models.seeding import stream_slice

Example = tuple[list[int], list[int]]  # (prompt ids, response ids ending with EOS)



def encode_example(tokenizer: Any, prompt: str, response: str) -> Example:
    """(prompt ids, response ids + [EOS]): the prompt and response are encoded separately, as generation sees
    them (prompt tokens, then sampled tokens), and the response ends with EOS so the model learns to stop."""
    return tokenizer.encode(prompt), [*tokenizer.encode(response), tokenizer.eos_id]



def sft_batch(examples: Sequence[Example], pad_id: int, width: int | None = None) -> dict[str, Any]:
    """Right-padded LM batch with a response-only loss mask.

    For a sequence s = prompt + response (length L): input_ids = s[:-1], targets = s[1:], and
    loss_mask[t] = 1 iff targets[t] is a response token (incl. EOS), i.e. t ≥ len(prompt) − 1.
    Returns {"input_ids", "targets", "loss_mask"}: (B, T) tensors, T = max L − 1 (or `width`). Right padding
    needs no attention mask: under causal attention real tokens never see the padding after them.
    """

    if not examples:
        raise ValueError("examples: empty batch")
    for i, (p, r) in enumerate(examples):
        if not p or not r:
            raise ValueError(f"examples[{i}]: empty prompt or response")
    T = max(len(p) + len(r) for p, r in examples) - 1
    if width is not None:
        if width < T:
            raise ValueError(f"width: {width} is shorter than the longest sequence ({T})")
        T = width
    ids = torch.full((len(examples), T + 1), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, (p, r) in enumerate(examples):
        seq = p + r
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, len(p) - 1:len(seq) - 1] = 1
    return {"input_ids": ids[:, :-1].contiguous(), "targets": ids[:, 1:].contiguous(), "loss_mask": mask}



def batch_indices(n: int, step: int, global_batch: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step`: the step's slice of the endless stream of per-epoch permutations
    of range(n) (models.seeding.stream_slice). A pure function of its arguments, so a resumed run continues at
    exactly the same data position."""
    return [int(i) for i in stream_slice(n, step * global_batch, global_batch, seed)]


def rank_slice(indices: list[int], rank: int, rows_per_rank: int) -> list[int]:
    """This data-parallel rank's contiguous rows of a global batch."""
    return indices[rank * rows_per_rank:(rank + 1) * rows_per_rank]


Element = tuple[list[list[int]], list[int]]  # (K token sequences, ranking)



def encode_comparison(tokenizer: Any, c: Comparison) -> Element:
    """K sequences prompt + response_j + EOS, and the ranking."""
    return [sum(encode_example(tokenizer, c.prompt, r), []) for r in c.responses], list(c.ranking)



def rm_batch(elements: Sequence[Element], pad_id: int) -> dict[str, Any]:
    """Batch of B prompts: {"input_ids", "attention_mask"}: (B, K_max, T) right-padded (padding responses of
    prompts with K < K_max are all padding), "ranking": (B, K_max) padded with −1, "k": (B,) responses per prompt.
    Rows come first so the engine can split micro-batches by prompt."""

    if not elements:
        raise ValueError("elements: empty batch")
    kmax = max(len(seqs) for seqs, _ in elements)
    T = max(len(s) for seqs, _ in elements for s in seqs)
    B = len(elements)
    ids = torch.full((B, kmax, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, kmax, T), dtype=torch.long)
    ranking = torch.full((B, kmax), -1, dtype=torch.long)
    k = torch.zeros(B, dtype=torch.long)
    for b, (seqs, rank) in enumerate(elements):
        if len(seqs) < 2 or len(rank) != len(seqs):
            raise ValueError(f"elements[{b}]: need K >= 2 sequences and a ranking of the same length")
        k[b] = len(seqs)
        ranking[b, :len(rank)] = torch.tensor(rank)
        for j, s in enumerate(seqs):
            ids[b, j, :len(s)] = torch.tensor(s)
            mask[b, j, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "ranking": ranking, "k": k}



def load_elements(path: Path, tokenizer: Any, max_tokens: int) -> tuple[list[Element], int]:
    """Validated comparisons of `path`, tokenised; (elements, prompts dropped as too long)."""
    elements, dropped = [], 0
    for c in read_comparisons(path):
        e = encode_comparison(tokenizer, c)
        if max(len(s) for s in e[0]) > max_tokens:
            dropped += 1
            continue
        elements.append(e)
    return elements, dropped
