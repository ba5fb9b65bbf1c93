"""Bounded-staleness asynchronous RL (`max_staleness` = k): the rollout workers sample iteration t+1 … t+k while
the trainers update iteration t, never with weights more than k versions old.

How (jobs/ppo.py, jobs/rl/controller.py): before the update of iteration t is submitted, the controller submits
the generation of every iteration up to t+k that is not in flight yet (`Controller.submit_ahead`); a Ray actor runs
its calls in submission order, so the generation runs on the weights the workers hold — version t−k+… at most k
behind — and the weights broadcast after the update queues behind it. At iteration t the controller takes the
in-flight generation of t (`Controller.rollouts`) and refuses it (`StaleWeightsError`) unless its weights version
v satisfies current − k ≤ v ≤ current and its checksum is the one the policy had at version v
(`check_staleness`). k = 0 is the synchronous loop, literally the same calls as before this module existed.

The loss corrects for the lag with the decoupled PPO objective (models/losses.py `policy_loss`, Hilton et al. 2021
§3; AReaL, Fu et al. 2025 §5): the policy recomputes π_old = its own weights at the start of the update (the
proximal policy the ratio is clipped around) and reweights each token by the truncated importance weight
min(π_old/π_behav, loss.behaviour_cap) (IMPALA, Espeholt et al. 2018 §4.1). Every online algorithm here optimises
that one clipped surrogate (docs/ALGORITHMS.md), so every one of them can use it — `STALENESS_CORRECTION` says
what it means for each; an algorithm missing from it is refused before anything starts.

Exact resume for any k: a checkpoint stores the in-flight rollouts with the controller state. A Ray task writes
them (the controller never fetches a rollout) to trainer_state/rollouts/<tag>-<iteration>.npz, atomically, before
the controller state that names them. Generation is submitted for iterations past `iterations` too (the trajectory
must not depend on where a run stops), so a run stopped after N iterations and resumed continues exactly as an
uninterrupted one; the price is k generations at the end of a run that no update consumes.

Timeline: `StageClock` records each stage's [start, end] (seconds since the controller started) next to its
duration; metrics.jsonl gets them as `timeline` per iteration, with the generation's real end (a zero-CPU task
that returns the clock when the rollout metadata resolved), so the overlap of generate(t+1) with update(t) shows.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.base import RolloutMeta, meta_of
from actors.rollout import TENSOR_FIELDS, Rollout
from jobs.config import ConfigError
from models.files import atomic_open

# algorithm → how its loss corrects stale samples (docs/ALGORITHMS.md "Asynchronous RL"). All four train the one
# clipped surrogate of models/losses.py, so the decoupled objective applies to each; the notes say what else the
# lag touches.
STALENESS_CORRECTION: dict[str, str] = {
    "ppo": "decoupled clipped surrogate + truncated behaviour weight; GAE on the critic's current values (the "
           "score stage runs after the previous update)",
    "grpo": "decoupled clipped surrogate + truncated behaviour weight; the k3 KL loss term is taken at π_θ",
    "rloo": "decoupled clipped surrogate + truncated behaviour weight (a REINFORCE estimator with a "
            "leave-one-out baseline: truncated importance sampling)",
    "reinforce_pp": "decoupled clipped surrogate + truncated behaviour weight (truncated importance sampling)",
}


class StaleWeightsError(RuntimeError):
    """A rollout was sampled with weights other than the policy's, or more than `max_staleness` versions old."""


