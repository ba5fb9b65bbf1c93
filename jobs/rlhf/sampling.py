"""Sampling responses for the human-feedback stages: K samples per prompt ranked by the task's labeler
(InstructGPT §3.4–3.5, `raygpt comparisons` and the RM job's own sampling) and one sample per held-out prompt for
evaluation. Every sample has its own seed derived from (seed, split, prompt index, sample index), so the data do
not depend on how prompts were sharded over Ray tasks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from actors.engines import RolloutEngine, check_engine, make_engine
from jobs.data.examples import encode_prompt
from jobs.data.tasks import Comparison, ComparisonsError, TaskConfig, build_task, write_comparisons
from models.checkpoint import tokenizer_path
from models.config import ConfigError, field
from models.generation import SamplingParams
from models.seeding import derive_seed
from models.tokenizer import Tokenizer

MAX_K = 9  # InstructGPT §3.4: labelers ranked between K = 4 and K = 9 responses



@dataclass
class GenerateSection:
    """Sampling K responses per prompt and ranking them with the task's labeler."""

    k: int = field(4, help=f"responses per prompt (2..{MAX_K}; InstructGPT used 4-9)")
    train_prompts: int = field(4096, help="train prompts to compare (0 = all of the task's train prompts)")
    heldout_prompts: int = field(256, help="held-out prompts to compare, for RM accuracy (0 = none)")
    sampling: SamplingParams = field(SamplingParams(), help="sampling (max_new_tokens 24 = the longest SFT "
                                                             "demonstration, so ~90% of SFT samples end with EOS)")
    batch_size: int = field(128, help="sequences generated together")
    engine: str = field("native", help="rollout engine: 'native' or 'vllm' (the `vllm` extra)")
    workers: int = field(2, help="Ray tasks generating in parallel (1 CPU each)")
    seed: int = field(0, help="sampling seed")

    def validate(self) -> None:
        if not 2 <= self.k <= MAX_K:
            raise ConfigError(f"k: must be in 2..{MAX_K} (a ranking needs K >= 2 responses), got {self.k}")
        if self.train_prompts < 0 or self.heldout_prompts < 0:
            raise ConfigError("train_prompts/heldout_prompts: must be >= 0")
        if self.workers < 1 or self.batch_size < 1:
            raise ConfigError(f"workers/batch_size: must be >= 1, got {self.workers}/{self.batch_size}")



def sample_responses(engine: RolloutEngine, tokenizer: Any, prompts: Sequence[str], sampling: SamplingParams,
                     seeds: Sequence[int], n: int = 1, batch_size: int = 128) -> list[str]:
    """`n` sampled responses per prompt (decoded text, without EOS), prompt i's at rows i·n … i·n + n − 1, with
    the rollout engine `engine` (the prompt's prefill shared by its n samples); `seeds[i·n + j]` seeds row i·n + j
    alone, so a response does not depend on its batch-mates."""
    if len(seeds) != len(prompts) * n:
        raise ValueError(f"seeds: {len(seeds)} seeds for {len(prompts)} prompts × {n} samples")
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = [encode_prompt(tokenizer, p) for p in prompts[i:i + batch_size]]
        gen = engine.generate(chunk, sampling, eos_id=tokenizer.eos_id,
                              seeds=[int(s) for s in seeds[i * n:(i + len(chunk)) * n]], n=n)
        for row, mask in zip(gen.response_ids.tolist(), gen.response_mask.tolist()):
            ids = [t for t, m in zip(row, mask) if m]
            if ids and ids[-1] == tokenizer.eos_id:
                ids = ids[:-1]
            out.append(tokenizer.decode(ids))
    return out


def sample_seed(seed: int, split: str, prompt_index: int, sample: int) -> int:
    """Seed of sample `sample` of prompt `prompt_index` of `split`: a pure function, independent of sharding."""
    return derive_seed(seed, split, prompt_index, sample)



def label_shard(policy: str, task_cfg: TaskConfig, prompts: Sequence[str], first_index: int, split: str,
                gen: GenerateSection) -> tuple[list[Comparison], int]:
    """Sample K responses for each prompt of a shard and rank them; returns (comparisons, prompts dropped because
    a sample was empty). Runs inside a Ray task (or in-process)."""
    torch.set_num_threads(1)
    engine = make_engine(gen.engine, policy)
    tokenizer = Tokenizer.from_file(tokenizer_path(policy))
    task = build_task(task_cfg)
    k = gen.k
    seeds = [sample_seed(gen.seed, split, first_index + i, j) for i in range(len(prompts)) for j in range(k)]
    responses = sample_responses(engine, tokenizer, prompts, gen.sampling, seeds, n=k,
                                 batch_size=max(1, gen.batch_size // k))
    rows, dropped = [], 0
    for i, prompt in enumerate(prompts):
        resp = responses[i * k:(i + 1) * k]
        if any(not r.strip() for r in resp):
            dropped += 1
            continue
        scores = task.gold_scores([prompt] * k, resp)
        rows.append(Comparison(prompt, tuple(resp), tuple(task.rank(prompt, resp)), tuple(scores)))
    return rows, dropped



def _label_parallel(policy: str, task_cfg: TaskConfig, prompts: list[str], split: str, gen: GenerateSection
                    ) -> tuple[list[Comparison], int]:

    remote = ray.remote(num_cpus=1)(label_shard)
    n_shards = min(len(prompts), 2 * gen.workers)  # 2 shards per worker evens out uneven shard times
    size = math.ceil(len(prompts) / n_shards)
    refs = [remote.remote(policy, task_cfg, prompts[s:s + size], s, split, gen)
            for s in range(0, len(prompts), size)]
    rows: list[Comparison] = []
    dropped = 0
    for shard_rows, shard_dropped in ray.get(refs):  # in submission order: the output order is deterministic
        rows.extend(shard_rows)
        dropped += shard_dropped
    return rows, dropped



def generate_comparisons(policy: str, task_cfg: TaskConfig, gen: GenerateSection, out_dir: str | Path
                         ) -> dict[str, Any]:
    """Write out_dir/train.parquet (+ heldout.parquet when gen.heldout_prompts > 0); Ray must be initialised.
    Returns a summary (rows, dropped prompts, mean gold score, tie fraction, seconds)."""
    task = build_task(task_cfg)
    if not task.has_labeler:
        raise ConfigError(f"task.name: task {task.name!r} has no labeler to rank new samples; pass recorded "
                          "comparisons instead")
    check_engine(gen.engine, policy, "generate.engine")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    results: dict[str, list[Comparison]] = {}
    summary: dict[str, Any] = {"k": gen.k}
    for split, n in (("train", gen.train_prompts), ("heldout", gen.heldout_prompts)):
        if split == "heldout" and n == 0:
            continue
        prompts = task.prompts(split)  # type: ignore[arg-type]
        prompts = prompts[:n] if n else prompts
        if len(prompts) < 1:
            raise ConfigError(f"task: no {split} prompts")
        rows, dropped = _label_parallel(policy, task_cfg, prompts, split, gen)
        if not rows:
            raise ComparisonsError(f"{split}: every prompt had an empty sample; nothing to compare")
        results[split] = rows
        scores = [s for c in rows for s in (c.scores or ())]
        ties = sum(len(set(c.scores or ())) < c.k for c in rows)
        summary.update({f"{split}_rows": len(rows), f"{split}_dropped": dropped,
                        f"{split}_gold_mean": sum(scores) / len(scores), f"{split}_rows_with_ties": ties / len(rows)})
    for split, rows in results.items():  # every split generated and validated before the first file is written
        write_comparisons(rows, out_dir / f"{split}.parquet")
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary
