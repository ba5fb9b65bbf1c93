"""End of a PPO run: export the policy as a Hugging Face GPT-2 directory, compare it with the SFT model on held-out
prompts (gold score, win rate by the gold labeler, proxy reward, KL to SFT), and write report.md + summary.json.

The comparison samples both models on the same held-out prompts with the same per-row seeds and the training
temperature. Win rate = P(gold(PPO) > gold(SFT)) + ½·P(tie), per prompt. KL is the sequence-level estimate
Σ_t log π_PPO(a_t) − log π_SFT(a_t) over the PPO model's own samples (k1, unbiased for KL(π_PPO‖π_SFT)).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.base import (
    WeightsMessage,
    load_model,
    response_logits,
    response_logprobs,
    weights_checksum,
)
from actors.base import sample_rollout as _sample
from actors.reward import decode_rollout
from cluster.metrics import read_metrics
from jobs.rl.config import PPOJobConfig, abspath
from jobs.rl.inputs import GoldFn, PromptSet
from models.checkpoint import read_config, save_checkpoint
from models.gpt import GPT
from models.seeding import derive_seed

EVAL_SALT = 7_777  # keeps evaluation seeds apart from the training iterations' seeds


def export_policy(message: WeightsMessage, cfg: PPOJobConfig, path: Path, tokenizer_path: str) -> Path:
    """Write the policy's final weights as an HF GPT-2 directory (atomically; checksum verified)."""
    model_cfg, _, _ = read_config(cfg.policy)
    model = GPT(model_cfg)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in message.state.items()}, strict=True)
    if weights_checksum(model.state_dict()) != message.checksum:
        raise RuntimeError("export: the policy's weights changed in transit (checksum mismatch)")
    return save_checkpoint(model, path, kind="lm", tokenizer=tokenizer_path,
                           extra={"ppo": {"weight_version": message.version, "checksum": message.checksum}})


@torch.no_grad()
def heldout_eval(cfg: PPOJobConfig, tok: Any, ppo_dir: Path, sft_dir: str, gold: GoldFn | None) -> dict[str, Any]:
    source = cfg.prompts.eval_source or cfg.prompts.source
    prompts = PromptSet.load(cfg, tok, cfg.prompts.eval_split, source=source, limit=cfg.prompts.eval_size)
    s = sampling = cfg.sampling
    rows = list(range(len(prompts)))
    seeds = [derive_seed(cfg.seed, EVAL_SALT, r) for r in rows]
    ppo, sft = load_model(str(ppo_dir), "lm").eval(), load_model(sft_dir, "lm").eval()
    out_ppo = _sample(ppo, prompts.ids, rows, seeds, sampling, tok.eos_id, 0, "")
    out_sft = _sample(sft, prompts.ids, rows, seeds, sampling, tok.eos_id, 0, "")
    kl = (response_logprobs(response_logits(ppo, out_ppo), out_ppo, s.temperature)
          - response_logprobs(response_logits(sft, out_ppo), out_ppo, s.temperature)).sum(1)
    result: dict[str, Any] = {"prompts": len(prompts), "split": cfg.prompts.eval_split,
                              "kl_ppo_sft": float(kl.mean()),
                              "response_len_ppo": float(out_ppo.action_mask.sum(1).float().mean()),
                              "response_len_sft": float(out_sft.action_mask.sum(1).float().mean())}
    texts_ppo = decode_rollout(out_ppo, tok.decode, tok.eos_id)
    texts_sft = decode_rollout(out_sft, tok.decode, tok.eos_id)
    if gold is not None:
        g_ppo = np.asarray(gold(prompts.texts, texts_ppo[1]), dtype=float)
        g_sft = np.asarray(gold(prompts.texts, texts_sft[1]), dtype=float)
        result.update(gold_ppo=float(g_ppo.mean()), gold_sft=float(g_sft.mean()),
                      win_rate=float(np.mean((g_ppo > g_sft) + 0.5 * (g_ppo == g_sft))))
    if cfg.reward_model is not None:
        rm = load_model(abspath(cfg.reward_model) or "", "reward").eval()
        result.update(proxy_ppo=float(rm(out_ppo.input_ids, out_ppo.attention_mask).mean()),
                      proxy_sft=float(rm(out_sft.input_ids, out_sft.attention_mask).mean()))
    result["samples"] = [{"prompt": p, "sft": a, "ppo": b}
                         for p, a, b in list(zip(prompts.texts, texts_sft[1], texts_ppo[1]))[:5]]
    return result


REPORT_COLUMNS = ("iteration", "gold_reward", "proxy_reward", "kl", "beta", "entropy", "clipfrac", "approx_kl",
                  "value_error", "vf_clipfrac", "ptx_loss", "samples_per_s", "recoveries")


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def write_report(run_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json, report.md (per-iteration table + held-out comparison) and curves.png."""
    rows = read_metrics(run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    cols = [c for c in REPORT_COLUMNS if any(c in r for r in rows)]
    lines = ["# PPO report", "", f"Run `{run_dir}`; final policy: `{summary.get('checkpoint')}`.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    ev = summary.get("eval")
    if ev:
        lines += ["", f"## Held-out comparison ({ev['prompts']} prompts, split {ev['split']})", ""]
        for key in ("gold_sft", "gold_ppo", "win_rate", "proxy_sft", "proxy_ppo", "kl_ppo_sft", "response_len_sft",
                    "response_len_ppo"):
            if key in ev:
                lines.append(f"- {key}: {_fmt(ev[key])}")
        lines += ["", "| prompt | SFT | PPO |", "|---|---|---|"]
        lines += [f"| {s['prompt']!r} | {s['sft']!r} | {s['ppo']!r} |" for s in ev.get("samples", [])]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    if rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
        x = [r["iteration"] for r in rows]
        for ax, keys in zip(axes, (("gold_reward", "proxy_reward"), ("kl",), ("beta",))):
            for k in keys:
                ys = [r.get(k) for r in rows]
                if any(y is not None for y in ys):
                    ax.plot(x, [np.nan if y is None else y for y in ys], label=k)
            ax.set_xlabel("iteration")
            ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "curves.png", dpi=80)
        plt.close(fig)
