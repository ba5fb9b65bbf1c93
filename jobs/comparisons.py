"""`raygpt comparisons`: comparison data for the reward model (InstructGPT §3.4–3.5).

For every prompt, K responses are sampled from the SFT policy and the task's labeler ranks them; the result is
stored as Parquet (prompt, K responses, ranking, plus the labeler's scores for diagnostics — the RM never reads
them). Generation runs as Ray tasks, one shard of prompts each, in parallel; every sample has its own seed
derived from (seed, split, prompt index, sample index), so the data do not depend on how prompts were sharded.

Outputs in runs/<name>/: train.parquet (train prompts), heldout.parquet (held-out prompts, for RM accuracy),
metrics.jsonl (one summary row), config.yaml. Both files are validated, then written atomically; a failure
leaves neither half-written. Prompts for which a sample came back empty (EOS first) are dropped and counted:
an empty response is not a valid comparison.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from cluster.metrics import MetricsWriter
from cluster.runtime import init_ray
from jobs.cli import JobSpec
from jobs.config import field
from jobs.data.tasks import TaskConfig, build_task
from jobs.rlhf.checkpoints import check_policy
from jobs.rlhf.sampling import GenerateSection, generate_comparisons
from jobs.runs import start_run


@dataclass
class ComparisonsConfig:
    """Sample K responses per prompt from a policy and have the task's labeler rank them."""

    name: str = field("comparisons", help="run name: runs/<name>/")
    runs_root: str = field("runs", help="directory holding run directories")
    address: str | None = field(None, help="Ray cluster address (default: $RAY_ADDRESS, else an embedded cluster)")
    policy: str = field("runs/sft-tiny/checkpoint", help="checkpoint the responses are sampled from (the SFT model)")
    task: TaskConfig = field(TaskConfig(), help="task: prompts and labeler")
    generate: GenerateSection = field(GenerateSection(), help="sampling and ranking")


def run(cfg: ComparisonsConfig) -> dict[str, Any]:
    check_policy(cfg.policy)
    build_task(cfg.task)  # a bad task fails before Ray starts
    run_dir = start_run(cfg, cfg.name, cfg.runs_root)
    init_ray(address=cfg.address)
    summary = generate_comparisons(cfg.policy, cfg.task, cfg.generate, run_dir)
    with MetricsWriter(run_dir, tensorboard=False) as w:
        w.write(0, **summary)
    print(summary)
    return summary


JOB = JobSpec(ComparisonsConfig, run, "raygpt comparisons")
main = JOB.main


if __name__ == "__main__":
    sys.exit(main())
