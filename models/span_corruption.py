"""T5's span-corruption pre-training objective (Raffel et al. 2020 §3.1.4, "i.i.d. spans" §3.3.4) and the
text-to-text batch format (§2.4) — pure, seeded functions of token ids.

Span corruption drops round(L·noise_density) tokens of an L-token example, in round(noise/mean_span_length)
contiguous spans. The encoder input is the example with each dropped span replaced by one sentinel; the target
is each sentinel followed by the span it replaced; both end with EOS (the T5 code base's
`random_spans_noise_mask` / `noise_span_to_unique_sentinel` / `nonnoise_span_to_unique_sentinel`). Sentinels
are unique per span and appear in the same order in input and target, so input + target reconstruct the example.
The caller reserves the sentinel ids: `sentinel_ids(vocab_size, n)` takes the top n ids, as T5's `<extra_id_i>`
= vocab_size − 1 − i.

Everything downstream of this is ordinary teacher forcing: `shift_right` builds decoder inputs from targets and
`seq2seq_loss` is the LM cross-entropy (models/losses.py) over the target tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from models.losses import lm_loss


def sentinel_ids(vocab_size: int, n: int) -> list[int]:
    """T5's sentinel convention: <extra_id_i> = vocab_size − 1 − i for i < n (the top n ids of the vocabulary)."""
    if n <= 0 or n >= vocab_size:
        raise ValueError(f"sentinels: need 0 < n < vocab_size, got n={n}, vocab_size={vocab_size}")
    return [vocab_size - 1 - i for i in range(n)]


def _random_segmentation(total: int, segments: int, gen: torch.Generator) -> Tensor:
    """Split `total` items into `segments` non-empty groups uniformly at random → (segments,) lengths."""
    if segments == 1:
        return torch.tensor([total])
    # choose segments−1 distinct cut points among the total−1 gaps
    cuts = torch.randperm(total - 1, generator=gen)[:segments - 1].sort().values + 1
    edges = torch.cat([torch.tensor([0]), cuts, torch.tensor([total])])
    return edges.diff()


def noise_mask(length: int, noise_density: float, mean_span_length: float, gen: torch.Generator) -> Tensor:
    """(length,) bool: True = dropped. round(length·density) noise tokens (at least 1, at most length−1) in
    round(noise / mean_span_length) spans (at least 1), interleaved with as many non-noise spans; the example
    starts with non-noise, as in T5's `random_spans_noise_mask`."""
    if length < 2:
        raise ValueError(f"span corruption: an example needs at least 2 tokens, got {length}")
    if not 0.0 < noise_density < 1.0 or mean_span_length < 1.0:
        raise ValueError(f"span corruption: need 0 < noise_density < 1 and mean_span_length >= 1, got "
                         f"{noise_density}, {mean_span_length}")
    n_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    n_spans = max(int(round(n_noise / mean_span_length)), 1)
    n_spans = min(n_spans, n_noise, length - n_noise)
    noise_lengths = _random_segmentation(n_noise, n_spans, gen)
    keep_lengths = _random_segmentation(length - n_noise, n_spans, gen)
    interleaved = torch.stack([keep_lengths, noise_lengths], 1).flatten()  # keep, noise, keep, noise, ...
    flags = torch.tensor([False, True]).repeat(n_spans)
    return torch.repeat_interleave(flags, interleaved)


def span_corruption(tokens: Sequence[int] | Tensor, sentinels: Sequence[int], eos_id: int, seed: int,
                    noise_density: float = 0.15, mean_span_length: float = 3.0) -> tuple[Tensor, Tensor]:
    """One example (L,) → (encoder input, decoder target), both 1-D long tensors ending with `eos_id`.

    input  = kept tokens, each dropped span replaced by sentinels[i] (i = span index), then EOS;
    target = for each dropped span: sentinels[i] then the span's tokens; then EOS.
    Deterministic in `seed` (a torch.Generator is seeded with it); raises if there are more spans than sentinels.
    """
    ids = torch.as_tensor(tokens, dtype=torch.long).flatten()
    gen = torch.Generator().manual_seed(int(seed))
    mask = noise_mask(ids.numel(), noise_density, mean_span_length, gen)
    starts = mask & ~torch.cat([torch.tensor([False]), mask[:-1]])  # first token of each dropped span
    n_spans = int(starts.sum())
    if n_spans > len(sentinels):
        raise ValueError(f"sentinels: {n_spans} noise spans but only {len(sentinels)} sentinel ids")
    span_index = starts.long().cumsum(0) - 1  # index of the span a noise token belongs to
    sent = torch.as_tensor(list(sentinels)[:n_spans], dtype=torch.long)
    eos = torch.tensor([eos_id])
    # encoder input: non-noise tokens, and the sentinel at the first token of every noise span
    inp = torch.where(starts, sent[span_index.clamp(min=0)], ids)[~mask | starts]
    # target: sentinel before each span's first token, then the noise tokens
    pieces = torch.stack([sent[span_index.clamp(min=0)], ids], 1)  # (L, 2): [sentinel, token]
    keep = torch.stack([starts, mask], 1)
    tgt = pieces[keep]
    return torch.cat([inp, eos]), torch.cat([tgt, eos])


