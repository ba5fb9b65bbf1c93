"""The reward model's objective and scoring (InstructGPT §3.5 "Reward modeling"): the K-wise ranking loss of a
batch, r(x, y) of token sequences, and the normalisation folded into the weights."""

from __future__ import annotations

from typing import Any

import torch

from models.losses import kwise_ranking_loss

REWARD_INPUT = "prompt_ids + response_ids + [eos_id]; reward read at the final EOS"



def rm_loss_fn(model: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """K-wise ranking loss of a batch from `rm_batch`: one forward pass per real response (K per prompt), then
    `kwise_ranking_loss` per group of equal K, weighted by the group's share of prompts (= mean over prompts)."""


    ids, mask, ranking, k = batch["input_ids"], batch["attention_mask"], batch["ranking"], batch["k"]
    B, kmax, _ = ids.shape
    valid = torch.arange(kmax, device=ids.device)[None, :] < k[:, None]  # (B, K_max)
    r = model(ids[valid], mask[valid])  # (Σ K,) — exactly K forward passes per prompt
    rewards = r.new_zeros((B, kmax))
    rewards[valid] = r
    loss = r.new_zeros(())
    metrics: dict[str, Any] = {"accuracy": r.new_zeros(()), "margin": r.new_zeros(())}
    for kk in sorted(set(k.tolist())):
        rows = k == kk
        group_loss, m = kwise_ranking_loss(rewards[rows, :kk], ranking[rows, :kk])
        w = rows.sum() / B
        loss = loss + w * group_loss
        for name in metrics:
            metrics[name] = metrics[name] + w * m[name]
    metrics["reward_mean"] = r.detach().mean()
    metrics["reward_std"] = r.detach().std() if r.numel() > 1 else r.new_zeros(())
    return loss, metrics




def offset_norm_name(cfg: Any) -> str:
    """The LayerNorm whose output is the reward head's input h (its bias then feeds nothing but the head):
    GPT-2's final LayerNorm, or — GPT-1 has none (post-LN blocks, Radford et al. 2018 §3.1) — the last block's
    second LayerNorm. ValueError for a layout where h does not end in a LayerNorm (pre-LN without final LN)."""
    if cfg.final_ln:
        return "transformer.ln_f"
    if cfg.ln_placement == "post":
        return f"transformer.h.{cfg.n_layer - 1}.ln_2"
    raise ValueError("init_from: a pre-LN model without a final LayerNorm has no bias feeding only the reward "
                     "head, so the reward normalisation cannot be folded into its weights")


def fold_reward_offset(model: Any, offset: float) -> None:
    """Make r'(x) = r(x) − offset for every input, inside the weights.

    The head score(h) = w·h has no bias (GPT2ForSequenceClassification's layout), but h ends with a LayerNorm's
    bias β (`offset_norm_name`: LN_f, or GPT-1's last ln_2), which in a reward model feeds nothing but the head.
    β ← β − offset·w/‖w‖² gives w·h' = w·h − offset exactly, for every position, in any framework that loads
    the weights.
    """

    norm = model.get_submodule(offset_norm_name(model.config))
    with torch.no_grad():
        w = model.score.weight[0]
        norm.bias -= offset * w / w.dot(w)
