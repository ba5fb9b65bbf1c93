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
3. T5 text-to-text fine-tuning (Raffel et al. 2020 §2.4): the pretrained T5 of step 1 through `raygpt sft` on the
   embedded task's demonstrations (task prefix "continue: ", the job's defaults otherwise, one worker): held-out
   demonstration loss before and after, and the labeller's (gold) score of the init and SFT models' responses to
   128 held-out prompts, sampled (the job's own evaluation) and greedy (`compare_models` again, temperature 0).

`python -m benchmarks.models` (trains runs/bench-<model>-tiny/ if missing; `--retrain` to redo);
`python -m benchmarks.models --t5-sft` measures and writes step 3 only; `--elmo-steps N` repeats step 2 on an
ELMo pretrained N steps (runs/bench-elmo-tiny-N/).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ROOT, write_section

STEPS = 200
SFT_STEPS = 300  # raygpt sft's default max_steps
CONFIGS = {"GPT-1": "pretrain-gpt1-tiny.yaml", "T5": "pretrain-t5-tiny.yaml", "ELMo": "pretrain-elmo-tiny.yaml"}
PER_CLASS = 1500  # per class and split: 3,000 training and 3,000 held-out lines when the corpus has them
THRESHOLD = 0.3
MAX_TOKENS = 64


def run_dir(label: str, steps: int = STEPS) -> Path:
    return ROOT / "runs" / f"bench-{label.lower().replace('-', '')}-tiny{'' if steps == STEPS else f'-{steps}'}"


def pretrain(label: str, retrain: bool, steps: int = STEPS) -> dict[str, Any]:
    from cluster.metrics import read_metrics
    from jobs.pretrain import JOB

    d = run_dir(label, steps)
    if retrain or not (d / "checkpoint" / "config.json").is_file():
        import shutil

        shutil.rmtree(d, ignore_errors=True)
        sets = [f"name={d.name}", f"runs_root={d.parent}", f"optim.max_steps={steps}", "parallel.num_workers=1",
                "parallel.cpus_per_worker=2", f"checkpoint.every_n_steps={steps}", "eval.every_n_steps=100"]
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


def t5_sft(retrain: bool) -> dict[str, Any]:
    """`raygpt sft` on the step-1 T5 (runs/bench-t5-sft); val loss, sampled and greedy gold, before and after."""
    from actors.engines.t5 import TextToTextEngine
    from cluster.metrics import read_metrics
    from jobs.data.tasks import TaskConfig, build_task
    from jobs.rlhf.evaluation import compare_models
    from jobs.sft import JOB
    from models.generation import SamplingParams
    from models.registry import load_model
    from models.tokenizer import Tokenizer

    init, d = run_dir("T5") / "checkpoint", ROOT / "runs" / "bench-t5-sft"
    load_before = os.getloadavg()[0]
    if retrain or not (d / "checkpoint" / "config.json").is_file():
        import shutil

        shutil.rmtree(d, ignore_errors=True)
        sets = [f"name={d.name}", f"runs_root={d.parent}", f"init_from={init}", f"optim.max_steps={SFT_STEPS}",
                "parallel.num_workers=1", "parallel.cpus_per_worker=2", f"checkpoint.every_n_steps={SFT_STEPS}"]
        if JOB.main([a for s in sets for a in ("--set", s)]) != 0:
            raise RuntimeError(f"raygpt sft {' '.join(sets)} failed")
    summary = json.loads((d / "summary.json").read_text())
    task = build_task(TaskConfig())
    prompts = task.prompts("heldout")[:128]
    tok = Tokenizer.from_file(init / "tokenizer.json")
    models = {"init": load_model(init), "sft": load_model(d / "checkpoint")}
    prefix = tok.encode(summary["task_prefix"])
    greedy = compare_models(models, tok, prompts, SamplingParams(max_new_tokens=24, temperature=0.0), 0,
                            gold=task.gold_scores, engines={k: TextToTextEngine(m, prefix) for k, m in models.items()})
    vals = [(r["step"], r["val_loss"]) for r in read_metrics(d) if "val_loss" in r]
    empty = {k: sum(not r.strip() for r in v) / len(v) for k, v in greedy.responses.items()}
    return {"vals": vals, "summary": summary, "greedy": greedy.metrics, "empty": empty,
            "examples": [greedy.rows()[i] for i in range(3)], "load": (load_before, os.getloadavg()[0])}


def t5_sft_section(r: dict[str, Any]) -> None:
    s, g = r["summary"], r["greedy"]
    (s0, v0), (s1, v1) = r["vals"][0], r["vals"][-1]
    examples = "\n".join(f"| {e['prompt']!r} | {e['init']['response']!r} ({e['init']['gold']:+.2f}) | "
                         f"{e['sft']['response']!r} ({e['sft']['gold']:+.2f}) |" for e in r["examples"])
    write_section("T5 text-to-text fine-tuning (benchmarks/models.py --t5-sft)", f"""
The T5 of "Models: GPT-1, T5, ELMo" (`t5-tiny`, {STEPS} span-corruption steps) through `raygpt sft` (Raffel et al.
2020 §2.4): encoder input = task prefix {s['task_prefix']!r} + prompt + EOS, target = response + EOS, on
{s['train']:,} demonstrations of the embedded positive-verse task ({s['val']} held out), {SFT_STEPS} steps,
micro-batch 16, 1 Ray Train worker (2 CPUs), DeepSpeed ZeRO-1, fp32, {s['train_seconds']:.0f} s (incl. Ray start
and export; 1-minute load average {r['load'][0]:.1f} before, {r['load'][1]:.1f} after: a shared machine). Gold = the
task's labeller (VADER compound of the response, −1..1) on 128 held-out prompts; sampled = the job's own
evaluation (temperature 1, seed 0), greedy = temperature 0.

| | held-out demonstration loss | gold, sampled | gold, greedy | distinct-2, greedy | response tokens, greedy |
|---|---|---|---|---|---|
| init (pretrained, step {s0}) | {v0:.3f} | {s['gold_heldout_init']:+.3f} | {g['init/gold']:+.3f} | \
{g['init/distinct2']:.3f} | {g['init/response_tokens']:.1f} |
| after SFT (step {s1}) | {v1:.3f} | {s['gold_heldout_sft']:+.3f} | {g['sft/gold']:+.3f} | {g['sft/distinct2']:.3f} | \
{g['sft/response_tokens']:.1f} |

Greedy win rate of the SFT model over the init model (gold, ties ½): {g['win_rate/sft_vs_init']:.3f}. The
pretrained T5 has only decoded span-corruption targets (sentinel, span, sentinel, …; sentinels decode to no text):
{r['empty']['init']:.0%} of its greedy responses are empty or whitespace only, {r['empty']['sft']:.0%} after SFT
(such a response scores 0). First held-out prompts, greedy (gold in brackets):

| prompt | init | after SFT |
|---|---|---|
{examples}
""")


def main(argv: list[str] | None = None) -> None:
    from benchmarks.pretrain import ensure_data

    retrain = "--retrain" in (argv or [])
    ensure_data()  # data/shakespeare and runs/tokenizer/tokenizer.json, as the configs expect
    if "--elmo-steps" in (argv or []):  # the probe again on a biLM pretrained longer (same protocol)
        steps = int((argv or [])[(argv or []).index("--elmo-steps") + 1])
        load = os.getloadavg()[0]
        elmo_section(steps, pretrain("ELMo", retrain, steps), probe(run_dir("ELMo", steps) / "checkpoint"), load)
        return
    if "--t5-sft" in (argv or []):
        pretrain("T5", False)
        t5_sft_section(t5_sft(retrain))
        return
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
{_probe_rows(p)}

Reported as measured, protocol untuned: the claim holds here only if the trained ELMo's mix beats its token
layer by more than the random-init control's mix beats its own (a random LSTM's features are already a
contextual random projection). Mix − token layer: trained {_gain(p, "trained"):+.3f}, random control \
{_gain(p, "random"):+.3f}; one standard error of a held-out accuracy here ≈ {_se(p):.3f}.
""")
    t5_sft_section(t5_sft(retrain))


def elmo_section(steps: int, run: dict[str, Any], p: dict[str, Any], load: float) -> None:
    v0, v1 = run["vals"][0][1], run["vals"][-1][1]
    write_section(f"ELMo probe after {steps} biLM steps (benchmarks/models.py --elmo-steps {steps})", f"""
