"""Critic-free online RL and DPO against a LEARNED reward model, on the embedded local Ray cluster (CPU, `nano`).

Fixture (tests/cluster/rlhf_setup.py): a `nano` SFT stand-in, 512 + 64 prompts × K=4 responses sampled from it on
Ray workers and ranked by the task's labeller (VADER), and a reward model trained on those rankings by `raygpt rm`.
The algorithms optimise the reward model (never the labeller); the labeller only judges the held-out result
(64 held-out prompts, one sample each, the same seeds for every model; jobs/rlhf/evaluation.py).

Claims (seed 0; measured numbers in each test's docstring):
- GRPO (4 samples per prompt, KL as a k3 loss term) places no value role, logs the reward model's component, and
  beats the SFT model by the labeller at KL(π‖π_SFT) ≤ 6 nats;
- DPO on the same comparisons beats the SFT model by the labeller at KL ≤ 6 nats, logs the implicit-reward
  margins and accuracy, and recovers from a killed Ray Train worker (restart from its last checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cluster.metrics import read_metrics
from jobs.config import from_dict

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

HELDOUT = 64
# Thresholds below the measured values (seed 0, 2-core CPU; one seed's runs are identical): GRPO (policy lr 6e-4,
# β 0.1) win rate 0.781, gold 0.098 → 0.454, held-out KL 3.88 nats — at lr 1e-3 / β 0.05 it had measured 0.820,
# 0.427, 5.05 nats, then 7.8 nats after float-rounding-level changes (a fused AdamW kernel, a one-pass log-prob):
# that KL was still rising fast at the last iteration, so the test now runs where it has margin; DPO win rate
# 0.805, gold 0.098 → 0.511, KL 4.09 nats — the same
# to the last printed digit with and without the killed worker (exact resume). With the same fixture,
# PPO/RLOO/REINFORCE++ at policy_lr 2e-3 reached win rates 0.88/0.87/0.88 but KL 9.5/10.0/11.6 nats
# (docs/BENCHMARKS.md). Runtime ≈ 3.7 min on 2 busy cores (fixture 108 s, GRPO 18 s, DPO 92 s).
WIN_GRPO, GOLD_GAIN_GRPO = 0.70, 0.20
WIN_DPO, GOLD_GAIN_DPO = 0.70, 0.25
DPO_STEPS, DPO_LR = 200, 3e-3


@pytest.fixture(scope="module")
def ray_session():
    from cluster.runtime import init_ray, shutdown_ray

    init_ray(num_cpus=4)
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def learned(ray_session, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from rlhf_setup import build_learned_reward

    art = build_learned_reward(tmp_path_factory.mktemp("learned-rm"))
    print("reward model:", {k: art["rm_summary"].get(k) for k in ("val_accuracy", "train_prompts")})
    return art


def test_grpo_beats_sft_by_the_labeller_optimising_the_learned_rm(learned: dict[str, Any], tmp_path: Path) -> None:
    """GRPO as Shao et al. 2024 (group-normalised advantage, sequence-mean loss, k3 KL term with β = 0.1), 16 prompts
    × 4 samples per iteration, 16 iterations, against the learned reward model alone (a one-term `rewards` list)."""
    from jobs.ppo import run
    from jobs.rl.config import PPOJobConfig

    cfg = from_dict(PPOJobConfig, {
        "name": "grpo", "runs_root": str(tmp_path), "seed": 0, "algorithm": "grpo", "group_size": 4,
        "iterations": 16, "batch_size": 16, "policy": learned["sft"], "reward_model": None,
        "rewards": [{"model": learned["rm"]}], "gold": "task", "sampling": {"max_new_tokens": 10},
        "kl": {"init_beta": 0.1}, "ptx": {"coef": 0.0},
        "ppo": {"epochs": 4, "minibatch_size": 16, "policy_lr": 6e-4},
        "prompts": {"source": "task", "eval_size": HELDOUT}, "placement": {"cpus_per_worker": 0.25},
    })
    assert "value" not in cfg.placement_spec().roles
    ev = run(cfg)["eval"]
    rows = read_metrics(tmp_path / "grpo")
    print({k: v for k, v in ev.items() if k != "samples"})
    assert not (tmp_path / "grpo" / "trainer_state" / "value").exists()  # no critic was placed or saved
    assert all(r["reward/rm"] == pytest.approx(r["proxy_reward"]) for r in rows)  # one component, weight 1
    assert all("kl_loss_term" in r and r["non_score_reward"] == 0.0 for r in rows)  # KL in the loss, not reward
    assert ev["prompts"] == HELDOUT
    assert ev["win_rate/grpo_vs_sft"] >= WIN_GRPO
    assert ev["grpo/gold"] > ev["sft/gold"] + GOLD_GAIN_GRPO
    assert ev["grpo/kl"] <= 6.0


def test_dpo_beats_sft_and_survives_a_killed_worker(learned: dict[str, Any], tmp_path: Path) -> None:
    from jobs import dpo

    steps = DPO_STEPS
    cfg = from_dict(dpo.DPOConfig, {
        "name": "dpo", "runs_root": str(tmp_path), "init_from": learned["sft"],
        "comparisons": learned["comparisons"], "beta": 0.1, "eval_every": 100,
        "optim": {"lr": DPO_LR, "max_steps": steps, "micro_batch_size": 32, "warmup_steps": 5},
        "parallel": {"num_workers": 1}, "checkpoint": {"every_n_steps": steps // 3},
        # rank 0 exits (os._exit) during step steps//2, once: Ray Train restarts it from the last checkpoint
        "failure": {"max_failures": 1, "inject": [f"0:{steps // 2}"]},
        "eval": {"prompts": HELDOUT, "sampling": {"max_new_tokens": 10}},
    })
    summary = dpo.run(cfg)
    ev = summary["eval"]
    rows = read_metrics(tmp_path / "dpo")
    print({k: v for k, v in summary.items() if k != "eval"}, ev)
    assert summary["train_pairs"] == 6 * summary["train_comparisons"] - 6 * summary["dropped_too_long"]  # C(4,2)
    assert max(r["step"] for r in rows) == steps and (tmp_path / "dpo" / "checkpoint" / "config.json").is_file()
    assert any((tmp_path / "dpo" / ".faults").iterdir())  # the injected exit fired (cluster/faults.py ledger)
    last = [r for r in rows if r.get("val_accuracy") is not None][-1]
    assert last["val_reward_margin"] > 0 and last["val_accuracy"] > 0.5  # held-out pairs, implicit reward
    assert all(k in rows[-1] for k in ("reward_chosen", "reward_rejected", "reward_margin", "accuracy"))
    assert ev["win_rate/dpo_vs_sft"] >= WIN_DPO
    assert ev["dpo/gold"] > ev["sft/gold"] + GOLD_GAIN_DPO
    assert ev["dpo/kl"] <= 6.0
