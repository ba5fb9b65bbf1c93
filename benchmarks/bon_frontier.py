"""How much a demo's reward model allows: best-of-n sampling from its SFT model (issue 17's frontier).

Not a speed benchmark (not in `make bench`): the reference point for the PPO runs of docs/BENCHMARKS.md "Reward
over-optimisation". For each held-out prompt of a finished demo's eval stage (runs/<demo>/eval/samples.jsonl: the
prompts and the SFT sample every win rate is taken against), draw n responses from the SFT model, keep the one the
reward model scores highest, and score the kept ones with the run's labeller — the demo's PPO stage config
(runs/<demo>/ppo/config.yaml) gives the labeller, the sampling parameters and the reward model, so the numbers are
comparable with that run's evaluation. The best-of-n policy's KL to SFT is at most log n − (n − 1)/n nats (the
analytic bound Stiennon et al. 2020 and Gao et al. 2022 use), so this is the win rate the proxy buys per nat by
selection alone, without RL; the same with the labeller itself choosing (gold best-of-n) is what a perfect reward
model would buy that way.

    python -m benchmarks.bon_frontier runs/demo 64
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from actors.base import sample_rollout
from actors.reward import decode_rollout, reward_inputs
from jobs.config import load_config
from jobs.data.examples import encode_prompt
from jobs.rl.config import PPOJobConfig
from jobs.rl.inputs import gold_function
from jobs.rlhf.checkpoints import load_lm
from jobs.rlhf.evaluation import win_rate
from jobs.rlhf.sampling import sample_seed
from models.checkpoint import load_checkpoint
from models.diversity import distinct_n


def best_of_n_kl_bound(n: int) -> float:
    """Upper bound on KL(best-of-n ‖ base) in nats: log n − (n − 1)/n."""
    return math.log(n) - (n - 1) / n


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished demo run directory (sft/, rm/, eval/samples.jsonl)")
    ap.add_argument("n", type=int, help="the largest n (powers of two up to it are reported)")
    args = ap.parse_args()
    cfg = load_config(PPOJobConfig, args.run / "ppo" / "config.yaml")
    labeller = gold_function(cfg)
    if labeller is None:
        raise SystemExit(f"{args.run}/ppo/config.yaml: the run has no gold labeller (gold: null)")
    rows = [json.loads(line) for line in (args.run / "eval" / "samples.jsonl").open()]
    prompts = [r["prompt"] for r in rows]
    sft_gold = [float(r["sft"]["gold"]) for r in rows]
    model, tok = load_lm(args.run / "sft" / "checkpoint")
    model.eval()
    rm = load_checkpoint(cfg.reward_models()[0], kind="reward").eval()
    ids = [encode_prompt(tok, p) for p in prompts]
    texts: list[list[str]] = [[] for _ in prompts]
    proxy = torch.zeros(len(prompts), args.n)
    for j in range(args.n):
        for a in range(0, len(ids), 128):
            rr = list(range(a, min(a + 128, len(ids))))
            rollout = sample_rollout(model, [ids[r] for r in rr], rr, [sample_seed(99, "bon", r, j) for r in rr],
                                     cfg.sampling, tok.eos_id, 0, "")
            responses = decode_rollout(rollout, tok.decode, tok.eos_id)[1]
            proxy[rr, j] = rm(*reward_inputs(rollout.input_ids, rollout.attention_mask, tok.eos_id)).float()
            for k, r in enumerate(rr):
                texts[r].append(responses[k])
    gold = torch.tensor([labeller([p] * len(row), row) for p, row in zip(prompts, texts)])
    print(f"{len(prompts)} prompts; SFT sample: gold {_mean(sft_gold):.3f}")
    print("| n | KL ≤ (nats) | RM-chosen: win over SFT | gold | distinct-2 | gold-chosen: win | gold | distinct-2 |")
    print("|---|---|---|---|---|---|---|---|")
    n = 1
    while n <= args.n:
        pick = proxy[:, :n].argmax(1).tolist()
        chosen = [float(gold[i, j]) for i, j in enumerate(pick)]
        best = gold[:, :n].argmax(1).tolist()
        oracle = [float(gold[i, j]) for i, j in enumerate(best)]
        d2, oracle_d2 = (distinct_n([texts[i][j].split() for i, j in enumerate(ks)], 2) for ks in (pick, best))
        print(f"| {n} | {best_of_n_kl_bound(n):.2f} | {win_rate(chosen, sft_gold):.1%} | {_mean(chosen):.3f} "
              f"| {d2:.3f} | {win_rate(oracle, sft_gold):.1%} | {_mean(oracle):.3f} | {oracle_d2:.3f} |")
        n *= 2


if __name__ == "__main__":
    main()
