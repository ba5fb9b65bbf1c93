"""The other models of the source document, measured (docs/MODELS.md; section "Models: GPT-1, T5, ELMo" of
docs/BENCHMARKS.md).

1. Pretraining: configs/pretrain-{gpt1,t5,elmo}-tiny.yaml through `raygpt pretrain` on the embedded Shakespeare
   corpus (data/shakespeare, 4,096-token BPE), `STEPS` optimizer steps each, one Ray Train worker: held-out
   loss before and after (GPT-1: next-token perplexity; T5: the span-corruption loss on held-out windows, a
   different task — not comparable to a perplexity; ELMo: mean of the forward and backward NLL), throughput.
2. The ELMo probe (Peters et al. 2018 §3.3 / §5, "contextual features help"): verse lines of the embedded task's
   held-in documents (jobs/data/tasks/positive_verse.py, one line each), labelled by its labeller (VADER compound
   ≥ 0.3 positive, ≤ −0.3 negative; lines in between dropped), balanced, split in halves by a hash of the line.
   Frozen features of the trained ELMo (and, as a control, of the same architecture at random init), mean-pooled
   over each line's tokens, standardised; a logistic-regression probe (models/elmo_probe.py `train_probe`, its
   defaults) over the token layer alone vs the learned scalar mix of all layers. Accuracy on the held-out half.
   The protocol is fixed here and reported as it comes out; it is not tuned toward an answer.

`python -m benchmarks.models` (trains runs/bench-<model>-tiny/ if missing; `--retrain` to redo).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ROOT, write_section

STEPS = 200
CONFIGS = {"GPT-1": "pretrain-gpt1-tiny.yaml", "T5": "pretrain-t5-tiny.yaml", "ELMo": "pretrain-elmo-tiny.yaml"}
PER_CLASS = 1500  # per class and split: 3,000 training and 3,000 held-out lines when the corpus has them
THRESHOLD = 0.3
MAX_TOKENS = 64


def run_dir(label: str) -> Path:
    return ROOT / "runs" / f"bench-{label.lower().replace('-', '')}-tiny"


def pretrain(label: str, retrain: bool) -> dict[str, Any]:
    from cluster.metrics import read_metrics
    from jobs.pretrain import JOB

    d = run_dir(label)
    if retrain or not (d / "checkpoint" / "config.json").is_file():
        import shutil

        shutil.rmtree(d, ignore_errors=True)
        sets = [f"name={d.name}", f"runs_root={d.parent}", f"optim.max_steps={STEPS}", "parallel.num_workers=1",
                "parallel.cpus_per_worker=2", f"checkpoint.every_n_steps={STEPS}", "eval.every_n_steps=100"]
        argv = ["--config", str(ROOT / "configs" / CONFIGS[label]), *(a for s in sets for a in ("--set", s))]
        if JOB.main(argv) != 0:
            raise RuntimeError(f"raygpt pretrain {' '.join(argv)} failed")
    rows = read_metrics(d)
    vals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    last = [r for r in rows if "loop_tokens_per_s" in r][-1]
    summary = json.loads((d / "summary.json").read_text())
    return {"vals": vals, "tokens_per_s": last["loop_tokens_per_s"], "wall": summary["wall_seconds"],
            "steps": last["step"], "tokens": last["tokens"]}


def labelled_lines() -> tuple[list[str], list[int], list[str], list[int]]:
    """(train texts, labels, test texts, labels): balanced, |VADER compound| ≥ THRESHOLD, split by hash."""
    from jobs.data.tasks.base import stable_unit
    from jobs.data.tasks.positive_verse import PositiveVerseTask

    task = PositiveVerseTask(response_lines=1)
    texts = list(dict.fromkeys(v.prompt + v.continuation for v in task.lines))
    scores = task.labeler.scores(texts)
    splits: dict[str, dict[int, list[str]]] = {"train": {0: [], 1: []}, "test": {0: [], 1: []}}
    for t, s in sorted(zip(texts, scores), key=lambda ts: stable_unit(ts[0], "order")):
        if abs(s) >= THRESHOLD:
            splits["test" if stable_unit(t, "split") < 0.5 else "train"][int(s > 0)].append(t)
    n = min(PER_CLASS, *(len(v) for s in splits.values() for v in s.values()))
    out: list[Any] = []
    for name in ("train", "test"):
        xs = splits[name][0][:n] + splits[name][1][:n]
        out += [xs, [0] * n + [1] * n]
    return out[0], out[1], out[2], out[3]


@torch.no_grad()
def features(model: Any, tokenizer: Any, texts: list[str], batch: int = 256) -> torch.Tensor:
    """(N, L+1, 2·d_model): each layer of ELMo mean-pooled over the line's tokens."""
    from models.elmo_probe import pool_layers

    model.eval()
    out = []
    for i in range(0, len(texts), batch):
        ids = [tokenizer.encode(t)[:MAX_TOKENS] or [tokenizer.eos_id] for t in texts[i:i + batch]]
        T = max(len(x) for x in ids)
        x = torch.zeros(len(ids), T, dtype=torch.long)
        m = torch.zeros(len(ids), T, dtype=torch.long)
        for r, row in enumerate(ids):
            x[r, :len(row)] = torch.tensor(row)
            m[r, :len(row)] = 1
        out.append(pool_layers(model.layers(x, m), m))
    return torch.cat(out)


