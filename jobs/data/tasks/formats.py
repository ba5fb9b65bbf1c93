"""Zero- and few-shot prompt formats (GPT-2 §3, GPT-3 §2): a task is induced by the shape of the context alone.

- "tldr": summarisation — the passage, then "TL;DR:" (GPT-2 §3.6);
- "qa": question answering — "Q: … / A: …" pairs (GPT-2 §3.5, GPT-3 §3.2);
- "translation": "english sentence = french sentence" pairs (GPT-2 §3.7).

A `PromptFormat` is a template for one example, a separator between examples and a small embedded example set;
`evaluate_format` builds k-shot contexts (k other examples from the same set, rotating) for every example and
reports, for any language-model checkpoint:
- `target_logprob`: mean per-token log-likelihood of the reference completion given the context (GPT-3's way of
  scoring, no sampling noise) — the number to compare across models and shot counts;
- `exact_match` / `f1`: the greedy completion (cut at the first newline) against the reference, SQuAD-style
  normalised word overlap.
Users add formats with a JSON file (`load_formats`): [{"name", "template", "separator", "examples": [[in, out]]}].
The embedded sets are tiny and Shakespeare-flavoured so the tiny CPU model sees familiar words; they measure
whether a checkpoint follows a format, not world knowledge.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.data.tasks.base import TaskError
import torch
from models.generation import SamplingParams
from models.generation import generate
from models.generation import token_logprobs

INPUT, TARGET = "{input}", "{target}"


@dataclass(frozen=True)
class PromptFormat:
    """`template` renders one example and contains {input} and, last, {target}; the query is the template cut
    just before {target}."""

    name: str
    template: str
    examples: tuple[tuple[str, str], ...]
    separator: str = "\n\n"

    def __post_init__(self) -> None:
        if INPUT not in self.template or not self.template.endswith(TARGET):
            raise TaskError(f"format {self.name!r}: template must contain {INPUT} and end with {TARGET}")
        if len(self.examples) < 2:
            raise TaskError(f"format {self.name!r}: needs at least 2 examples")
        for i, ex in enumerate(self.examples):
            if len(ex) != 2 or not all(isinstance(s, str) and s.strip() for s in ex):
                raise TaskError(f"format {self.name!r}: example {i} must be two non-empty strings [input, target]")

    def render(self, inp: str, target: str) -> str:
        return self.template.replace(INPUT, inp).replace(TARGET, target)

    def query(self, inp: str) -> str:
        return self.template[: -len(TARGET)].replace(INPUT, inp)

    def context(self, index: int, shots: int) -> str:
        """The k-shot context for example `index`: the `shots` examples after it (cyclically), then its query."""
        n = len(self.examples)
        if not 0 <= shots < n:
            raise TaskError(f"format {self.name!r}: shots must be in [0, {n - 1}], got {shots}")
        demos = [self.examples[(index + 1 + j) % n] for j in range(shots)]
        return self.separator.join([*(self.render(i, t) for i, t in demos), self.query(self.examples[index][0])])


BUILTIN: dict[str, PromptFormat] = {
    "tldr": PromptFormat("tldr", "{input}\nTL;DR:{target}", (
        ("The king is dead, and his son is crowned. The people cheer in the streets of London.",
         " A new king is crowned."),
        ("Romeo loves Juliet, but their families hate each other. They marry in secret.",
         " Two lovers marry in secret."),
        ("The storm wrecks the ship. The sailors swim to the island and are saved.",
         " The sailors survive a storm."),
        ("The duke leaves the city and gives his power to Angelo, who rules with a hard hand.",
         " Angelo rules the city."),
        ("Hamlet sees his father's ghost, who tells him he was murdered by his brother.",
         " A ghost reveals a murder."),
        ("The soldiers march all night, and at dawn they win the battle.",
         " The soldiers win the battle."),
    )),
    "qa": PromptFormat("qa", "Q: {input}\nA:{target}", (
        ("Who is the Prince of Denmark?", " Hamlet"),
        ("Who loves Juliet?", " Romeo"),
        ("Who killed Duncan?", " Macbeth"),
        ("What is the name of Lear's youngest daughter?", " Cordelia"),
        ("Who is the Moor of Venice?", " Othello"),
        ("Who is the wife of Macbeth?", " Lady Macbeth"),
    ), separator="\n"),
    "translation": PromptFormat("translation", "{input} ={target}", (
        ("good morning", " bonjour"),
        ("the king", " le roi"),
        ("my love", " mon amour"),
        ("thank you", " merci"),
        ("the sea", " la mer"),
        ("good night", " bonne nuit"),
    ), separator="\n"),
}


def load_formats(path: str | Path) -> dict[str, PromptFormat]:
    """User formats from a JSON file: a list of {"name", "template", "separator"?, "examples": [[in, out], …]}."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TaskError(f"{p}: cannot read prompt formats ({e})") from None
    if not isinstance(data, list):
        raise TaskError(f"{p}: expected a JSON list of formats")
    out = {}
    for i, f in enumerate(data):
        if not isinstance(f, dict) or not {"name", "template", "examples"} <= set(f):
            raise TaskError(f"{p}: format {i}: needs name, template and examples")
        out[f["name"]] = PromptFormat(f["name"], f["template"], tuple(tuple(e) for e in f["examples"]),
                                      f.get("separator", "\n\n"))
    return out


