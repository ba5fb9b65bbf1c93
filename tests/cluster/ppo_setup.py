"""Artifacts for the PPO cluster tests and benchmark: a small BPE tokenizer, random `nano` SFT / reward-model
checkpoints, a prompts file and a prepared Parquet dataset for PPO-ptx — built in seconds, no hub, no training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

PROMPTS = [
    "The quick brown fox", "Now is the winter", "To be or not", "Shall I compare thee", "Friends, Romans,",
    "Once more unto the", "All the world's a", "If music be the", "Good night, good", "What light through yonder",
    "The lady doth protest", "Double, double toil", "Brevity is the soul", "Parting is such sweet",
    "We are such stuff", "Some are born great",
]


def build_artifacts(root: Path, preset: str = "nano", vocab_size: int = 512, seed: int = 0) -> dict[str, Any]:
    """tokenizer.json, sft/ (policy + reference), rm/ (reward model), prompts.txt, ptx/ (dataset) under `root`."""
    from jobs.data.corpus import load_texts
    from jobs.data.tokens import prepare
    from models.checkpoint import save_checkpoint
    from models.config import GPTConfig
    from models.gpt import GPT
    from models.heads import RewardModel
    from models.tokenizer import Tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tok_path = root / "tokenizer.json"
    if not tok_path.is_file():
        Tokenizer.train(load_texts("pydoc")[:200], vocab_size=vocab_size).save(tok_path)
    tok = Tokenizer.from_file(tok_path)
    cfg = GPTConfig.from_name(preset, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=tok.eos_id)
    torch.manual_seed(seed)
    if not (root / "sft").is_dir():
        save_checkpoint(GPT(cfg), root / "sft", kind="lm", tokenizer=tok_path)
    if not (root / "rm").is_dir():
        save_checkpoint(RewardModel(cfg), root / "rm", kind="reward", tokenizer=tok_path)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    if not (root / "ptx" / "meta.json").is_file():
        prepare("pydoc", tok_path, root / "ptx", row_tokens=256)
    return {"root": root, "tokenizer": str(tok_path), "sft": str(root / "sft"), "rm": str(root / "rm"),
            "prompts": str(prompts), "ptx": str(root / "ptx")}


def tiny_overrides(art: dict[str, Any], run_root: Path, name: str, **extra: Any) -> dict[str, Any]:
    """A PPOJobConfig dict for a fast run on the artifacts (merge `extra` on top, dotted keys allowed)."""
    from jobs.config import merge

    base: dict[str, Any] = {
        "name": name, "runs_root": str(run_root), "seed": 0, "iterations": 2, "batch_size": 8,
        # value_init = the LM: the critic's head starts fresh, which must still be identical in every run
        "policy": art["sft"], "reward_model": art["rm"], "value_init": art["sft"], "tokenizer": art["tokenizer"],
        "gold": None,
        "sampling": {"max_new_tokens": 8},
        "ptx": {"coef": 0.5, "data": art["ptx"], "batch_size": 2, "block_size": 16},
        "prompts": {"source": art["prompts"], "eval_size": 4},
        # Two data-parallel ranks for the trainers, ZeRO-1: worlds, sharded optimizer state and its checkpoints,
        # the weight gather for rollout workers and the DP weight agreement check are all exercised.
        "placement": {"cpus_per_worker": 0.25, "replicas": {"policy": 2, "value": 2}},
        "ppo": {"epochs": 2, "minibatch_size": 4, "policy_lr": 1e-3, "value_lr": 1e-3, "zero_stage": 1},
        "fault": {"stage_timeout_s": 120.0},
    }
    for key, value in extra.items():
        merge(base, key.split("."), value)
    return base


def build_gold_artifacts(root: Path, vocab_size: int = 2048, steps: int = 200, seed: int = 0) -> dict[str, Any]:
    """A word-level-ish `nano` LM for the gold-score test: a BPE tokenizer on the Shakespeare corpus (so common
    words such as " love" are single tokens) and `steps` AdamW steps of next-token training on the plays (batch
    32 × 32 tokens, ~10–30 s on 2 cores). It stands in for the SFT model: it writes word-like verse, which is all
    the test needs for the labeler's score to vary between samples."""
    import numpy as np

    from jobs.data.corpus import load_texts
    from models.checkpoint import save_checkpoint
    from models.config import GPTConfig
    from models.gpt import GPT
    from models.losses import lm_loss
    from models.tokenizer import Tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tok_path = root / "tokenizer.json"
    texts = load_texts("shakespeare")
    if not tok_path.is_file():
        Tokenizer.train(texts, vocab_size=vocab_size).save(tok_path)
    tok = Tokenizer.from_file(tok_path)
    if not (root / "sft").is_dir():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # reproducible weights across machines (and no fight with Ray's workers)
        ids = np.concatenate([np.asarray([*tok.encode(t[:200_000]), tok.eos_id]) for t in texts[:8]])
        torch.manual_seed(seed)
        cfg = GPTConfig.from_name("nano", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=tok.eos_id)
        model = GPT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - 33, (32,), generator=gen).tolist()
            x = torch.stack([torch.from_numpy(ids[s:s + 33]) for s in starts])
            loss = lm_loss(model(x[:, :-1]), x[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.set_num_threads(threads)
        save_checkpoint(model, root / "sft", kind="lm", tokenizer=tok_path)
    return {"root": root, "tokenizer": str(tok_path), "sft": str(root / "sft")}
