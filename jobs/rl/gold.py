"""The gold labeller's score of an iteration's rollouts, off the driver (issue 13: only metadata reaches it).

The controller used to `ray.get` every rollout shard to decode and score it, so each iteration's whole batch went
through the driver — the funnel the object store exists to avoid (OpenRLHF #998). Now a Ray task (num_cpus=0, like
the advantage task; it runs while the trainers update) reads the shards zero-copy from the object store, decodes
them and returns one float. The tokenizer and the labeller are built once per worker process: a task-pool worker
scores every iteration, and building the labeller (e.g. VADER's lexicon) costs more than scoring a batch.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from actors.reward import decode_rollout
from actors.rollout import Rollout
from jobs.config import to_dict
from jobs.rl.config import PPOJobConfig
from jobs.rl.inputs import gold_function, load_tokenizer

_LABELLERS: dict[str, tuple[Any, Any]] = {}  # config of (tokenizer, gold) → (tokenizer, labeller), per process


def gold_score(cfg: PPOJobConfig, *shards: Rollout) -> float:
    """Ray task body: mean gold score over every row of `shards` (Ray resolves the ObjectRefs; the shards' tensors
    are read-only views of the object store). The run's gold function must be set (cfg.gold)."""
    d = to_dict(cfg)
    key = json.dumps([d.get("tokenizer"), d.get("policy"), d.get("gold"), d.get("task")], sort_keys=True,
                     default=str)
    if key not in _LABELLERS:
        _LABELLERS[key] = (load_tokenizer(cfg)[0], gold_function(cfg))
    tok, gold = _LABELLERS[key]
    if gold is None:
        raise ValueError("gold: the run has no gold labeller (gold: null); nothing to score")
    texts = [decode_rollout(r, tok.decode, tok.eos_id) for r in shards]
    prompts = [p for t in texts for p in t[0]]
    responses = [r for t in texts for r in t[1]]
    return float(np.mean(gold(prompts, responses)))
