"""The demo's report: runs/<name>/report.md with PNG plots, from what the stages wrote (nothing is re-derived
that a stage measured; a missing metric is an error naming the file and key, never a blank plot).

Plots (matplotlib, Agg backend): lm_loss.png (pretraining train/validation loss, SFT loss), rm_accuracy.png
(reward-model pairwise accuracy), ppo.png (gold = labeler and proxy = RM reward, KL to the SFT policy, β),
overoptimisation.png (Gao et al. 2022: gold and proxy against √KL over training, distinct-2 over training).
Tables: the headline numbers (win rate of PPO over SFT by the labeler against the goal, gold and proxy scores,
RM accuracy, perplexity), per-stage wall time, the served request, and sample completions of the pretrained,
SFT and PPO models side by side on held-out prompts (same prompt, same sampling seed for all three).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import yaml

from cluster.metrics import read_metrics
from models.files import atomic_path


class ReportError(RuntimeError):
    """A stage's output lacks what the report needs; the message names the file and the key."""


def _series(rows: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    pts = [(r[x], r[key]) for r in rows if r.get(key) is not None and r.get(x) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _require(rows: list[dict[str, Any]], key: str, where: Path, x: str = "step") -> tuple[list[float], list[float]]:
    xs, ys = _series(rows, key, x)
    if not xs:
        raise ReportError(f"{where}/metrics.jsonl: no rows with {key!r} (and {x!r})")
    return xs, ys


def _first_present(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if any(r.get(k) is not None for r in rows)), None)


def pyplot() -> Any:
    import matplotlib  # lazy: plotting is the last step, and matplotlib costs ~0.5 s to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg")

    return plt


def plot_lm(root: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    pre, sft = root / "pretrain", root / "sft"
    pre_rows, sft_rows = read_metrics(pre), read_metrics(sft)
    ax = axes[0]
    ax.plot(*_require(pre_rows, "loss", pre), label="train")
    ax.plot(*_require(pre_rows, "val_loss", pre), "o-", label="validation (held-out documents)")
    ax.set(title="Pretraining: LM loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    ax.legend()
    ax = axes[1]
    ax.plot(*_require(sft_rows, "loss", sft), label="train (response tokens)")
    if any(r.get("val_loss") is not None for r in sft_rows):
        ax.plot(*_series(sft_rows, "val_loss"), "o-", label="validation")
    ax.set(title="SFT: LM loss on demonstrations", xlabel="step", ylabel="cross-entropy (nats/token)")
    ax.legend()
    return save_figure(fig, root / "lm_loss.png")


def plot_rm(root: Path) -> Path:
    plt = pyplot()
    rm = root / "rm"
    rows = read_metrics(rm)
    fig, ax = plt.subplots(figsize=(6, 4))
    train_key = _first_present(rows, ("accuracy", "train_accuracy", "acc"))
    if train_key is None:
        raise ReportError(f"{rm}/metrics.jsonl: no accuracy key (accuracy/train_accuracy/acc)")
    ax.plot(*_series(rows, train_key), label="train batches")
    val_key = _first_present(rows, ("val_accuracy", "heldout_accuracy"))
    if val_key:
        ax.plot(*_series(rows, val_key), "o-", label="held-out comparisons")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="chance")
    ax.set(title="Reward model: pairwise accuracy", xlabel="step", ylabel="P(r(winner) > r(loser))", ylim=(0, 1))
    ax.legend()
    return save_figure(fig, root / "rm_accuracy.png")


def plot_ppo(root: Path, kl_target: float | None) -> Path:
    plt = pyplot()
    ppo = root / "ppo"
    rows = read_metrics(ppo)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot(*_require(rows, "gold_reward", ppo, "iteration"), "o-", label="gold (labeler: VADER)")
    ax2 = ax.twinx()
    ax2.plot(*_require(rows, "proxy_reward", ppo, "iteration"), "s--", color="tab:orange", label="proxy (reward model)")
    ax.set(title="PPO: gold and proxy reward", xlabel="iteration", ylabel="gold score")
    ax2.set_ylabel("RM score")
    ax.legend(loc="upper left")
    ax2.legend(loc="lower right")
    ax = axes[1]
    ax.plot(*_require(rows, "kl", ppo, "iteration"), "o-")
    if kl_target is not None:
        ax.axhline(kl_target, color="grey", ls="--", label=f"target {kl_target:g}")
        ax.legend()
    ax.set(title="KL(policy ‖ SFT) per response", xlabel="iteration", ylabel="nats")
    ax = axes[2]
    ax.plot(*_require(rows, "beta", ppo, "iteration"), "o-")
    ax.set(title="KL coefficient β", xlabel="iteration", ylabel="β")
    return save_figure(fig, root / "ppo.png")


def algorithm_rows(root: Path, ev: dict[str, Any], state: dict[str, Any], algorithms: list[str]
                   ) -> list[dict[str, Any]]:
    """Per algorithm: the eval stage's numbers (win rate over SFT, gold, proxy, KL to SFT, distinct-2 — all from
    the one held-out evaluation) plus the stage's wall time and its training throughput (online algorithms: mean
    samples_per_s of metrics.jsonl; DPO: preference pairs per second of training)."""
    out = []
    for a in algorithms:
        win = ev.get(f"win_rate/{a}_vs_sft")
        if win is None:
            raise ReportError(f"{root}/eval/summary.json: no 'win_rate/{a}_vs_sft' (eval.models must hold {a!r})")
        if a == "dpo":
            rate = _load_json(root / "dpo" / "summary.json").get("pairs_per_s")
            unit = "pairs/s"
        else:
            rates = [r["samples_per_s"] for r in read_metrics(root / a) if r.get("samples_per_s") is not None]
            rate = sum(rates) / len(rates) if rates else None
            unit = "samples/s"
        out.append({"algorithm": a, "win_rate": win, "gold": ev.get(f"{a}/gold"), "proxy": ev.get(f"{a}/proxy"),
                    "kl": ev.get(f"{a}/kl"), "distinct2": ev.get(f"{a}/distinct2"),
                    "seconds": state.get(a, {}).get("seconds"), "rate": rate, "unit": unit})
    return out


def plot_overoptimisation(rows: list[dict[str, Any]], final: dict[str, Any] | None, path: Path,
                          label: str = "ppo") -> Path:
    """Gao et al. 2022's picture of reward over-optimisation for one RL run (its metrics.jsonl rows; `final` = the
    final held-out evaluation's metrics, or None): left, gold (labeler) and proxy (reward model) against √KL(π‖SFT)
    per response over training — the training rollouts every iteration (lines) and the held-out evaluations
    (`heldout_*` rows, markers; the final one starred); right, distinct-2 over training (held-out word bigrams
    against SFT's, and the training rollouts' token bigrams) with the repetition rate."""
    plt = pyplot()
    fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(13, 4.5))
    train = [r for r in rows if r.get("kl") is not None and r.get("iteration") is not None]
    held = [r for r in rows if r.get("heldout_kl") is not None]
    ax_p = ax.twinx()
    if train:  # one batch is noisy: running means over 5 iterations, in iteration order
        sq = [max(v, 0.0) ** 0.5 for v in _running_mean([r["kl"] for r in train])]
        gold = [r.get("gold_reward") for r in train]
        if all(g is not None for g in gold):
            ax.plot(sq, _running_mean(gold), "-", color="tab:blue", alpha=0.6, label="gold, training (mean of 5)")
        ax_p.plot(sq, _running_mean([r["proxy_reward"] for r in train]), "-", color="tab:orange", alpha=0.6,
                  label="proxy, training (mean of 5)")
    hk = [max(r["heldout_kl"], 0.0) ** 0.5 for r in held]
    if held:
        ax.plot(hk, [r.get("heldout_gold") for r in held], "o", color="tab:blue", label="gold, held-out")
        ax_p.plot(hk, [r.get("heldout_proxy") for r in held], "s", color="tab:orange", label="proxy, held-out")
    if final and final.get(f"{label}/kl") is not None:
        x = max(final[f"{label}/kl"], 0.0) ** 0.5
        for axis, key, colour in ((ax, "gold", "tab:blue"), (ax_p, "proxy", "tab:orange")):
            if final.get(f"{label}/{key}") is not None:
                axis.plot([x], [final[f"{label}/{key}"]], "*", ms=14, color=colour, label=f"{key}, final evaluation")
    ax.set(title="Gold and proxy reward vs √KL (Gao et al. 2022)", xlabel="√KL(policy ‖ SFT), √nats per response",
           ylabel="gold score (labeler)")
    ax_p.set_ylabel("proxy score (reward model)")
    ax.legend(loc="upper left", fontsize=8)
    ax_p.legend(loc="lower right", fontsize=8)
    if held:
        its = [r["heldout_iteration"] for r in held]
        ax_d.plot(its, [r.get("heldout_distinct2") for r in held], "o-", label="distinct-2, held-out (words)")
        ax_d.plot(its, [r.get("heldout_sft_distinct2") for r in held], "--", color="grey", label="SFT, held-out")
        ax_d.plot(its, [r.get("heldout_repetition") for r in held], "^-", label="repetition rate, held-out")
    tr = [r for r in train if r.get("reward/distinct2_tokens") is not None]
    if tr:
        ax_d.plot([r["iteration"] for r in tr], [r["reward/distinct2_tokens"] for r in tr], "-", alpha=0.5,
                  label="distinct-2, training rollouts (tokens)")
    if final and final.get(f"{label}/distinct2") is not None and train:
        end = train[-1]["iteration"]
        ax_d.plot([end], [final[f"{label}/distinct2"]], "*", ms=14, label="distinct-2, final evaluation")
        if final.get("sft/distinct2") is not None:
            ax_d.axhline(final["sft/distinct2"], color="black", lw=0.8, ls=":", label="SFT, final evaluation")
    ax_d.set(title="Diversity over training", xlabel="iteration", ylabel="fraction", ylim=(0, 1.02))
    ax_d.legend(loc="lower left", fontsize=8)
    return save_figure(fig, path)


def _running_mean(values: list[float], window: int = 5) -> list[float]:
    return [sum(w) / len(w) for w in (values[max(0, i - window + 1):i + 1] for i in range(len(values)))]


def plot_gold_vs_kl(root: Path, ev: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    """Gold reward against KL(model‖SFT) on the held-out prompts, one point per algorithm and the SFT model."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    points = [("sft", ev.get("sft/kl", 0.0) or 0.0, ev.get("sft/gold"))]
    points += [(r["algorithm"], r["kl"], r["gold"]) for r in rows]
    for name, kl, gold in points:
        if kl is None or gold is None:
            raise ReportError(f"{root}/eval/summary.json: no {name}/kl or {name}/gold")
        ax.scatter([kl], [gold], s=40)
        ax.annotate(name, (kl, gold), textcoords="offset points", xytext=(5, 4))
    ax.set(title="Gold reward vs KL to SFT (held-out prompts)", xlabel="KL(model ‖ SFT), nats per response",
           ylabel="gold score (labeler)")
    ax.grid(alpha=0.3)
    return save_figure(fig, root / "gold_vs_kl.png")


def save_figure(fig: Any, path: Path) -> Path:
    """A figure as a PNG, written atomically (models/files.py), then closed."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    pyplot().close(fig)
    return path


def rollout_engine(rows: list[dict[str, Any]]) -> str:
    """Which engine sampled the RL run's rollouts, and whether its log-probs were the trainer's (native) or
    recomputed by the policy (vLLM: the largest per-token gap |Δ log p| the run logged)."""
    engines = sorted({r["engine"] for r in rows if r.get("engine")})
    if not engines:
        return "–"
    gaps = [r["logprob_gap_max"] for r in rows if r.get("logprob_gap_max") is not None]
    detail = f"recomputed by the policy, max |Δ log p| {max(gaps):.2g}" if gaps else "the trainer's own"
    return f"{', '.join(engines)} ({detail})"


def side_by_side(root: Path, n: int) -> list[dict[str, Any]]:
    """The first n held-out prompts with each model's response and gold score, from the eval stage's
    samples.jsonl (every model sampled with the same seed per prompt)."""
    path = root / "eval" / "samples.jsonl"
    if n == 0:
        return []
    if not path.is_file():
        raise ReportError(f"{path}: missing (the eval stage writes it)")
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    for r in rows:
        for m in MODELS:
            if not isinstance(r.get(m), dict) or "response" not in r[m]:
                raise ReportError(f"{path}: row without a {m!r} response")
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " / ").strip() or "∅"


def fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if pct:
        return f"{100 * v:.1f}%"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_report(root: Path, cfg: Any, state: dict[str, Any], wall_seconds: float | None = None) -> dict[str, Any]:
    """Write root/report.md and its plots; returns {"path", "headline": [lines], "numbers": {...}}."""
    root = Path(root)
    ev = load_eval(root)
    ppo_cfg = _load_yaml(root / "ppo" / "config.yaml")
    kl = ppo_cfg.get("kl", {})
    kl_target = kl.get("target") if kl.get("controller") == "adaptive" else None
    plots = [plot_lm(root), plot_rm(root), plot_ppo(root, kl_target),
             plot_overoptimisation(read_metrics(root / "ppo"), ev, root / "overoptimisation.png")]
    algorithms = list(getattr(cfg, "algorithms", ["ppo"]))
    alg_rows = algorithm_rows(root, ev, state, algorithms) if len(algorithms) > 1 else []
    if alg_rows:
        plots.append(plot_gold_vs_kl(root, ev, alg_rows))
    samples = side_by_side(root, cfg.samples)
    served = _load_json(root / "serve.json")

    win = ev[WIN_KEY]
    goal = cfg.goal_win_rate
    max_kl = getattr(cfg, "goal_max_kl", None)
    kl_ok = max_kl is None or (ev.get("ppo/kl") is not None and ev["ppo/kl"] <= max_kl)
    # issue 17: the win must not come from gaming the reward model — KL within budget, no less diverse than SFT
    diverse = (ev.get("ppo/distinct2") or 0.0) >= (ev.get("sft/distinct2") or 2.0)  # a missing value fails
    met = win >= goal and kl_ok and (max_kl is None or diverse)
    verdict = "met" if met else "NOT met"
    goal_text = f"≥ {fmt(goal, True)}" + (f" at KL ≤ {max_kl:g} nats with distinct-2 ≥ SFT's" if max_kl else "")
    numbers = {"win_rate": win, "goal_win_rate": goal, **{k: ev[k] for k in EVAL_KEYS if k in ev}}
    lines = [
        f"# raygpt demo report — `{root}`", "",
        f"{time.strftime('%Y-%m-%d %H:%M')} · {os.cpu_count()} CPU cores · {platform.machine()} · "
        f"{_timing(state, wall_seconds)}", "",
        f"The InstructGPT pipeline: a GPT pretrained on the `{cfg.corpus}` corpus, fine-tuned on positive verse "
        "continuations approved by the simulated labeler (VADER), a K-wise reward model trained on the labeler's "
        "rankings of sampled responses, and PPO-ptx against that reward model. Held-out prompts were never "
        "trained on.", "",
        "## Result", "",
        "| | value |", "|---|---|",
        f"| **win rate of PPO over SFT** (labeler = VADER, held-out prompts, ties = ½) | **{fmt(win, True)}** "
        f"(goal {goal_text}: {verdict}) |",
    ]
    for key, label in GOAL_LABELS.items():
        if ev.get(key) is not None:
            lines.append(f"| {label} | {fmt(ev[key])} |")
    for key, label in EVAL_LABELS.items():
        if ev.get(key) is not None:
            lines.append(f"| {label} | {fmt(ev[key])} |")
    lines.append(f"| rollout engine of PPO (log-probs) | {rollout_engine(read_metrics(root / 'ppo'))} |")
    if alg_rows:
        lines += ["", "## Algorithms (same SFT model, same reward model, same held-out prompts and seeds)", "",
                  "| algorithm | win rate over SFT | gold | proxy | KL to SFT (nats) | distinct-2 | wall time | "
                  "throughput |", "|---|---|---|---|---|---|---|---|"]
        for r in alg_rows:
            wall = "–" if r["seconds"] is None else f"{r['seconds']:.0f} s"
            rate = "–" if r["rate"] is None else f"{r['rate']:.1f} {r['unit']}"
            lines.append(f"| {r['algorithm']} | {fmt(r['win_rate'], True)} | {fmt(r['gold'])} | "
                         f"{fmt(r['proxy'])} | {fmt(r['kl'])} | {fmt(r['distinct2'])} | {wall} | {rate} |")
        numbers["algorithms"] = {r["algorithm"]: {k: v for k, v in r.items() if k != "algorithm"} for r in alg_rows}
    lines += ["", "## Curves", "", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    lines += ["## Stages", "", "| stage | wall time | status |", "|---|---|---|"]
    for name, info in state.items():
        if isinstance(info, dict) and "status" in info and name != "report":
            lines.append(f"| {name} | {info.get('seconds', 0):.0f} s | {info['status']} |")
    if served:
        lines += ["", "## Served request (Ray Serve, OpenAI-compatible `/v1/completions`)", "",
                  f"`POST {served['url']}` `{json.dumps(served['request'])}` → `{_cell(served['completion'])}` "
                  f"in {served['latency_s']} s", ""]
    if samples:
        lines += ["## Samples on held-out prompts (same seed for all three; gold score in brackets)", "",
                  "| prompt | pretrained | SFT | PPO |", "|---|---|---|---|"]
        for s in samples:
            lines.append(f"| {_cell(s['prompt'])} | " + " | ".join(
                f"{_cell(s[m]['response'])} [{s[m].get('gold', float('nan')):+.2f}]" for m in MODELS) + " |")
        lines.append("")
    path = root / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    headline = [f"win rate of PPO over SFT (labeler, held-out): {fmt(win, True)}, KL {fmt(ev.get('ppo/kl'))} nats, "
                f"distinct-2 {fmt(ev.get('ppo/distinct2'))} (SFT {fmt(ev.get('sft/distinct2'))}) — goal {goal_text} "
                f"{verdict}"]
    return {"path": path, "headline": headline, "numbers": numbers}


# The eval stage's labels for the three models (DemoConfig wires eval.models with these) and its summary keys.
MODELS = ("pretrained", "sft", "ppo")
WIN_KEY = "win_rate/ppo_vs_sft"
EVAL_LABELS = {
    "win_rate/sft_vs_pretrained": "win rate of SFT over the pretrained model (labeler)",
    "win_rate/ppo_vs_pretrained": "win rate of PPO over the pretrained model (labeler)",
    "pretrained/gold": "gold score (VADER compound, −1…1), pretrained",
    "sft/gold": "gold score, SFT",
    "ppo/gold": "gold score, PPO",
    "pretrained/proxy": "proxy score (reward model; SFT demonstrations = 0), pretrained",
    "sft/proxy": "proxy score, SFT",
    "ppo/proxy": "proxy score, PPO",
    "rm_accuracy": "reward-model pairwise accuracy on held-out comparisons",
    "rm_accuracy_decided": "… on the pairs the labeler did not tie",
    "pretrained/ppl": "held-out perplexity, pretrained",
    "sft/ppl": "held-out perplexity, SFT",
    "ppo/ppl": "held-out perplexity, PPO",
}
# Issue 17: the numbers that show whether PPO's win comes from gaming the reward model (the goal's conditions).
GOAL_LABELS = {
    "ppo/kl": "KL(PPO ‖ SFT) per response on its held-out samples (nats)",
    "sft/distinct2": "distinct-2 (distinct word bigrams / bigrams, all samples), SFT",
    "ppo/distinct2": "distinct-2, PPO",
    "sft/repetition": "repetition rate (word bigrams repeating one earlier in the same response), SFT",
    "ppo/repetition": "repetition rate, PPO",
    "sft/response_tokens": "response length (tokens), SFT",
    "ppo/response_tokens": "response length (tokens), PPO",
}
EVAL_KEYS = tuple(EVAL_LABELS) + tuple(GOAL_LABELS)


def load_eval(root: Path) -> dict[str, Any]:
    """The eval stage's results (its summary.json)."""
    path = root / "eval" / "summary.json"
    data = _load_json(path)
    if not data:
        raise ReportError(f"{path}: missing (the eval stage writes it)")
    if data.get(WIN_KEY) is None:
        raise ReportError(f"{path}: no {WIN_KEY!r} (eval.models must hold 'sft' and 'ppo', and the task a labeler)")
    return data


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _load_yaml(path: Path) -> dict[str, Any]:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _timing(state: dict[str, Any], wall_seconds: float | None) -> str:
    stages = sum(v.get("seconds", 0) for v in state.values() if isinstance(v, dict))
    if wall_seconds is None:
        return f"stages {stages / 60:.1f} min"
    if stages > wall_seconds * 1.05:  # a resumed run: some stages ran in an earlier invocation
        return f"stages {stages / 60:.1f} min in all; this (resumed) run {wall_seconds / 60:.1f} min"
    return f"total {wall_seconds / 60:.1f} min"
