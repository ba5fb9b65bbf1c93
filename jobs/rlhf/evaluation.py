"""Held-out evaluation of the human-feedback stages (InstructGPT §4): gold score, proxy score, win rate, reward-model
accuracy and perplexity."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from jobs.data.corpus import load_documents, split_documents
from jobs.data.examples import encode_example
from jobs.data.tasks import Task, read_comparisons
from jobs.rlhf.checkpoints import load_lm
from jobs.rlhf.reward_model import reward_scores
from jobs.rlhf.sampling import sample_responses, sample_seed
from models.checkpoint import read_config
from models.config import ConfigError
from models.generation import SamplingParams
from models.losses import lm_loss, pairwise_accuracy


def heldout_responses(model: Any, tokenizer: Any, prompts: Sequence[str], sampling: SamplingParams, seed: int,
                      batch_size: int = 128) -> list[str]:
    """One response per held-out prompt; prompt i always gets the same seed, whichever model samples."""
    seeds = [sample_seed(seed, "heldout", i, 0) for i in range(len(prompts))]
    return sample_responses(model, tokenizer, prompts, sampling, seeds, batch_size)



def gold_of_checkpoint(path: str | Path, task: Task, prompts: Sequence[str], sampling: SamplingParams,
                       seed: int = 0) -> tuple[float, list[str], list[float]]:
    """(mean gold score, responses, scores) of a checkpoint's samples on `prompts`."""
    model, tokenizer = load_lm(path)
    responses = heldout_responses(model, tokenizer, prompts, sampling, seed)
    scores = task.gold_scores(prompts, responses)
    return sum(scores) / len(scores), responses, scores



def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """Fraction of prompts where A's gold score beats B's; ties count ½."""
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError("win_rate: need two equally long, non-empty score lists")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b)) / len(scores_a)



def proxy_scores(rm: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:

    seqs = [sum(encode_example(tokenizer, p, r), []) for p, r in zip(prompts, responses)]
    return reward_scores(rm, seqs, tokenizer.eos_id)



def rm_accuracy(rm: Any, tokenizer: Any, path: str | Path) -> dict[str, float]:
    """Pairwise accuracy of the RM on a comparisons file: over all C(K,2) pairs of every prompt, and over the pairs
    whose labeler scores differ (when the file records scores; tied pairs are a coin flip for any model)."""


    comps = read_comparisons(path)
    flat_p = [c.prompt for c in comps for _ in c.responses]
    flat_r = [r for c in comps for r in c.responses]
    flat = proxy_scores(rm, tokenizer, flat_p, flat_r)
    correct = total = decided_correct = decided = 0.0
    pos = 0
    for c in comps:
        r = flat[pos:pos + c.k]
        pos += c.k
        acc = float(pairwise_accuracy(torch.tensor([r]), torch.tensor([list(c.ranking)])))
        pairs = c.k * (c.k - 1) / 2
        correct += acc * pairs
        total += pairs
        if c.scores is not None:
            for i in range(c.k):
                for j in range(c.k):
                    if c.scores[i] > c.scores[j]:
                        decided += 1
                        decided_correct += float(r[i] > r[j])
    out = {"rm_accuracy": correct / total, "rm_comparisons": float(len(comps))}
    if decided:
        out["rm_accuracy_decided"] = decided_correct / decided
    return out



def heldout_perplexity(model: Any, tokenizer: Any, corpus: str, validation_fraction: float, max_tokens: int
                       ) -> float:
    """exp(mean next-token NLL) over the held-out documents, in n_ctx blocks (documents joined by EOS)."""


    docs = split_documents(load_documents(corpus), validation_fraction)["validation"]
    ids: list[int] = []
    for d in docs:
        ids += tokenizer.encode(d.text) + [tokenizer.eos_id]
        if len(ids) > max_tokens:
            break
    n = model.config.n_ctx
    blocks = (min(len(ids), max_tokens + 1) - 1) // n  # whole blocks of n predictions each
    if blocks < 1:
        raise ConfigError(f"perplexity.max_tokens: {max_tokens} is shorter than one context of {n} tokens")
    data = torch.tensor(ids[:blocks * n + 1])
    model.eval()
    nll = 0.0
    with torch.no_grad():
        for i in range(0, blocks, 16):  # 16 blocks per forward pass
            rows = range(i, min(blocks, i + 16))
            x = torch.stack([data[r * n:(r + 1) * n + 1] for r in rows])
            nll += float(lm_loss(model(x[:, :-1]), x[:, 1:])) * len(rows)
    return math.exp(nll / blocks)



def rm_heldout_file(reward_model: str) -> str | None:

    extra = read_config(reward_model)[2].get("raygpt", {})
    path = extra.get("heldout_comparisons")
    return path if path and Path(path).is_file() else None
