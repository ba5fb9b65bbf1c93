"""PPO-ptx (InstructGPT §3.5, eq. 2): the policy's update is the clipped surrogate plus γ · the pretraining LM loss.

`actors.policy.PolicyWorker.update` runs on a real DeepSpeed engine in a one-rank gloo world (a spawned process,
~10 s) and is checked against something independent of it:
- the `ptx_loss` it reports equals a next-token cross entropy written out by hand (log-softmax + gather, float64)
  on the same token block at the same weights;
- its weights after one optimizer step equal a hand-written AdamW step (Loshchilov & Hutter 2019, Alg. 2, first
  step: p ← p − lr · m̂/(√v̂+ε)) on the gradient of surrogate + γ · that hand-written cross entropy, for γ = 0
  and γ = 0.5, so the coefficient demonstrably enters the update with its value (and γ = 0 with a ptx batch equals
  no ptx at all); likewise for the entropy bonus − c₂ · H (ppo.entropy_coef) against a hand-written entropy.
"""

from __future__ import annotations

from typing import Any

import torch
from one_rank import run_one_rank

# ε large enough that the first (sign-like) Adam step does not amplify float round-off in tiny gradients
LR, BETAS, EPS = 1e-2, (0.9, 0.95), 1e-4
VOCAB = 61


def hand_lm_loss(model: Any, block: torch.Tensor) -> torch.Tensor:
    """Mean over every (row, position) of −log softmax(model(block[:, :-1]))[next token], in float64."""
    logits = model(block[:, :-1]).double()
    logp = logits - logits.exp().sum(-1, keepdim=True).log()
    nll = [-logp[b, t, int(block[b, t + 1])] for b in range(block.shape[0]) for t in range(block.shape[1] - 1)]
    return torch.stack(nll).mean()


