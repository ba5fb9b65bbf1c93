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


def build_artifacts(root: Path, preset: str = "nano", vocab_size: int = 512, seed: int = 0, **model: Any
                    ) -> dict[str, Any]:
    """tokenizer.json, sft/ (policy + reference), rm/ (reward model), prompts.txt, ptx/ (dataset) under `root`;
    `model` overrides fields of the preset (e.g. n_head=1 for a head size vLLM's CPU kernels support)."""
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
    cfg = GPTConfig.from_name(preset, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=tok.eos_id,
                              **model)
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


def build_learned_rm(gold_art: dict[str, Any], k: int = 4, prompts: int = 2048, steps: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """A reward model learned from the labeller's preferences, the InstructGPT way but tiny and in one process:
    the SFT model of `build_gold_artifacts` samples k responses to `prompts` train prompts of the task, VADER picks
    the best and the worst (prompts whose samples all score the same are dropped), and a RewardModel initialised
    from the SFT model (fresh scalar head) trains `steps` AdamW steps on the ranking loss of the RM job
    (`rm_batch` + `rm_loss_fn`, 16 comparisons a step). Returns the artifacts plus "rm" and "rm_heldout_accuracy"
    (pairwise accuracy on the comparisons of 512 held-out prompts). ~15 s on 2 cores."""
    from jobs.data.examples import encode_example, rm_batch
    from jobs.data.tasks.positive_verse import PositiveVerseTask
    from jobs.rlhf.reward_model import rm_loss_fn
    from models.checkpoint import load_checkpoint, save_checkpoint
    from models.generation import SamplingParams, generate
    from models.tokenizer import Tokenizer

    root = Path(gold_art["root"])
    task = PositiveVerseTask()
    tok = Tokenizer.from_file(gold_art["tokenizer"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sft = load_checkpoint(gold_art["sft"]).eval()

        def comparisons(texts: list[str], salt: int) -> list[tuple[list[list[int]], list[int]]]:
            ids = [tok.encode(p) or [tok.eos_id] for p in texts]
            g = generate(sft, ids, SamplingParams(max_new_tokens=10, temperature=1.0), eos_id=tok.eos_id,
                         seeds=seed * 1_000_003 + salt, n=k)
            resp = [tok.decode([t for t in row[m.bool()].tolist() if t != tok.eos_id])
                    for row, m in zip(g.response_ids, g.response_mask)]
            out = []
            for i, p in enumerate(texts):  # best vs worst of the k samples, when the labeller tells them apart
                rs = resp[i * k:(i + 1) * k]
                scores = task.gold_scores([p] * k, rs)
                best, worst = max(range(k), key=lambda j: scores[j]), min(range(k), key=lambda j: scores[j])
                if scores[best] > scores[worst]:
                    out.append(([sum(encode_example(tok, p, rs[j]), []) for j in (best, worst)], [0, 1]))
            return out

        train = comparisons(task.prompts("train")[:prompts], 1)
        heldout = comparisons(task.prompts("heldout")[:512], 2)
        torch.manual_seed(seed)
        rm = load_checkpoint(gold_art["sft"], kind="reward")
        opt = torch.optim.AdamW(rm.parameters(), lr=3e-4, weight_decay=0.0)
        order = torch.Generator().manual_seed(seed)
        rm.train()
        for step in range(steps):
            if step % (len(train) // 16) == 0:
                perm = torch.randperm(len(train), generator=order).tolist()
            start = (step % (len(train) // 16)) * 16
            loss, _ = rm_loss_fn(rm, rm_batch([train[i] for i in perm[start:start + 16]], pad_id=tok.eos_id))
            opt.zero_grad()
            loss.backward()
            opt.step()
        rm.eval()
        with torch.no_grad():
            correct = total = 0
            for (better, worse), _ in heldout:
                correct += float(rm(torch.tensor([better]))[0]) > float(rm(torch.tensor([worse]))[0])
                total += 1
        save_checkpoint(rm, root / "learned-rm", kind="reward", tokenizer=gold_art["tokenizer"])
    finally:
        torch.set_num_threads(threads)
    return {**gold_art, "rm": str(root / "learned-rm"), "rm_heldout_accuracy": correct / total}
