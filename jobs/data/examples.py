"""Tokenised training examples of the human-feedback stages, and the order they are read in.

- SFT demonstrations: (prompt ids, response ids + EOS) → right-padded LM batches with a response-only loss mask;
  conversations (user `messages` data) → `ChatExample` (ids, per-token mask): the loss covers assistant turns only;
  for a T5, the same (prompt, response) pairs → text-to-text encoder-decoder batches (`text_to_text_sft_batch`).
- K-wise comparisons: K sequences prompt + response_j + EOS and the ranking → (B, K, T) reward-model batches.
Pure functions, testable without Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from actors.reward import close_response
from jobs.data.tasks import Comparison, Demonstration
from jobs.data.tasks.user_data import read_preferences
from models.chat import encode_chat
from models.span_corruption import text_to_text_batch

Example = tuple[list[int], list[int]]  # (prompt ids, response ids ending with EOS)



def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """A prompt as the models see it: the text's tokens (an empty prompt becomes <|endoftext|>)."""
    return tokenizer.encode(text) or [tokenizer.eos_id]


def encode_example(tokenizer: Any, prompt: str, response: str) -> Example:
    """(prompt ids, response ids + [EOS]): the prompt and response are encoded separately, as generation sees
    them (prompt tokens, then sampled tokens), and the response ends with EOS so the model learns to stop (the
    reward model's EOS rule, `actors.reward.close_response`)."""
    return encode_prompt(tokenizer, prompt), close_response(tokenizer.encode(response), tokenizer.eos_id)



class ChatExample(NamedTuple):
    """A tokenised conversation: ids of the whole rendered text and mask[t] = 1 iff token t is trained on (an
    assistant turn's tokens and its EOS; models.chat.encode_chat). TRL calls this `assistant_only_loss`."""

    ids: list[int]
    mask: list[int]


def encode_demonstration(tokenizer: Any, demo: Demonstration) -> Example | ChatExample:
    """A conversation → ChatExample (loss on every assistant turn); a (prompt, response) pair → Example."""
    if demo.messages:
        return ChatExample(*encode_chat(tokenizer, demo.messages))
    return encode_example(tokenizer, demo.prompt, demo.response)


def fits(example: Example | ChatExample, max_prompt_tokens: int, max_response_tokens: int) -> bool:
    """Whether an SFT example fits the data limits: a (prompt, response) pair by each part (the response needs a
    token besides EOS); a conversation by its whole length (≤ the sum, the batch width + 1)."""
    if isinstance(example, ChatExample):
        return len(example.ids) <= max_prompt_tokens + max_response_tokens
    p, r = example
    return len(p) <= max_prompt_tokens and 2 <= len(r) <= max_response_tokens


def token_mask(example: Example | ChatExample) -> tuple[list[int], list[int]]:
    """(sequence, trained-token mask) of either kind: an Example trains on its response tokens."""
    if isinstance(example, ChatExample):
        return example.ids, example.mask
    p, r = example
    return p + r, [0] * len(p) + [1] * len(r)


def sft_batch(examples: Sequence[Example | ChatExample], pad_id: int, width: int | None = None) -> dict[str, Any]:
    """Right-padded LM batch with a loss mask on the trained tokens only.

    For a sequence s (length L) with trained-token mask m: input_ids = s[:-1], targets = s[1:], and
    loss_mask[t] = m[t + 1]. For s = prompt + response that is 1 iff targets[t] is a response token (incl. EOS),
    i.e. t ≥ len(prompt) − 1; for a conversation, iff targets[t] belongs to an assistant turn.
    Returns {"input_ids", "targets", "loss_mask"}: (B, T) tensors, T = max L − 1 (or `width`). Right padding
    needs no attention mask: under causal attention real tokens never see the padding after them.
    """

    if not examples:
        raise ValueError("examples: empty batch")
    seqs = [token_mask(e) for e in examples]
    for i, (e, (s, m)) in enumerate(zip(examples, seqs)):
        if isinstance(e, ChatExample):
            if len(s) != len(m) or not any(m[1:]):
                raise ValueError(f"examples[{i}]: a conversation needs one mask value per token and a trained "
                                 "token after the first")
        elif not e[0] or not e[1]:
            raise ValueError(f"examples[{i}]: empty prompt or response")
    T = max(len(s) for s, _ in seqs) - 1
    if width is not None:
        if width < T:
            raise ValueError(f"width: {width} is shorter than the longest sequence ({T})")
        T = width
    ids = torch.full((len(examples), T + 1), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, (s, m) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s) - 1] = torch.tensor(m[1:], dtype=torch.long)
    return {"input_ids": ids[:, :-1].contiguous(), "targets": ids[:, 1:].contiguous(), "loss_mask": mask}



def text_to_text_sft_batch(examples: Sequence[Example | ChatExample], prefix: Sequence[int], eos_id: int,
                           pad_id: int, decoder_start_token_id: int) -> dict[str, Any]:
    """The same demonstrations as a T5 text-to-text batch (T5 §2.4): encoder input = task prefix + prompt + EOS,
    target = response + EOS (`models.span_corruption.text_to_text_batch`; the loss counts every target token).
    Returns {"input_ids", "attention_mask"} (B, S) and {"decoder_input_ids", "labels", "labels_mask"} (B, T).
    A conversation has no single source and target: ValueError naming the row."""
    if not examples:
        raise ValueError("examples: empty batch")
    pairs = []
    for i, e in enumerate(examples):
        if isinstance(e, ChatExample):
            raise ValueError(f"examples[{i}]: a conversation (messages) has no text-to-text form; T5 fine-tunes "
                             "on (prompt, response) demonstrations")
        p, r = e
        if not p or len(r) < 2 or r[-1] != eos_id:
            raise ValueError(f"examples[{i}]: need a prompt and a response of at least one token ending with EOS")
        pairs.append((p, r[:-1]))  # text_to_text_batch appends the EOS itself
    width = max(len(prefix) + len(p) for p, _ in pairs) + 1
    b = text_to_text_batch(pairs, prefix, eos_id, pad_id, decoder_start_token_id, max_input_len=width,
                           max_target_len=max(len(r) for _, r in pairs) + 1)
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "decoder_input_ids": b.decoder_input_ids,
            "labels": b.labels, "labels_mask": b.labels_mask}


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
    """Validated comparisons of `path` (a file, directory or glob of K-wise or pairwise preferences;
    jobs/data/tasks/user_data.py), tokenised; (elements, prompts dropped as too long)."""

    elements, dropped = [], 0
    for c in read_preferences(path):
        e = encode_comparison(tokenizer, c)
        if max(len(s) for s in e[0]) > max_tokens:
            dropped += 1
            continue
        elements.append(e)
    return elements, dropped