def check_config(k: int, behaviour_cap: float, generator_role: str, algorithm: str) -> None:
    """ConfigError naming `max_staleness` (or `loss.behaviour_cap`) before anything starts. generator_role: the
    role that samples ("rollout" workers, or the "policy" itself)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError(f"max_staleness: must be an integer >= 0 (0 = synchronous), got {k!r}")
    if not behaviour_cap >= 1.0:
        raise ConfigError(f"loss.behaviour_cap: the truncation of the behaviour importance weight must be >= 1, "
                          f"got {behaviour_cap}")
    if k == 0:
        return
    if generator_role != "rollout":
        raise ConfigError(f"max_staleness: {k} generates the next iterations on rollout workers while the policy "
                          "updates; set placement.replicas.rollout >= 1 (without them the policy samples itself and "
                          "cannot overlap the two)")
    if algorithm not in STALENESS_CORRECTION:
        raise ConfigError(f"max_staleness: algorithm {algorithm!r} has no importance correction for stale "
                          f"rollouts (those that do: {', '.join(STALENESS_CORRECTION)}); use max_staleness: 0")


def check_staleness(metas: list[RolloutMeta], known: dict[int, str], current: int, k: int) -> None:
    """Refuse a shard unless its weights version v is within [current − k, current] and its checksum is the
    policy's at v (`known`: version → checksum of the policy's recent weights). k = 0: exactly the current ones."""
    for i, m in enumerate(metas):
        if not current - k <= m.weight_version <= current:
            bound = "the policy's" if k == 0 else f"at most max_staleness={k} versions behind it"
            raise StaleWeightsError(
                f"weight_version: rollout shard {i} was sampled with weights version {m.weight_version} (checksum "
                f"{m.weight_checksum[:12]}…), the policy is at version {current} ({known.get(current, '')[:12]}…); "
                f"a rollout must use {bound}: refusing it")
        had = known.get(m.weight_version)
        if had != m.weight_checksum:
            raise StaleWeightsError(
                f"weight_checksum: rollout shard {i} claims weights version {m.weight_version} with checksum "
                f"{m.weight_checksum[:12]}…, the policy's version {m.weight_version} had "
                f"{'none recorded' if had is None else had[:12] + '…'}; refusing it")


@dataclass
class Ahead:
    """A generation submitted ahead of its iteration (k >= 1)."""

    iteration: int
    shards: list[Any]  # PromptShards, to regenerate after a worker failure
    metas: list[Any]  # ObjectRefs of RolloutMeta
    rollouts: list[Any]  # ObjectRefs of Rollout
    submitted: float  # StageClock offset
    ready: Any  # ObjectRef of the wall-clock time when every meta had resolved
    saved: str | None = None  # checkpoint file holding these rollouts, once written
    saved_metas: list[dict[str, Any]] | None = None  # their RolloutMeta fields, for the controller state


def ready_at(*metas: RolloutMeta) -> float:
    """Ray task body (num_cpus=0): the wall clock once every meta has resolved (Ray resolves the arguments first)."""
    return time.time()


class StageClock(dict):  # type: ignore[type-arg]
    """`timings[stage] = seconds` (how the controller times its stages) also records the stage's span, as offsets
    in seconds since the clock started: spans[stage] = [end − seconds, end]."""

    def __init__(self) -> None:
        super().__init__()
        self.t0 = time.time()
        self.spans: dict[str, list[float]] = {}

    def now(self) -> float:
        return time.time() - self.t0

    def __setitem__(self, stage: str, seconds: float) -> None:
        super().__setitem__(stage, seconds)
        end = self.now()
        self.spans[stage] = [round(end - seconds, 4), round(end, 4)]

    def timeline(self) -> dict[str, list[float]]:
        """The spans of the stages since the last call (one iteration's), then forget them."""
        out, self.spans = self.spans, {}
        return {k: v for k, v in out.items() if k != "startup"}


# --- in-flight rollouts on disk (Ray task bodies: the controller never holds a rollout) -----------------------
def save_rollouts(path: str, *rollouts: Rollout) -> list[RolloutMeta]:
    """Write the shards of one iteration to `path` (.npz of every tensor field + a JSON header), atomically."""
    arrays: dict[str, np.ndarray] = {}
    header = []
    for i, r in enumerate(rollouts):
        for name in TENSOR_FIELDS:
            value = getattr(r, name)
            if value is not None:
                arrays[f"{i}.{name}"] = value.detach().cpu().numpy()
        header.append({"weight_version": r.weight_version, "weight_checksum": r.weight_checksum, "engine": r.engine,
                       "exact_logprobs": r.exact_logprobs})
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with atomic_open(path, "wb") as f:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        f.write(buf.getvalue())
    return [meta_of(r) for r in rollouts]


def load_rollouts(path: str) -> tuple[Any, ...]:
    """Ray task body (num_returns = 2·shards): the metas, then the rollouts of a file written by `save_rollouts`."""
    with np.load(Path(path)) as z:
        header = json.loads(bytes(z["header"]).decode())
        rollouts = [Rollout(**{name: torch.from_numpy(z[f"{i}.{name}"].copy()) for name in TENSOR_FIELDS
                               if f"{i}.{name}" in z.files}, **h).validate() for i, h in enumerate(header)]
    return (*[meta_of(r) for r in rollouts], *rollouts)