@dataclass
class Seq2SeqBatch:
    """Teacher-forcing batch for T5 (right-padded). S = encoder length, T = target length."""

    input_ids: Tensor  # (B, S)
    attention_mask: Tensor  # (B, S) 1 = real token
    decoder_input_ids: Tensor  # (B, T) = shift_right(labels)
    labels: Tensor  # (B, T) target ids (pad where labels_mask is 0)
    labels_mask: Tensor  # (B, T) 1 = a target token the loss counts (including EOS)


def shift_right(labels: Tensor, decoder_start_token_id: int) -> Tensor:
    """Decoder inputs for teacher forcing: (B, T) → (B, T) with [start, labels[:, :-1]] (T5 / HF `_shift_right`)."""
    start = torch.full_like(labels[:, :1], decoder_start_token_id)
    return torch.cat([start, labels[:, :-1]], 1)


def right_pad(rows: Sequence[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """1-D rows → (ids (B, max len) padded with pad_id on the right, mask (B, max len) 1 = real)."""
    width = max(int(r.numel()) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :r.numel()] = r
        mask[i, :r.numel()] = 1
    return ids, mask


def collate(pairs: Sequence[tuple[Tensor, Tensor]], pad_id: int, decoder_start_token_id: int) -> Seq2SeqBatch:
    """(encoder input, target) 1-D pairs → a right-padded Seq2SeqBatch."""
    if not pairs:
        raise ValueError("pairs: empty batch")
    for i, (inp, tgt) in enumerate(pairs):
        if inp.numel() == 0 or tgt.numel() == 0:
            raise ValueError(f"pairs[{i}]: empty input or target")
    input_ids, attention_mask = right_pad([p[0] for p in pairs], pad_id)
    labels, labels_mask = right_pad([p[1] for p in pairs], pad_id)
    return Seq2SeqBatch(input_ids, attention_mask, shift_right(labels, decoder_start_token_id), labels, labels_mask)


def span_corruption_batch(examples: Sequence[Sequence[int] | Tensor], sentinels: Sequence[int], eos_id: int,
                          pad_id: int, decoder_start_token_id: int, seed: int, noise_density: float = 0.15,
                          mean_span_length: float = 3.0) -> Seq2SeqBatch:
    """Span-corrupt every example (example i uses seed + i) and collate (pre-training, §3.1.4)."""
    pairs = [span_corruption(ex, sentinels, eos_id, seed + i, noise_density, mean_span_length)
             for i, ex in enumerate(examples)]
    return collate(pairs, pad_id, decoder_start_token_id)


def text_to_text_batch(examples: Sequence[tuple[Sequence[int], Sequence[int]]], prefix: Sequence[int],
                       eos_id: int, pad_id: int, decoder_start_token_id: int, max_input_len: int,
                       max_target_len: int) -> Seq2SeqBatch:
    """Fine-tuning batch in T5's text-to-text format (§2.4): encoder input = task prefix tokens (e.g. the
    encoding of "summarize: ") + source + EOS, target = target text + EOS, both cut to their maximum length
    (the EOS is kept). examples: (source ids, target ids) pairs."""
    pairs = []
    for i, (src, tgt) in enumerate(examples):
        if len(tgt) == 0:
            raise ValueError(f"examples[{i}]: empty target")
        out = list(tgt)[:max_target_len - 1] + [eos_id]
        pairs.append((torch.tensor(text_to_text_input(src, prefix, eos_id, max_input_len), dtype=torch.long),
                      torch.tensor(out, dtype=torch.long)))
    return collate(pairs, pad_id, decoder_start_token_id)


def text_to_text_input(source: Sequence[int], prefix: Sequence[int], eos_id: int,
                       max_input_len: int | None = None) -> list[int]:
    """The encoder input of one text-to-text example (§2.4): task prefix + source, cut to max_input_len − 1
    tokens, then EOS — the one rule for training batches and for generation."""
    ids = list(prefix) + list(source)
    if max_input_len is not None:
        if max_input_len < 2:
            raise ValueError(f"max_input_len: need room for a token and EOS, got {max_input_len}")
        ids = ids[:max_input_len - 1]
    return ids + [eos_id]


def seq2seq_loss(logits: Tensor, labels: Tensor, labels_mask: Tensor) -> Tensor:
    """Token-mean cross-entropy of the decoder logits (B, T, V) against labels (B, T) where labels_mask (B, T)
    is 1 — models.losses.lm_loss; logits[:, t] already predicts labels[:, t] (the shift is in the inputs)."""
    return lm_loss(logits, labels, labels_mask)
