"""The RL job's held-out monitor (issue 17): every `monitor.every` iterations the current policy is evaluated on a
few held-out prompts by the one evaluator (jobs/rlhf/evaluation.py `compare_models`: gold, proxy, KL to SFT,
distinct-1/2, repetition, win rate over SFT), and the stop rule (jobs/rl/mitigation.py `StopRule`) watches the
training signals that need no labeler.

Off the driver: the evaluation is a Ray task (num_cpus=0, like the advantage task) that receives the policy's
weights as an ObjectRef, loads the SFT model and the first reward model itself, and runs while training goes on;
its row is written to metrics.jsonl when it is done (`heldout_*` keys, `step` = the evaluated iteration). Cost per
evaluation (monitor.prompts = 32 on the tiny demo model): 64 sampled responses (policy and SFT, the same seeds as
the final evaluation) and two forward passes for KL and proxy — ~1–2 s of one core, about one PPO iteration.
"""

from __future__ import annotations

from typing import Any

import ray

from jobs.rl.config import PPOJobConfig, abspath
from jobs.rl.final import policy_model
from jobs.rl.inputs import PromptSet, gold_function, load_tokenizer
from jobs.rl.mitigation import StopRule
from jobs.rlhf.checkpoints import load_lm
from jobs.rlhf.evaluation import compare_models
from models.checkpoint import load_checkpoint

# compare_models' metrics kept per evaluation, as heldout_<name> in metrics.jsonl.
HELDOUT_KEYS = {"gold": "policy/gold", "proxy": "policy/proxy", "kl": "policy/kl", "distinct1": "policy/distinct1",
                "distinct2": "policy/distinct2", "repetition": "policy/repetition",
                "response_tokens": "policy/response_tokens", "win_rate": "win_rate/policy_vs_sft",
                "sft_gold": "sft/gold", "sft_proxy": "sft/proxy", "sft_distinct2": "sft/distinct2"}


def heldout_metrics(cfg: PPOJobConfig, message: Any) -> dict[str, float]:
    """The policy in `message` (a WeightsMessage) against the SFT model on the first monitor.prompts held-out
    prompts, with the final evaluation's sampling and seed; returns heldout_<name> → value (HELDOUT_KEYS)."""
    tok, _ = load_tokenizer(cfg)
    source = cfg.prompts.eval_source or cfg.prompts.source
    prompts = PromptSet.load(cfg, tok, cfg.prompts.eval_split, source=source, limit=cfg.monitor.prompts)
    policy_dir = abspath(cfg.policy) or ""
    sft, _ = load_lm(policy_dir)
    rms = cfg.reward_models()  # proxy: the first reward model (member 0 of an ensemble), as in the final report
    rm = load_checkpoint(rms[0], kind="reward") if rms else None
    comparison = compare_models({"sft": sft, "policy": policy_model(message, policy_dir)}, tok, prompts.texts,
                                cfg.sampling, cfg.seed, gold=gold_function(cfg), reward_model=rm,
                                kl_reference="sft")
    return {f"heldout_{k}": comparison.metrics[v] for k, v in HELDOUT_KEYS.items() if v in comparison.metrics}


class Monitor:
    """Submits the periodic held-out evaluation, writes its rows as they finish, and runs the stop rule."""

    def __init__(self, cfg: PPOJobConfig, metrics: Any) -> None:
        self.cfg, self.metrics = cfg, metrics
        self.stop_rule = StopRule(cfg.mitigation)
        self.pending: list[tuple[int, Any]] = []  # (evaluated iteration, ObjectRef of its metrics)
        self.stopped: dict[str, Any] | None = None

    def step(self, it: int, stats: dict[str, float], weights: Any) -> bool:
        """After iteration `it` (0-based): write finished evaluations, start one if due (`weights()` → the
        policy's weights ref), apply the stop rule. True = end the run now."""
        self.collect(block=False)
        every = self.cfg.monitor.every
        last = it + 1 == self.cfg.iterations  # the final evaluation covers the last iteration
        if every and (it + 1) % every == 0 and not last:
            self.submit(it + 1, weights())
        reason = self.stop_rule.update(stats)
        if reason is not None and not last:
            self.stopped = {"stopped_at": it + 1, "stop_reason": reason}
            print(f"[ppo] stop rule: {reason}; ending the run after iteration {it + 1}", flush=True)
            return True
        return False

    def submit(self, iteration: int, weights_ref: Any) -> None:
        task = ray.remote(heldout_metrics).options(num_cpus=0, max_retries=1)
        self.pending.append((iteration, task.remote(self.cfg, weights_ref)))

    def collect(self, block: bool) -> None:
        """Write every finished evaluation (all of them when `block`) as its own metrics row."""
        keep = []
        for iteration, ref in self.pending:
            done, _ = ray.wait([ref], timeout=None if block else 0)
            if not done:
                keep.append((iteration, ref))
                continue
            self.metrics.write(iteration, heldout_iteration=iteration, **ray.get(ref))
        self.pending = keep

    def summary(self) -> dict[str, Any]:
        self.collect(block=True)
        return dict(self.stopped or {})