def _rollout(model: Any) -> Any:
    from actors.base import response_logits, response_logprobs
    from actors.rollout import Rollout

    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(1, VOCAB, (4, 3), generator=g)
    response = torch.randint(1, VOCAB, (4, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    r = Rollout(prompt_ids=prompt, prompt_mask=torch.ones_like(prompt), response_ids=response * mask,
                action_mask=mask, old_logprobs=torch.zeros(4, 5), row_index=torch.arange(4))
    with torch.no_grad():  # π_old = π at these weights: ratio 1 before the step
        old = response_logprobs(response_logits(model, r), r, 1.0)
    return r.replace(old_logprobs=old, advantages=torch.randn(4, 5, generator=g) * mask)


def _hand_update(path: str, rollout: Any, block: torch.Tensor, gamma: float, entropy: float = 0.0
                 ) -> dict[str, torch.Tensor]:
    """One AdamW step (weight decay 0, no clipping) on surrogate + γ·hand CE − c₂·hand entropy (token mean over the
    response tokens, −Σ p log p in float64), from the checkpoint's weights."""
    from actors.base import load_model, response_logits, response_logprobs
    from models.losses import policy_loss

    model = load_model(path, "lm")
    mask = rollout.action_mask
    logits = response_logits(model, rollout)
    pg, _ = policy_loss(response_logprobs(logits, rollout, 1.0), rollout.old_logprobs, rollout.advantages, mask, 0.2)
    loss = pg + gamma * hand_lm_loss(model, block).float() if gamma else pg
    if entropy:
        logp = logits.double() - logits.double().exp().sum(-1, keepdim=True).log()
        loss = loss - entropy * (-(logp.exp() * logp).sum(-1))[mask.bool()].mean().float()
    loss.backward()
    out = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            m_hat, v_hat = g, g * g  # (1−β)g / (1−β^1) and (1−β₂)g² / (1−β₂^1)
            out[n] = p - LR * m_hat / (v_hat.sqrt() + EPS)
    return out


def _body(path: str) -> dict[str, Any]:
    import numpy as np

    from actors.base import load_model
    from actors.policy import PolicySpec, PolicyWorker, PPOUpdateSpec
    from cluster.deepspeed_engine import EngineSpec, OptimConfig, full_state_dict
    from models.generation import SamplingParams

    rollout = _rollout(load_model(path, "lm"))
    block = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    ptx = block.numpy()[None].astype(np.int64)  # (steps=1, rows=2, block+1=9)
    with torch.no_grad():
        out: dict[str, Any] = {"hand_ce": float(hand_lm_loss(load_model(path, "lm"), block))}
    for name, gamma, batch, ent in (("g0", 0.0, ptx, 0.0), ("g05", 0.5, ptx, 0.0), ("g2", 2.0, ptx, 0.0),
                                    ("none", 0.5, None, 0.0), ("ent", 0.0, None, 0.5)):
        optim = OptimConfig(lr=LR, min_lr_ratio=1.0, warmup_steps=0, max_steps=1, weight_decay=0.0,
                            betas=list(BETAS), eps=EPS, grad_clip=0.0, micro_batch_size=4, grad_accum=1)
        spec = PolicySpec(path, EngineSpec(optim, precision="fp32"), SamplingParams(temperature=1.0), 0,
                          PPOUpdateSpec(epochs=1, minibatch_size=4, ptx_coef=gamma, entropy_coef=ent))
        worker = PolicyWorker(spec)
        worker.setup()
        res = worker.update(rollout, batch, iteration=0)
        weights = {k: v.clone() for k, v in full_state_dict(worker.engine).items()}
        out[name] = (res.metrics, {k: v.numpy() for k, v in weights.items()})
    out["hand_g0"] = {k: v.numpy() for k, v in _hand_update(path, rollout, block, 0.0).items()}
    out["hand_g05"] = {k: v.numpy() for k, v in _hand_update(path, rollout, block, 0.5).items()}
    out["hand_ent"] = {k: v.numpy() for k, v in _hand_update(path, rollout, block, 0.0, entropy=0.5).items()}
    return out


def test_ptx_loss_is_the_lm_loss_and_its_coefficient_scales_its_share_of_the_update(tmp_path) -> None:
    from models.checkpoint import save_checkpoint
    from models.config import GPTConfig
    from models.gpt import GPT

    torch.manual_seed(0)
    cfg = GPTConfig.from_name("nano", vocab_size=VOCAB, eos_token_id=0, bos_token_id=0)
    path = str(save_checkpoint(GPT(cfg), tmp_path / "sft", kind="lm"))
    out = run_one_rank(_body, path)

    # the reported ptx loss is the cross entropy on the block at the weights before the step
    assert "ptx_loss" not in out["g0"][0] and "ptx_loss" not in out["none"][0]
    for name in ("g05", "g2"):
        assert abs(out[name][0]["ptx_loss"] - out["hand_ce"]) < 1e-5 * out["hand_ce"], (name, out[name][0])
    # γ = 0 with a ptx batch is plain PPO; no batch is plain PPO whatever γ says
    for name, w in out["g0"][1].items():
        assert (w == out["none"][1][name]).all(), name
    # the update equals the hand-written AdamW step on surrogate + γ·CE, for both γ
    # ... and PPO's entropy bonus (ppo.entropy_coef, Schulman et al. 2017 eq. 9) enters it as − c₂ · token-mean H
    for name, hand in (("g0", "hand_g0"), ("g05", "hand_g05"), ("ent", "hand_ent")):
        weights = out[name][1]
        ref = out[hand]
        assert set(ref) <= set(weights) and len(ref) > 10
        for k, v in ref.items():
            torch.testing.assert_close(torch.from_numpy(weights[k]), torch.from_numpy(v), atol=1e-4 * LR, rtol=0,
                                       msg=lambda m, k=k, n=name: f"{n} {k}: {m}")
    # and the coefficient moves the weights: γ = 0, 0.5 and 2 give three different policies
    wte = "transformer.wte.weight"
    deltas = [abs(out[a][1][wte] - out[b][1][wte]).max() for a, b in (("g0", "g05"), ("g05", "g2"), ("g0", "ent"))]
    assert min(deltas) > 1e-4, deltas
