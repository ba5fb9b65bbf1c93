"""Peer check: our DPO math (models/dpo.py) equals TRL 1.12.0's DPOTrainer on random inputs.

TRL 1.12.0 has no standalone `dpo_loss` function: sequence log-probs, the sigmoid/IPO losses and the logged
implicit rewards are inline in `DPOTrainer._compute_loss`. The tests cut those statements out of the installed
source (tests/unit/trl_source.py) and execute them — with the trainer module's globals and a stub `self` holding
the attributes they read — on the same float64 tensors we give our functions:
  - log-probs: `input_ids = inputs["input_ids"]` … the `if self.ld_alpha is None:` sum → `sequence_logprobs`;
  - losses: `chosen_logratios = …` … the `for loss_type, loss_weight in zip(…)` loop → `preference_loss`;
  - metrics: `chosen_rewards = self.beta * …` … rewards/margins → our reward_chosen/rejected/margin/accuracy.
TRL's IPO divides each log-ratio by the response length (from its unshifted completion mask); ours does the same
when given chosen_lengths/rejected_lengths.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close
from trl_source import Identity, trl_block, trl_without_vllm

from models.dpo import preference_loss, sequence_logprobs

trl = pytest.importorskip("trl")
with warnings.catch_warnings(), trl_without_vllm():
    warnings.simplefilter("ignore")
    from trl.trainer import dpo_trainer as trl_dpo

COMPUTE_LOSS = trl_dpo.DPOTrainer._compute_loss
LOGPS = trl_block(COMPUTE_LOSS, 'input_ids = inputs["input_ids"]', "chosen_logps, rejected_logps = logps.chunk(2")
LOSS = trl_block(COMPUTE_LOSS, "chosen_logratios = chosen_logps - ref_chosen_logps", "for loss_type, loss_weight in")
METRICS = trl_block(
    COMPUTE_LOSS, "chosen_rewards = self.beta * chosen_logratios.detach()", 'self._metrics[mode]["rewards/margins"]'
)


def test_trl_version_is_the_pinned_peer():
    assert trl.__version__ == "1.12.0"


def random_pairs(seed: int, pairs: int = 6, length: int = 9, vocab: int = 13):
    """Token ids of P chosen then P rejected sequences ([chosen; rejected] as TRL batches them), a completion mask
    that starts after a 1–3 token prompt and ends at a random length, and logits for policy and reference."""
    gen = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    ids = torch.randint(0, vocab, (n, length), generator=gen)
    start = torch.randint(1, 4, (n,), generator=gen)
    end = torch.randint(5, length + 1, (n,), generator=gen)
    pos = torch.arange(length)[None, :]
    completion_mask = ((pos >= start[:, None]) & (pos < end[:, None])).long()
    return SimpleNamespace(
        ids=ids, completion_mask=completion_mask,
        logits=torch.randn(n, length, vocab, generator=gen, dtype=torch.float64) * 2,
        ref_logits=torch.randn(n, length, vocab, generator=gen, dtype=torch.float64) * 2,
    )  # fmt: skip


def trl_logps(x, logits):
    ns = dict(vars(trl_dpo))
    ns.update(self=SimpleNamespace(ld_alpha=None), inputs={"input_ids": x.ids, "completion_mask": x.completion_mask},
              outputs=SimpleNamespace(logits=logits))  # fmt: skip
    exec(LOGPS, ns)
    return ns["chosen_logps"], ns["rejected_logps"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sequence_logprobs_match_trl_on_cpu(seed):
    """Ours is computed in fp32 like every log-prob in the code base (models.generation.token_logprobs); TRL's in the
    input dtype (float64 here): equal to 1e-6 relative (|log π| ≈ 30 → a few 1e-6 absolute, fp32 rounding)."""
    x = random_pairs(seed)
    ours = sequence_logprobs(x.logits[:, :-1], x.ids[:, 1:], x.completion_mask[:, 1:])
    chosen, rejected = trl_logps(x, x.logits)
    assert_close(ours.double(), torch.cat([chosen, rejected]), rtol=1e-6, atol=1e-6)
    # The masked targets (prompt, padding) are ignored: any id there, even an out-of-range one, changes nothing.
    ids = torch.where(x.completion_mask.bool(), x.ids, torch.full_like(x.ids, 10_000))
    assert_close(sequence_logprobs(x.logits[:, :-1], ids[:, 1:], x.completion_mask[:, 1:]), ours)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpo_losses_and_metrics_match_trl_on_cpu(loss_type, beta, seed):
    x = random_pairs(seed)
    with torch.no_grad():  # sequence log-probs by TRL's own statements, float64, for both sides
        policy = [t.clone().requires_grad_(True) for t in trl_logps(x, x.logits)]
        ref_chosen_logps, ref_rejected_logps = trl_logps(x, x.ref_logits)
    self = SimpleNamespace(
        beta=beta, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], use_weighting=False,
        label_smoothing=0.0, accelerator=Identity(), _metrics={"train": defaultdict(list)},
    )  # fmt: skip
    ns = dict(vars(trl_dpo))
    ns.update(self=self, completion_mask=x.completion_mask, mode="train", chosen_logps=policy[0],
              rejected_logps=policy[1], ref_chosen_logps=ref_chosen_logps,
              ref_rejected_logps=ref_rejected_logps)  # fmt: skip
    exec(LOSS, ns)
    exec(METRICS, ns)
    trl_grads = torch.autograd.grad(ns["loss"], policy)

    ours = [t.detach().clone().requires_grad_(True) for t in policy]
    lengths = x.completion_mask.sum(1)  # TRL's IPO normaliser: its (unshifted) completion mask
    p = x.ids.shape[0] // 2
    loss, m = preference_loss(loss_type, ours[0], ours[1], ref_chosen_logps, ref_rejected_logps, beta, lengths[:p],
                              lengths[p:])  # fmt: skip
    grads = torch.autograd.grad(loss, ours)
    assert_close(loss, ns["loss"])
    for g, trl_g in zip(grads, trl_grads):
        assert_close(g, trl_g)
    logged = self._metrics["train"]
    for ours, theirs in (("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                         ("reward_margin", "rewards/margins"), ("accuracy", "rewards/accuracies")):  # fmt: skip
        assert m[ours].item() == pytest.approx(logged[theirs][0], rel=1e-12, abs=1e-12), ours
    assert 0 < logged["rewards/accuracies"][0] < 1  # both outcomes occur: the accuracy check is not vacuous