def probe(checkpoint: Path) -> dict[str, Any]:
    from models.elmo_probe import train_probe
    from models.registry import build_model, load_model
    from models.tokenizer import Tokenizer

    tok = Tokenizer.from_file(checkpoint / "tokenizer.json")
    trained = load_model(checkpoint)
    torch.manual_seed(0)
    random = build_model(trained.config, tok)
    xtr, ytr, xte, yte = labelled_lines()
    ytr_t, yte_t = torch.tensor(ytr), torch.tensor(yte)
    res: dict[str, Any] = {"train_lines": len(xtr), "test_lines": len(xte)}
    for name, model in (("trained", trained), ("random", random)):
        ftr, fte = features(model, tok, xtr), features(model, tok, xte)
        for layers, sel in (("token", slice(0, 1)), ("mix", slice(None))):
            r = train_probe(ftr[:, sel], ytr_t, fte[:, sel], yte_t, 2)
            res[f"{name}/{layers}"] = {"test": float(r.test_accuracy), "train": float(r.train_accuracy),
                                       "weights": [round(float(w), 3) for w in r.mix_weights],
                                       "gamma": float(r.gamma)}
        top = train_probe(ftr[:, -1:], ytr_t, fte[:, -1:], yte_t, 2)
        res[f"{name}/top"] = {"test": float(top.test_accuracy), "train": float(top.train_accuracy)}
    return res


def main(argv: list[str] | None = None) -> None:
    from benchmarks.pretrain import ensure_data

    retrain = "--retrain" in (argv or [])
    ensure_data()  # data/shakespeare and runs/tokenizer/tokenizer.json, as the configs expect
    runs = {label: pretrain(label, retrain) for label in CONFIGS}
    p = probe(run_dir("ELMo") / "checkpoint")
    print(json.dumps({"pretrain": runs, "probe": p}, indent=1), flush=True)
    what = {"GPT-1": "next-token loss (perplexity)", "T5": "span-corruption loss (target tokens)",
            "ELMo": "biLM loss, mean of forward and backward NLL (perplexity)"}
    rows = []
    for label, r in runs.items():
        v0, v1 = r["vals"][0][1], r["vals"][-1][1]
        rows.append(f"| {label} | `configs/{CONFIGS[label]}` | {what[label]} | {v0:.3f}{_ppl(label, v0)} | "
                    f"{v1:.3f}{_ppl(label, v1)} | {r['tokens']:,} | {r['tokens_per_s']:,.0f} | {r['wall']:.0f} s |")
    pr = []
    for name in ("trained", "random"):
        t, m, top = p[f"{name}/token"], p[f"{name}/mix"], p[f"{name}/top"]
        pr.append(f"| {name} ELMo | {t['test']:.3f} ({t['train']:.3f}) | {top['test']:.3f} ({top['train']:.3f}) | "
                  f"{m['test']:.3f} ({m['train']:.3f}) | {', '.join(map(str, m['weights']))}; γ {m['gamma']:.2f} |")
    write_section("Models: GPT-1, T5, ELMo (benchmarks/models.py)", f"""
**Pretraining.** Each tiny config through `raygpt pretrain` on the embedded Shakespeare corpus (4,096-token BPE),
{STEPS} optimizer steps, micro-batch 16, 1 Ray Train worker (2 CPUs), DeepSpeed ZeRO-1, fp32. Held-out loss on the
validation documents at step 0 and at the end (4 batches). The three losses measure different tasks: T5's is
the cross-entropy of span-corruption targets (sentinels + dropped spans), ELMo's the mean of its two directions'
NLL on 64-token windows; only GPT-1's is a next-token perplexity on 128-token windows.

| model | config | held-out loss | step 0 | step {STEPS} | tokens | tokens/s | wall (incl. Ray start, export) |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

**ELMo probe** (Peters et al. 2018 §3.3: frozen biLM, learned scalar mix γ·Σ softmax(s)_j h_j, small classifier).
Verse lines of the embedded task's held-in plays, labelled by its labeller (VADER compound ≥ {THRESHOLD} positive,
≤ −{THRESHOLD} negative), balanced: {p['train_lines']:,} training and {p['test_lines']:,} held-out lines (split by a
hash of the line; chance = 0.5). Features mean-pooled over each line's tokens (≤ {MAX_TOKENS}), standardised,
logistic regression (full-batch Adam, 300 steps, `models/elmo_probe.py` defaults). Held-out accuracy (training
accuracy in brackets):

| features of | token layer alone | top LSTM layer alone | ELMo scalar mix of all layers | mix weights (0, 1, 2) |
|---|---|---|---|---|
{chr(10).join(pr)}

Reported as measured, protocol untuned: the claim holds here only if the trained ELMo's mix beats its token
layer by more than the random-init control's mix beats its own (a random LSTM's features are already a
contextual random projection). Mix − token layer: trained {_gain(p, "trained"):+.3f}, random control \
{_gain(p, "random"):+.3f}; one standard error of a held-out accuracy here ≈ {_se(p):.3f}.
""")


def _gain(p: dict[str, Any], name: str) -> float:
    return p[f"{name}/mix"]["test"] - p[f"{name}/token"]["test"]


def _se(p: dict[str, Any]) -> float:
    acc = p["trained/mix"]["test"]
    return (acc * (1 - acc) / p["test_lines"]) ** 0.5


def _ppl(label: str, loss: float) -> str:
    return "" if label == "T5" else f" (ppl {torch.tensor(loss).exp():,.0f})"


if __name__ == "__main__":
    main(sys.argv[1:])