def normalize_answer(text: str) -> list[str]:
    """SQuAD normalisation: lower case, no punctuation, no articles (en/fr), words."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return [w for w in text.split() if w not in {"a", "an", "the", "le", "la", "les", "un", "une"}]


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def evaluate_format(model: Any, tokenizer: Any, fmt: PromptFormat, shots: int, max_new_tokens: int = 16
                    ) -> dict[str, float]:
    """k-shot evaluation of an LM checkpoint on one format (see the module docstring). model: models.gpt.GPT."""


    model.eval()
    n_ctx = model.config.n_ctx
    contexts, targets = [], []
    for i, (_, target) in enumerate(fmt.examples):
        tgt_ids = tokenizer.encode(target)
        keep = n_ctx - max(len(tgt_ids), max_new_tokens)
        contexts.append(tokenizer.encode(fmt.context(i, shots))[-keep:])  # keep the end: the query must fit
        targets.append(tgt_ids)
    logps = []
    with torch.no_grad():
        for ctx_ids, tgt_ids in zip(contexts, targets):
            seq = torch.tensor([ctx_ids + tgt_ids])
            logps.append(float(token_logprobs(model(seq[:, :-1]), seq[:, 1:])[0, len(ctx_ids) - 1:].mean()))
    # one batched greedy pass for all examples (left-padded; rows do not interact)
    gen = generate(model, contexts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
                   eos_id=tokenizer.eos_id)
    ems, f1s = [], []
    for row, mask, target in zip(gen.response_ids.tolist(), gen.response_mask.tolist(),
                                 (t for _, t in fmt.examples)):
        ids = [t for t, m in zip(row, mask) if m and t != tokenizer.eos_id]
        pred = re.split(r"\n", tokenizer.decode(ids), maxsplit=1)[0]
        ems.append(float(normalize_answer(pred) == normalize_answer(target)))
        f1s.append(token_f1(pred, target))
    n = len(fmt.examples)
    return {"target_logprob": sum(logps) / n, "exact_match": sum(ems) / n, "f1": sum(f1s) / n}


def evaluate_formats(model: Any, tokenizer: Any, formats: Sequence[PromptFormat], shots: Sequence[int],
                     max_new_tokens: int = 16) -> dict[str, float]:
    """{"format/<name>/<k>shot/<metric>": value} for every format and shot count."""
    out: dict[str, float] = {}
    for fmt in formats:
        for k in shots:
            for metric, v in evaluate_format(model, tokenizer, fmt, k, max_new_tokens).items():
                out[f"format/{fmt.name}/{k}shot/{metric}"] = v
    return out


def resolve_formats(names: Sequence[str], file: str = "") -> list[PromptFormat]:
    available = {**BUILTIN, **(load_formats(file) if file else {})}
    missing = [n for n in names if n not in available]
    if missing:
        raise TaskError(f"formats.names: unknown format(s) {missing} (available: {sorted(available)})")
    return [available[n] for n in names]


def describe(fmt: PromptFormat) -> dict[str, Any]:
    return {"name": fmt.name, "template": fmt.template, "examples": len(fmt.examples)}
