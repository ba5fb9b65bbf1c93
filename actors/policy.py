"""The policy role: samples responses (KV-cached sampler) and runs the PPO-ptx update on a DeepSpeed engine.

InstructGPT §3.5 / eq. 2: maximise E[r_θ(x,y) − β·log(π/π_SFT)] + γ·E_pretrain[log π(x)]. The first term is
PPO's clipped surrogate on advantages computed from the KL-shaped reward (models/losses.py `policy_loss`); the
second is the pretraining LM loss on Parquet batches the controller slices per rank (`ptx`), mixed in with
coefficient γ = `ptx_coef` in the same backward pass ("PPO-ptx").

Determinism and resume: the minibatch order of iteration i on rank r is drawn from a generator seeded with
(seed, i, r), and torch's global RNG (dropout, if a user turns it on) is reseeded the same way, so an update is a
pure function of (weights, optimizer state, rollout, ptx batch, i) and nothing random needs checkpointing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from actors.base import (
    RolloutMeta,
    WeightsMessage,
    device,
    load_model,
    meta_of,
    response_logits,
    response_logprobs,
    response_logprobs_and_entropy,
    sample_rollout,
    weights_checksum,
)
from actors.rollout import Rollout, RolloutError
from cluster.deepspeed_engine import (
    EngineSpec,
    full_state_dict,
    global_token_scale,
    initialize,
    load_engine,
    save_engine,
)
from cluster.worker_group import DistributedWorker
from models import packed
from models.advantages import KLKind
from models.generation import SamplingParams
from models.losses import LossAgg, lm_loss, policy_loss
from models.masked import masked_mean
from models.seeding import derive_seed


@dataclass(frozen=True)
class PPOUpdateSpec:
    """One PPO update over a rollout shard (per rank)."""

    epochs: int = 4  # passes over the rollout (PPO's K epochs)
    minibatch_size: int = 4  # rows per rank per optimizer step
    clip_eps: float = 0.2  # ε of the clipped surrogate
    ptx_coef: float = 0.0  # γ of PPO-ptx (0 = plain PPO)
    entropy_coef: float = 0.0  # c₂ of PPO's entropy bonus (Schulman et al. 2017 eq. 9; 0 = off)
    seed: int = 0
    # Loss variants (models/losses.py `policy_loss`; docs/ALGORITHMS.md): DAPO's clip-higher, the aggregation
    # (token-mean: PPO, DAPO, RLOO, REINFORCE++; seq-mean-token-mean: GRPO; seq-mean-token-sum-norm: Dr. GRPO
    # with max_response_len = the sampler's max_new_tokens) and the estimator of a KL loss term (GRPO: k3).
    clip_low: float | None = None  # None = clip_eps
    clip_high: float | None = None  # None = clip_eps
    loss_agg: LossAgg = "token-mean"
    max_response_len: int | None = None
    kl_estimator: KLKind = "k3"
    # Bounded-staleness async RL (jobs/rl/staleness.py): None = on-policy; a float = the truncation cap of the
    # behaviour importance weight of the decoupled objective (models/losses.py `policy_loss`).
    behaviour_cap: float | None = None
    # Tail averaging (Polyak & Juditsky 1992; SWA, Izmailov et al. 2018): from this 0-based iteration on, keep the
    # running mean of the weights after each update; `averaged_weights` exports it. None = off.
    average_from: int | None = None


@dataclass(frozen=True)
class PolicySpec:
    checkpoint: str  # SFT checkpoint directory (HF GPT-2 layout) the policy starts from
    engine: EngineSpec = field(default_factory=EngineSpec)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_id: int = 0  # the token that ends a response
    update: PPOUpdateSpec = field(default_factory=PPOUpdateSpec)


@dataclass(frozen=True)
class WeightsInfo:
    version: int  # number of PPO updates applied to these weights
    checksum: str  # weights_checksum of the full fp32 weights


@dataclass(frozen=True)
class UpdateResult:
    metrics: dict[str, float]  # means over this rank's optimizer steps
    weights: WeightsInfo  # the weights after the update


def n_steps(rows: int, spec: PPOUpdateSpec) -> int:
    """Optimizer steps one update takes on a shard of `rows` rows (the ptx batch must have this many)."""
    if rows % spec.minibatch_size:
        raise RolloutError(f"minibatch_size: a shard of {rows} rows is not divisible by {spec.minibatch_size}")
    return spec.epochs * rows // spec.minibatch_size


class PolicyWorker(DistributedWorker):
    """One data-parallel rank of the policy. Plain class; jobs/ppo.py wires it with `ray.remote`."""

    role = "policy"

    def __init__(self, spec: PolicySpec, rank: int = 0, world_size: int = 1) -> None:
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.engine: Any = None
        self.version = 0
        self.info: WeightsInfo | None = None  # the last weights_info: valid until the weights change
        # spec.update.average_from: the number of updates averaged (every rank) and their fp32 sum (rank 0 only);
        # saved with the engine, so a resumed or recovered run averages the same iterations
        self.averaged: int = 0
        self.average_sum: dict[str, torch.Tensor] | None = None

    # --- life cycle -------------------------------------------------------------------------------------------
    def setup(self, snapshot: tuple[str, str] | None = None) -> WeightsInfo:
        """Collective: build the engine from the SFT checkpoint, then restore `(directory, tag)` if given."""
        model = load_model(self.spec.checkpoint, "lm")
        self.engine = initialize(model, self.spec.engine)
        self.version, self.averaged, self.average_sum = 0, 0, None
        if snapshot is not None:
            state = load_engine(self.engine, *snapshot)  # rank 0's client state, read by every rank
            self.version, self.averaged = int(state["version"]), int(state.get("averaged", 0))
            self.average_sum = state.get("average_sum") if self.rank == 0 else None
        return self.weights_info()

    def save(self, directory: str, tag: str) -> None:
        """Collective: model + optimizer state + version (and the running weight average) under directory/tag."""
        save_engine(self.engine, directory, tag,
                    {"version": self.version, "averaged": self.averaged, "average_sum": self.average_sum})

    def weights_info(self) -> WeightsInfo:
        """Collective under ZeRO/bf16: version and checksum of the current weights (kept for `generate`: setup and
        update end with this call, and nothing else changes the weights)."""
        self.info = WeightsInfo(self.version, weights_checksum(full_state_dict(self.engine)))
        return self.info

    def weights(self) -> WeightsMessage | None:
        """Collective: the full weights for rollout workers / HF export, on rank 0 (None elsewhere)."""
        state = full_state_dict(self.engine)
        if self.rank != 0:
            return None
        arrays = {k: v.numpy() for k, v in state.items()}
        return WeightsMessage(self.version, weights_checksum(arrays), arrays)

    def averaged_weights(self) -> WeightsMessage | None:
        """Collective: the mean of the weights after each update since `average_from` (the last weights if none
        was averaged yet), on rank 0 (None elsewhere) — what a run with ppo.average_last exports."""
        if self.averaged == 0:
            return self.weights()
        if self.rank != 0 or self.average_sum is None:
            return None
        arrays = {k: (v / self.averaged).numpy() for k, v in self.average_sum.items()}
        return WeightsMessage(self.version, weights_checksum(arrays), arrays)

    def _accumulate(self, iteration: int) -> None:
        """Collective (the gather): add the weights after this iteration's update to the running average. Averaging
        iterates cancels the part of each step that is sampling noise — a random walk that moves π away from the
        SFT model (KL) without buying reward — and keeps the drift they share (docs/OVEROPTIMISATION.md)."""
        start = self.spec.update.average_from
        if start is None or iteration < start:
            return
        state = full_state_dict(self.engine)
        self.averaged += 1
        if self.rank != 0:
            return
        if self.average_sum is None:
            self.average_sum = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in state.items()}
        for k, v in state.items():
            self.average_sum[k] += v.float()

    # --- PPO --------------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], row_index: list[int], seeds: list[int], n: int = 1
                 ) -> tuple[RolloutMeta, Rollout]:
        """Sample a rollout shard with the current weights, `n` samples per prompt (call with num_returns=2: the
        meta is fetched by the controller, the rollout stays in the object store)."""
        if self.engine.zero_optimization_stage() == 3:
            raise RolloutError("policy.zero_stage: 3 partitions the weights; sample with rollout workers instead")
        model = self.engine.module
        model.eval()
        # The checksum of these weights is known since setup/update returned (hashing them again cost ~20 ms of
        # every iteration); computed afresh only if no weights_info followed the last change.
        info = self.info if self.info is not None and self.info.version == self.version else self.weights_info()
        checksum = info.checksum
        rollout = sample_rollout(model, prompts, row_index, seeds, self.spec.sampling, self.spec.eos_id, self.version,
                                 checksum, n=n)
        return meta_of(rollout), rollout

    def update(self, rollout: Rollout, ptx: np.ndarray | None, iteration: int, kl_coef: float = 0.0
               ) -> UpdateResult:
        """Collective: `epochs` passes of clipped-surrogate minibatch steps (+ γ·LM loss on ptx[step]).

        rollout: this rank's shard, with advantages. ptx: (steps, rows, block+1) int token blocks or None.
        kl_coef: β of KL(π‖π_ref) as a loss term (GRPO; needs the rollout's ref_logprobs), 0 = none (KL in the
        reward instead).
        """
        spec, eng, dev = self.spec.update, self.engine, device()
        self.info = None  # the weights are about to change
        if rollout.advantages is None:
            raise RolloutError("advantages: the rollout has not been finalized")
        steps = n_steps(rollout.batch_size, spec)
        if ptx is not None and (ptx.ndim != 3 or ptx.shape[0] != steps):
            raise RolloutError(f"ptx: expected ({steps}, rows, block+1) token blocks, got {ptx.shape}")
        order = torch.Generator().manual_seed(derive_seed(spec.seed, iteration, self.rank))
        torch.manual_seed(derive_seed(spec.seed, iteration, self.rank, 1))
        temperature = self.spec.sampling.temperature
        gap: dict[str, float] = {}
        behaviour = None  # π_behav of stale rollouts (max_staleness >= 1); old_logprobs become the proximal π_old
        if spec.behaviour_cap is not None and (rollout.weight_version != self.version or not rollout.exact_logprobs):
            behaviour = rollout.old_logprobs
        if not rollout.exact_logprobs or behaviour is not None:  # vLLM's kernels, or older weights than ours
            rollout, gap = self.recompute_old_logprobs(rollout)
        sums: dict[str, float] = defaultdict(float)
        eng.train()
        step = 0
        for _ in range(spec.epochs):
            perm = torch.randperm(rollout.batch_size, generator=order)
            for k in range(rollout.batch_size // spec.minibatch_size):
                rows = perm[k * spec.minibatch_size:(k + 1) * spec.minibatch_size]
                part = rollout.select(rows)
                mask = part.action_mask.to(dev)
                logprobs, entropy = response_logprobs_and_entropy(response_logits(eng, part), part, temperature)
                ref = part.ref_logprobs.to(dev) if kl_coef and part.ref_logprobs is not None else None
                loss, m = policy_loss(logprobs, part.old_logprobs.to(dev), part.advantages.to(dev), mask,
                                      spec.clip_eps, clip_low=spec.clip_low, clip_high=spec.clip_high,
                                      loss_agg=spec.loss_agg, max_response_len=spec.max_response_len,
                                      kl_coef=kl_coef, ref_logprobs=ref, kl_estimator=spec.kl_estimator,
                                      **({} if behaviour is None else
                                         {"behaviour_logprobs": behaviour.index_select(0, rows).to(dev),
                                          "behaviour_cap": spec.behaviour_cap}))
                mean_entropy = masked_mean(entropy, mask)
                sums["entropy"] += float(mean_entropy.detach())
                sums["pg_loss"] += float(loss.detach())
                if spec.entropy_coef:  # L_CLIP − c₂·S[π] (Schulman et al. 2017 eq. 9): keeps the policy spread
                    loss = loss - spec.entropy_coef * mean_entropy
                if spec.loss_agg == "token-mean":  # token mean over all ranks' minibatch rows, not per rank
                    loss = loss * global_token_scale(mask)
                # The sequence means need nothing: every rank holds the same number of rows, so DeepSpeed's
                # gradient average is the global mean (docs/ALGORITHMS.md, data-parallel note).
                if ptx is not None and spec.ptx_coef > 0:
                    block = torch.tensor(ptx[step], dtype=torch.long, device=dev)
                    ptx_loss = lm_loss(eng(block[:, :-1]), block[:, 1:])
                    loss = loss + spec.ptx_coef * ptx_loss
                    sums["ptx_loss"] += float(ptx_loss.detach())
                eng.backward(loss)
                eng.step()
                for name in ("clipfrac", "clipfrac_low", "clipfrac_high", "approx_kl", "ratio", "kl",
                             "behaviour_weight", "behaviour_capped"):
                    if name in m:
                        sums[name if name != "kl" else "kl_loss_term"] += float(m[name])
                norm = eng.get_global_grad_norm()
                if norm is not None:
                    sums["grad_norm"] += float(norm)
                step += 1
        packed.invalidate(eng.module)  # ZeRO wrote the new weights through .data: drop the sampler's packed copy
        self.version += 1
        self._accumulate(iteration)
        metrics = {**{k: v / steps for k, v in sums.items()}, **gap}
        return UpdateResult(metrics, self.weights_info())

    @torch.no_grad()
    def recompute_old_logprobs(self, rollout: Rollout) -> tuple[Rollout, dict[str, float]]:
        """The rollout with old_logprobs replaced by this policy's own forward pass (the weights it was sampled
        with: the update has not started), and the rollout-vs-trainer gap per response token: mean and max
        |Δ log p| — logged every iteration so numerical drift between the engines is visible, not silent."""
        eng, temperature = self.engine, self.spec.sampling.temperature
        eng.eval()
        parts = []
        for a in range(0, rollout.batch_size, self.spec.update.minibatch_size):
            part = rollout.select(range(a, min(a + self.spec.update.minibatch_size, rollout.batch_size)))
            parts.append(response_logprobs(response_logits(eng, part), part, temperature).float().cpu())
        ours = torch.cat(parts)
        mask = rollout.action_mask.bool()
        diff = (ours - rollout.old_logprobs).abs()[mask]
        gap = {"logprob_gap_mean": float(diff.mean()) if diff.numel() else 0.0,
               "logprob_gap_max": float(diff.max()) if diff.numel() else 0.0}
        return rollout.replace(old_logprobs=torch.where(mask, ours, torch.zeros_like(ours)), exact_logprobs=True), gap
