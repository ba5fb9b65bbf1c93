"""The learned-reward fixture of the algorithm tests: an SFT stand-in, labeller-ranked comparisons sampled from it on
Ray workers (`raygpt comparisons`' own code) and a reward model trained on them with `raygpt rm` — so the online
algorithms optimise a learned RM (never the labeller) and DPO learns from the very comparisons the RM read.

The SFT stand-in is ppo_setup.build_gold_artifacts' `nano` LM (200 next-token steps on the plays): it writes
word-like verse, so the VADER labeller's score varies between samples and there is something to learn."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_learned_reward(root: Path, train_prompts: int = 4096, heldout_prompts: int = 128, k: int = 4,
                         rm_steps: int = 300, rm_lr: float = 3e-3, max_new_tokens: int = 10) -> dict[str, Any]:
    """{"sft", "tokenizer", "comparisons" (dir with train/heldout.parquet), "rm", "rm_summary"} under `root`.
    Needs a running Ray cluster (comparisons are sampled by Ray tasks, the RM trains on Ray Train)."""
    from ppo_setup import build_gold_artifacts

    from jobs import rm
    from jobs.config import from_dict
    from jobs.data.tasks import TaskConfig
    from jobs.rlhf.sampling import GenerateSection, generate_comparisons
    from models.generation import SamplingParams

    art = build_gold_artifacts(root)
    comparisons = root / "comparisons"
    if not (comparisons / "train.parquet").is_file():
        section = GenerateSection(k=k, train_prompts=train_prompts, heldout_prompts=heldout_prompts,
                                  sampling=SamplingParams(max_new_tokens=max_new_tokens), workers=2)
        generate_comparisons(art["sft"], TaskConfig(), section, comparisons)
    summary = rm.run(from_dict(rm.RMConfig, {
        "name": "rm", "runs_root": str(root), "init_from": art["sft"], "comparisons": str(comparisons),
        "data": {"max_tokens": 48}, "optim": {"max_steps": rm_steps, "micro_batch_size": 16, "lr": rm_lr},
        "parallel": {"num_workers": 1}, "normalize_demonstrations": 256, "eval_every": rm_steps,
        "checkpoint": {"every_n_steps": rm_steps}}))
    return {**art, "comparisons": str(comparisons), "rm": summary["checkpoint"], "rm_summary": summary}
