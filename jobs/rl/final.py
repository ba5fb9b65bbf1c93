"""End of a PPO run: export the policy as a Hugging Face GPT-2 directory, compare it with the SFT model on held-out
prompts (gold score, win rate by the gold labeler, proxy reward, KL to SFT), and write report.md + summary.json.

The comparison is the one held-out evaluation (jobs/rlhf/evaluation.py `compare_models`): both models sample the
same held-out prompts with the same per-prompt seeds and the training sampling parameters. Win rate =
P(gold(PPO) > gold(SFT)) + ½·P(tie), per prompt. KL is the sequence-level estimate Σ_t log π_PPO(a_t) − log
π_SFT(a_t) over the PPO model's own samples (k1, unbiased for KL(π_PPO‖π_SFT)).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.base import (
    WeightsMessage,
    weights_checksum,
)
from cluster.metrics import read_metrics
from jobs.report import fmt, plot_overoptimisation, pyplot, save_figure
from jobs.rl.config import PPOJobConfig
from jobs.rl.inputs import GoldFn, PromptSet
from jobs.rlhf.evaluation import evaluate_checkpoints
from models.checkpoint import read_config, save_checkpoint
from models.gpt import GPT

EVAL_SALT = 7_777  # keeps evaluation seeds apart from the training iterations' seeds


def policy_model(message: WeightsMessage, policy_dir: str) -> GPT:
    """The policy's weights (a WeightsMessage) as a GPT of the SFT checkpoint's config; checksum verified."""
    model = GPT(read_config(policy_dir)[0])
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in message.state.items()}, strict=True)
    if weights_checksum(model.state_dict()) != message.checksum:
        raise RuntimeError("export: the policy's weights changed in transit (checksum mismatch)")
    return model


def export_policy(message: WeightsMessage, cfg: PPOJobConfig, path: Path, tokenizer_path: str) -> Path:
    """Write the policy's final weights as an HF GPT-2 directory (atomically; checksum verified)."""
    model = policy_model(message, cfg.policy)
    return save_checkpoint(model, path, kind="lm", tokenizer=tokenizer_path,
                           extra={"ppo": {"weight_version": message.version, "checksum": message.checksum}})


def heldout_eval(cfg: PPOJobConfig, tok: Any, ppo_dir: Path, sft_dir: str, gold: GoldFn | None) -> dict[str, Any]:
    """The final policy against the SFT model on held-out prompts, through the one held-out evaluation
    (jobs/rlhf/evaluation.py): `raygpt eval` on the same checkpoints, prompts, sampling and seed gives the same
    numbers. Keys: the evaluation's metrics (`ppo/gold`, `win_rate/ppo_vs_sft`, `ppo/kl`, …) plus samples."""
    source = cfg.prompts.eval_source or cfg.prompts.source
    prompts = PromptSet.load(cfg, tok, cfg.prompts.eval_split, source=source, limit=cfg.prompts.eval_size)
    label = cfg.algorithm  # "ppo", "grpo", …: keys ppo/gold, win_rate/grpo_vs_sft, …
    rms = cfg.reward_models()  # the proxy score is the first reward model of the composed reward, if any
    comparison = evaluate_checkpoints({"sft": sft_dir, label: ppo_dir}, prompts.texts, cfg.sampling, cfg.seed,
                                      gold=gold, reward_model=rms[0] if rms else None, kl_reference="sft")
    result: dict[str, Any] = {"prompts": len(prompts), "split": cfg.prompts.eval_split, "label": label,
                              **comparison.metrics}
    result["samples"] = [{"prompt": r["prompt"], "sft": r["sft"]["response"], "ppo": r[label]["response"]}
                         for r in comparison.rows()[:5]]
    return result


REPORT_COLUMNS = ("iteration", "gold_reward", "proxy_reward", "kl", "beta", "entropy", "clipfrac", "approx_kl",
                  "value_error", "vf_clipfrac", "ptx_loss", "samples_per_s", "recoveries")


def write_report(run_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json, report.md (per-iteration table + held-out comparison) and curves.png."""
    every = read_metrics(run_dir)
    rows = [r for r in every if r.get("iteration") is not None]  # training rows (heldout_* rows: the monitor's)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    cols = [c for c in REPORT_COLUMNS if any(c in r for r in rows)]
    lines = ["# PPO report", "", f"Run `{run_dir}`; final policy: `{summary.get('checkpoint')}`.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    ev = summary.get("eval")
    if ev:
        lines += ["", f"## Held-out comparison ({ev['prompts']} prompts, split {ev['split']})", ""]
        a = ev.get("label", "ppo")
        for key in ("sft/gold", f"{a}/gold", f"win_rate/{a}_vs_sft", "sft/proxy", f"{a}/proxy", f"{a}/kl",
                    "sft/response_tokens", f"{a}/response_tokens", "sft/distinct2", f"{a}/distinct2",
                    "sft/repetition", f"{a}/repetition"):
            if key in ev:
                lines.append(f"- {key}: {fmt(ev[key])}")
        lines += ["", "| prompt | SFT | PPO |", "|---|---|---|"]
        lines += [f"| {s['prompt']!r} | {s['sft']!r} | {s['ppo']!r} |" for s in ev.get("samples", [])]
    if summary.get("stopped_at"):
        lines += ["", f"Stopped early after iteration {summary['stopped_at']}: {summary['stop_reason']}."]
    if rows:
        lines += ["", "![over-optimisation](overoptimisation.png)"]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    if rows:
        plt = pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
        x = [r["iteration"] for r in rows]
        for ax, keys in zip(axes, (("gold_reward", "proxy_reward"), ("kl",), ("beta",))):
            for k in keys:
                ys = [r.get(k) for r in rows]
                if any(y is not None for y in ys):
                    ax.plot(x, [np.nan if y is None else y for y in ys], label=k)
            ax.set_xlabel("iteration")
            ax.legend()
        save_figure(fig, run_dir / "curves.png")
        plot_overoptimisation(every, ev or None, run_dir / "overoptimisation.png", (ev or {}).get("label", "ppo"))
