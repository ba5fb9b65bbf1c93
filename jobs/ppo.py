"""`raygpt ppo`: PPO-ptx on Ray actors — policy, reference, reward and value workers, one controller.

One iteration (InstructGPT §3.5, Ziegler et al. 2019; the loop below reads exactly like this):

    generate    the policy (or the rollout workers) samples responses to a batch of prompts
    score       in parallel: reference log-probs, reward-model scores, critic values
    advantages  per-token reward −β·KL + score on the last token, GAE, whitening (one Ray task, whole batch)
    update      in parallel: the policy's clipped-surrogate (+ γ·pretraining LM loss) and the critic's clipped
                value loss, each on its data-parallel shard
    checkpoint  engines + controller state, so a failure reloads "the last weights" and a run resumes exactly

With `max_staleness` k >= 1 (asynchronous RL, jobs/rl/staleness.py) the rollout workers generate iterations
t+1 … t+k while iteration t is scored and the trainers update (`submit_ahead`), with weights at most k versions
old (checked when `rollouts` takes them); the policy loss corrects for the lag with the decoupled PPO objective.
k = 0 is the synchronous loop: `rollouts(it)` is `generate(it, prompts(it))` and `submit_ahead` does nothing.

Between stages only ObjectRefs move; the controller waits on small metadata objects, every wait has a timeout.
A worker that dies (or hangs past the timeout) mid-stage is restarted with its group, reloaded from the last
checkpoint, and the interrupted stage is resubmitted (`jobs/rl/controller.py`). Config, placement and the held-out
evaluation live in `jobs/rl/config.py` and `jobs/rl/final.py`; docs/PPO.md describes the whole job.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from typing import Any

from jobs.cli import JobSpec
from jobs.rl.config import PPOJobConfig, plan
from jobs.rl.controller import Controller


def run(cfg: PPOJobConfig) -> dict[str, Any]:
    """Train; returns the summary (also written to runs/<name>/summary.json)."""
    with Controller(cfg) as ctl:
        for it in range(ctl.start_iteration, cfg.iterations):
            t0 = time.perf_counter()
            rollouts = ctl.rollouts(it)      # [rollout shard ref]: generate now, or take the one submitted ahead
            ctl.submit_ahead(it)             # max_staleness k >= 1: rollout workers start on it+1 … it+k
            ref_logprobs, scores, values = ctl.score(it, rollouts)        # reference | reward | value (PPO only)
            batch, stats = ctl.advantages(rollouts, ref_logprobs, scores, values)   # GAE | GRPO | RLOO | REINFORCE++
            update = ctl.update(it, batch, rollouts)                      # policy | value (PPO only), in parallel
            ctl.kl.update(stats["kl"], cfg.rows)                          # adaptive β (Ziegler et al. §2.2)
            tag, update = ctl.checkpoint(it, update, redo=partial(ctl.update, it, batch, rollouts))
            ctl.log(it, stats, update, time.perf_counter() - t0)
            ctl.commit(tag)  # `latest` moves only after the row is on disk: a driver kill never skips a row
            if ctl.watch(it, stats):  # held-out eval every monitor.every; the stop rule (jobs/rl/monitor.py)
                break
        return ctl.finish()


JOB = JobSpec(PPOJobConfig, run, "raygpt ppo", plan=plan)
main = JOB.main


if __name__ == "__main__":
    sys.exit(main())
