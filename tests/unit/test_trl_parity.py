"""Peer check: our RLHF math equals TRL 1.12.0's PPO (`trl.experimental.ppo`) on random inputs.

TRL exposes `masked_mean`, `masked_var`, `masked_whiten` (trl/experimental/ppo/ppo_trainer.py) and
`entropy_from_logits` (trl/trainer/utils.py) as functions: those are imported and called. The KL estimate, the
per-token rewards, GAE, advantage whitening and both clipped losses exist only inline in `PPOTrainer.train()`.
Rather than re-typing them here (a copy could drift from TRL and would prove nothing), the test cuts TRL's
own statements out of the installed ppo_trainer.py by anchor lines (tests/unit/trl_source.py, whole statements of
one block), and executes them on our inputs:
  - rollout block: `response_idxs = torch.arange(...)` … `advantages = torch.masked_fill(advantages, padding_mask, 0)`
    (padding masks, k1/k3 KL, −β·KL + score, optional reward whitening, the GAE loop, advantage whitening);
  - loss block: `vpredclipped = torch.clamp(` … `loss = pg_loss + args.vf_coef * vf_loss`
    (clipped value loss, vf clipfrac, clipped policy loss);
  - stats block: `pg_clipfrac = masked_mean(` … `approxkl = 0.5 * (logprobs_diff**2).mean()`.
If TRL's text changes, the anchors fail loudly (the version is pinned to 1.12.0 anyway).

Known, deliberate differences (asserted, not hidden):
  - TRL pays the RM score one position PAST the last response token (`sequence_lengths_p1`) and treats that slot
    as valid for values/GAE (`padding_mask_p1`). We pay it on the last valid token of whatever mask we are given;
    so TRL's numbers are reproduced by passing our functions TRL's `~padding_mask_p1` as the mask.
  - TRL's logged approx-KL averages ½(Δlogp)² over ALL positions (padding contributes 0); ours averages over valid
    tokens only: ours · n_valid / n_total == TRL's.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close
from trl_source import trl_block

from models.advantages import gae, kl_penalty, per_token_rewards, whiten
from models.losses import entropy_from_logits, policy_loss, value_loss
from models.masked import masked_mean, masked_var

trl = pytest.importorskip("trl")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRLExperimentalWarning on import
    from trl.experimental.ppo import ppo_trainer as trl_ppo
from trl.trainer.utils import entropy_from_logits as trl_entropy_from_logits  # noqa: E402


def test_trl_version_is_the_pinned_peer():
    assert trl.__version__ == "1.12.0"


TRAIN = trl_ppo.PPOTrainer.train
ROLLOUT = trl_block(
    TRAIN, "response_idxs = torch.arange(", "advantages = torch.masked_fill(advantages, padding_mask, 0)"
)
LOSSES = trl_block(TRAIN, "vpredclipped = torch.clamp(", "loss = pg_loss + args.vf_coef * vf_loss")
STATS = trl_block(TRAIN, "pg_clipfrac = masked_mean(", "approxkl = 0.5 * (logprobs_diff**2).mean()")


def random_rollout(seed: int, b: int = 6, t: int = 10):
    gen = torch.Generator().manual_seed(seed)
    # TRL's sequence_lengths = index of the last response token; include full-length rows (edge case T−1).
    seq_lengths = torch.randint(0, t, (b,), generator=gen)
    seq_lengths[0] = t - 1
    seq_lengths[1] = t - 2
    return SimpleNamespace(
        responses=torch.zeros(b, t, dtype=torch.long),
        sequence_lengths=seq_lengths,
        logprobs=-torch.rand(b, t, generator=gen, dtype=torch.float64) * 3,
        ref_logprobs=-torch.rand(b, t, generator=gen, dtype=torch.float64) * 3,
        values=torch.randn(b, t, generator=gen, dtype=torch.float64),
        scores=torch.randn(b, generator=gen, dtype=torch.float64),
        gen=gen,
    )


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
@pytest.mark.parametrize("whiten_rewards", [False, True])
@pytest.mark.parametrize("seed,gamma,lam", [(0, 1.0, 0.95), (1, 0.99, 0.9), (2, 0.9, 1.0)])
def test_rollout_math_matches_trl_on_cpu(kl_estimator, whiten_rewards, seed, gamma, lam):
    r = random_rollout(seed)
    args = SimpleNamespace(kl_estimator=kl_estimator, kl_coef=0.05, whiten_rewards=whiten_rewards, gamma=gamma, lam=lam)
    ns = {
        "torch": torch, "INVALID_LOGPROB": trl_ppo.INVALID_LOGPROB, "masked_whiten": trl_ppo.masked_whiten,
        "args": args, "responses": r.responses, "sequence_lengths": r.sequence_lengths,
        "logprobs": r.logprobs.clone(), "ref_logprobs": r.ref_logprobs.clone(), "values": r.values.clone(),
        "scores": r.scores.clone(),
    }  # fmt: skip
    exec(ROLLOUT, ns)
    padding_mask, padding_mask_p1 = ns["padding_mask"], ns["padding_mask_p1"]
    mask, mask_p1 = ~padding_mask, ~padding_mask_p1

    kl = kl_penalty(r.logprobs, r.ref_logprobs, kl_estimator)
    assert_close(torch.where(mask, kl, 0.0), ns["kl"])  # TRL's padding holds INVALID_LOGPROB on both → KL 0

    # Per-token rewards: TRL's kl tensor, TRL's "p1" mask (score one slot after the last token; see module doc).
    rewards = per_token_rewards(r.scores, ns["kl"], mask_p1, beta=args.kl_coef)
    if whiten_rewards:
        rewards = whiten(rewards, mask_p1, shift_mean=False)
    assert_close(rewards, ns["rewards"])

    advantages, returns = gae(rewards, ns["values"], mask_p1, gamma, lam)
    assert_close(returns, ns["returns"])
    assert_close(whiten(advantages, mask), ns["advantages"])


def test_masked_helpers_match_trl_on_cpu():
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        x = torch.randn(7, 13, generator=gen, dtype=torch.float64) * 4 + 1
        mask = torch.rand(7, 13, generator=gen) > 0.3
        mask[:, 0] = True  # no empty row (TRL returns NaN there; we return 0 — see models/masked.py)
        assert_close(masked_mean(x, mask), trl_ppo.masked_mean(x, mask))
        assert_close(masked_mean(x, mask, dim=1), trl_ppo.masked_mean(x, mask, axis=1))
        for unbiased in (True, False):
            assert_close(masked_var(x, mask, unbiased), trl_ppo.masked_var(x, mask, unbiased))
        for shift_mean in (True, False):
            # TRL leaves whitened garbage in masked slots; ours zeroes them.
            assert_close(
                whiten(x, mask, shift_mean), torch.where(mask, trl_ppo.masked_whiten(x, mask, shift_mean), 0.0)
            )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clipped_losses_match_trl_on_cpu(seed):
    r = random_rollout(seed)
    b, t = r.responses.shape
    gen = r.gen
    idxs = torch.arange(t).repeat(b, 1)
    padding_mask = idxs > r.sequence_lengths[:, None]
    padding_mask_p1 = idxs > (r.sequence_lengths + 1)[:, None]
    invalid = trl_ppo.INVALID_LOGPROB
    # As in TRL's train(): log-probs filled with INVALID_LOGPROB on padding, values zeroed beyond the p1 mask.
    old_logprobs = torch.masked_fill(r.logprobs, padding_mask, invalid)
    new_logprobs = torch.masked_fill(
        r.logprobs + 0.3 * torch.randn(b, t, generator=gen, dtype=torch.float64), padding_mask, invalid
    )
    old_values = torch.masked_fill(r.values, padding_mask_p1, 0)
    vpred = torch.masked_fill(
        r.values + 0.5 * torch.randn(b, t, generator=gen, dtype=torch.float64), padding_mask_p1, 0
    )
    returns = torch.masked_fill(torch.randn(b, t, generator=gen, dtype=torch.float64), padding_mask_p1, 0)
    advantages = torch.masked_fill(torch.randn(b, t, generator=gen, dtype=torch.float64), padding_mask, 0)
    logits = torch.randn(b, t, 17, generator=gen, dtype=torch.float64)
    args = SimpleNamespace(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    ns = {
        "torch": torch, "masked_mean": trl_ppo.masked_mean, "args": args, "micro_batch_inds": torch.arange(b),
        "padding_mask": padding_mask, "padding_mask_p1": padding_mask_p1, "vpred": vpred, "mb_values": old_values,
        "mb_return": returns, "new_logprobs": new_logprobs, "mb_logprobs": old_logprobs,
        "mb_advantage": advantages, "logits": logits,
    }  # fmt: skip
    exec(LOSSES, ns)
    exec(STATS, ns)

    pg, pg_m = policy_loss(new_logprobs, old_logprobs, advantages, ~padding_mask, args.cliprange)
    assert_close(pg, ns["pg_loss"])
    assert_close(pg_m["clipfrac"], ns["pg_clipfrac"])
    n_valid, n_total = (~padding_mask).sum().double(), torch.tensor(float(b * t), dtype=torch.float64)
    assert_close(pg_m["approx_kl"] * n_valid / n_total, ns["approxkl"])  # TRL averages over padding too

    vf, vf_m = value_loss(vpred, old_values, returns, ~padding_mask_p1, args.cliprange_value)
    assert_close(vf, ns["vf_loss"])
    assert_close(vf_m["vf_clipfrac"], ns["vf_clipfrac"])

    assert_close(entropy_from_logits(logits), ns["entropy"])
    assert_close(entropy_from_logits(logits), trl_entropy_from_logits(logits, chunk_size=5))