The probe of "Models: GPT-1, T5, ELMo", protocol unchanged, on `configs/pretrain-elmo-tiny.yaml` pretrained
{steps} steps instead of {STEPS} (held-out biLM loss {v0:.3f} → {v1:.3f}, ppl {math.exp(v1):,.0f};
{run['wall']:.0f} s; 1-minute load average {load:.1f} before, {os.getloadavg()[0]:.1f} after).
{p['train_lines']:,} / {p['test_lines']:,} lines; held-out accuracy (training accuracy):

| features of | token layer alone | top LSTM layer alone | ELMo scalar mix of all layers | mix weights (0, 1, 2) |
|---|---|---|---|---|
{_probe_rows(p)}

Mix − token layer: trained {_gain(p, "trained"):+.3f}, random control {_gain(p, "random"):+.3f}; one standard error ≈
{_se(p):.3f}.
""")


def _probe_rows(p: dict[str, Any]) -> str:
    rows = []
    for name in ("trained", "random"):
        t, m, top = p[f"{name}/token"], p[f"{name}/mix"], p[f"{name}/top"]
        rows.append(f"| {name} ELMo | {t['test']:.3f} ({t['train']:.3f}) | {top['test']:.3f} ({top['train']:.3f}) | "
                    f"{m['test']:.3f} ({m['train']:.3f}) | {', '.join(map(str, m['weights']))}; γ {m['gamma']:.2f} |")
    return "\n".join(rows)


def _gain(p: dict[str, Any], name: str) -> float:
    return p[f"{name}/mix"]["test"] - p[f"{name}/token"]["test"]


def _se(p: dict[str, Any]) -> float:
    acc = p["trained/mix"]["test"]
    return (acc * (1 - acc) / p["test_lines"]) ** 0.5


def _ppl(label: str, loss: float) -> str:
    return "" if label == "T5" else f" (ppl {torch.tensor(loss).exp():,.0f})"


if __name__ == "__main__":
    main(sys.argv[1:])
