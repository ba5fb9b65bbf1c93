"""Held-out evaluation of the human-feedback stages (InstructGPT §4): gold score, proxy score, win rate, KL to the
SFT model, reward-model accuracy and perplexity. `compare_models` is the one evaluation of sampled responses: the
eval job, the RL job's final report and the demo all call it, so their numbers are the same measurement."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from actors.base import response_logits, response_logprobs, rollout_from_generation, sample_rollout
from actors.engines import RolloutEngine, make_engine
from actors.reward import decode_rollout, reward_inputs, score_sequences
from jobs.data.corpus import load_documents, split_documents
from jobs.data.examples import encode_example, encode_prompt
from jobs.data.tasks.user_data import read_preferences
from jobs.rlhf.checkpoints import load_lm
from jobs.rlhf.sampling import sample_seed
from models.checkpoint import load_checkpoint, read_config
from models.config import ConfigError
from models.diversity import distinct_n, repetition_rate
from models.generation import SamplingParams
from models.losses import lm_loss, pairwise_accuracy
from models.tokenizer import Tokenizer

GoldFn = Callable[[list[str], list[str]], Sequence[float]]


@dataclass
class HeldoutComparison:
    """The one held-out evaluation of language models (`raygpt eval`, the RL job's final report, the demo).

    Every model samples one response per prompt with the same per-prompt seed (sample_seed(seed, "heldout", i, 0))
    under the same `SamplingParams`; `metrics` holds per model `<label>/gold` (the labeller), `<label>/proxy` (the
    reward model, through the reward role's EOS rule), `<label>/kl` (Σ_t log π(a_t) − log π_ref(a_t) on the
    model's own samples: the k1 estimate of KL(π‖π_ref) in nats, against `kl_reference`; per response in `kl`),
    `<label>/response_tokens`, `<label>/response_chars`, `<label>/distinct1` and `<label>/distinct2` (distinct
    word unigrams / bigrams over all its responses, models/diversity.py `distinct_n`), `<label>/repetition` (the
    fraction of word bigrams repeating an earlier bigram of the same response, `repetition_rate`), and
    `win_rate/<a>_vs_<b>` for every ordered pair with gold scores (ties ½). Words = whitespace-split."""

    prompts: list[str]
    responses: dict[str, list[str]]
    gold: dict[str, list[float]]
    proxy: dict[str, list[float]]
    metrics: dict[str, float]
    kl: dict[str, list[float]] = field(default_factory=dict)  # label → per-response KL to kl_reference (nats)
    tokens: dict[str, list[int]] = field(default_factory=dict)  # label → per-response length in tokens

    def rows(self) -> list[dict[str, Any]]:
        """Per prompt: the prompt and each model's response, gold and proxy score, KL and length (samples.jsonl)."""
        out = []
        for i, p in enumerate(self.prompts):
            row: dict[str, Any] = {"prompt": p}
            for label, responses in self.responses.items():
                row[label] = {"response": responses[i], **({"gold": self.gold[label][i]} if label in self.gold else {}),
                              **({"proxy": self.proxy[label][i]} if label in self.proxy else {}),
                              **({"kl": self.kl[label][i]} if label in self.kl else {}),
                              **({"tokens": self.tokens[label][i]} if label in self.tokens else {})}
            out.append(row)
        return out


def compare_models(models: Mapping[str, nn.Module], tokenizer: Tokenizer, prompts: Sequence[str],
                   sampling: SamplingParams, seed: int, *, gold: GoldFn | None = None,
                   reward_model: nn.Module | None = None, kl_reference: str | None = None, batch_size: int = 128,
                   engines: Mapping[str, RolloutEngine] | None = None) -> HeldoutComparison:
    """Sample, score and compare `models` (label → LM, all reading `tokenizer`'s ids) on `prompts`. A model with
    an entry in `engines` samples with that rollout engine (e.g. vLLM holding the same weights); its log-probs for
    the KL are then recomputed with the model's own forward pass."""
    if kl_reference is not None and kl_reference not in models:
        raise ConfigError(f"kl_reference: {kl_reference!r} is not one of the models {list(models)}")
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    seeds = [sample_seed(seed, "heldout", i, 0) for i in range(len(prompts))]
    eos = tokenizer.eos_id
    texts: dict[str, list[str]] = {}
    gold_scores: dict[str, list[float]] = {}
    proxy: dict[str, list[float]] = {}
    metrics: dict[str, float] = {"prompts": float(len(prompts))}
    kl_rows: dict[str, list[float]] = {}
    token_rows: dict[str, list[int]] = {}
    for label, model in models.items():
        model.eval()
        kl: list[Tensor] = []
        lengths: list[Tensor] = []
        texts[label], proxy_rows = [], []
        for a in range(0, len(ids), batch_size):
            rows = list(range(a, min(a + batch_size, len(ids))))
            if engines and label in engines:
                gen = engines[label].generate([ids[r] for r in rows], sampling, eos_id=eos,
                                              seeds=[seeds[r] for r in rows])
                rollout = rollout_from_generation(gen, rows, 0, "", engines[label].name,
                                                  engines[label].exact_logprobs)
                if not rollout.exact_logprobs:
                    with torch.no_grad():
                        ours = response_logprobs(response_logits(model, rollout), rollout, sampling.temperature)
                    rollout = rollout.replace(old_logprobs=ours, exact_logprobs=True)
            else:
                rollout = sample_rollout(model, [ids[r] for r in rows], rows, [seeds[r] for r in rows], sampling,
                                         eos, 0, "")
            texts[label] += decode_rollout(rollout, tokenizer.decode, eos)[1]
            lengths.append(rollout.action_mask.sum(1))
            with torch.no_grad():
                if kl_reference is not None:
                    ref = response_logprobs(response_logits(models[kl_reference], rollout), rollout,
                                            sampling.temperature)
                    kl.append((rollout.old_logprobs - ref).sum(1))
                if reward_model is not None:
                    r_ids, r_mask = reward_inputs(rollout.input_ids, rollout.attention_mask, eos)
                    proxy_rows += reward_model.eval()(r_ids, r_mask).float().tolist()
        token_rows[label] = [int(x) for x in torch.cat(lengths).tolist()]
        metrics[f"{label}/response_tokens"] = float(torch.cat(lengths).float().mean())
        metrics[f"{label}/response_chars"] = sum(map(len, texts[label])) / len(prompts)
        # Diversity and repetition of the samples (issue 17: the signs of a policy gaming its reward model).
        words = [t.split() for t in texts[label]]
        metrics[f"{label}/distinct1"] = distinct_n(words, 1)
        metrics[f"{label}/distinct2"] = distinct_n(words, 2)
        metrics[f"{label}/repetition"] = repetition_rate(words, 2)
        if kl:
            kl_rows[label] = torch.cat(kl).tolist()
            metrics[f"{label}/kl"] = float(torch.cat(kl).mean())
        if reward_model is not None:
            proxy[label] = proxy_rows
            metrics[f"{label}/proxy"] = sum(proxy_rows) / len(prompts)
        if gold is not None:
            gold_scores[label] = [float(x) for x in gold(list(prompts), texts[label])]
            metrics[f"{label}/gold"] = sum(gold_scores[label]) / len(prompts)
    for a in gold_scores:
        for b in gold_scores:
            if a != b:
                metrics[f"win_rate/{a}_vs_{b}"] = win_rate(gold_scores[a], gold_scores[b])
    return HeldoutComparison(list(prompts), texts, gold_scores, proxy, metrics, kl_rows, token_rows)


def evaluate_checkpoints(checkpoints: Mapping[str, str | Path], prompts: Sequence[str], sampling: SamplingParams,
                         seed: int, *, gold: GoldFn | None = None, reward_model: str | Path | None = None,
                         kl_reference: str | None = None, batch_size: int = 128, engine: str = "native"
                         ) -> HeldoutComparison:
    """`compare_models` on checkpoint directories (label → LM checkpoint). They must share one tokenizer (the
    comparison gives every model the same token prompts); ConfigError naming `models.<label>` otherwise."""
    models: dict[str, nn.Module] = {}
    tokenizer: Tokenizer | None = None
    for label, path in checkpoints.items():
        model, tok = load_lm(path)
        if tokenizer is not None and tok.sha256() != tokenizer.sha256():
            raise ConfigError(f"models.{label}: {path} uses another tokenizer than {next(iter(checkpoints))!r}; "
                              "models compared on the same prompts must share one")
        models[label], tokenizer = model, tok
    if tokenizer is None:
        raise ConfigError("models: no checkpoint to evaluate")
    rm = load_checkpoint(reward_model, kind="reward") if reward_model else None
    engines = {label: make_engine(engine, path) for label, path in checkpoints.items()} if engine != "native" else None
    return compare_models(models, tokenizer, prompts, sampling, seed, gold=gold, reward_model=rm,
                          kl_reference=kl_reference, batch_size=batch_size, engines=engines)


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """Fraction of prompts where A's gold score beats B's; ties count ½."""
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError("win_rate: need two equally long, non-empty score lists")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b)) / len(scores_a)



def proxy_scores(rm: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:

    seqs = [sum(encode_example(tokenizer, p, r), []) for p, r in zip(prompts, responses)]
    return score_sequences(rm, seqs, tokenizer.eos_id).tolist()



def rm_accuracy(rm: Any, tokenizer: Any, path: str | Path) -> dict[str, float]:
    """Pairwise accuracy of the RM on a comparisons file: over all C(K,2) pairs of every prompt, and over the pairs
    whose labeler scores differ (when the file records scores; tied pairs are a coin flip for any model)."""


    comps = read_preferences(path)  # K-wise or pairwise (user data): the RM's own held-out file may be either
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
