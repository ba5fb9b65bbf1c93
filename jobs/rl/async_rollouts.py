"""The controller's side of bounded-staleness asynchronous RL (`max_staleness`; the design and the math are in
jobs/rl/staleness.py): submitting generations ahead, taking them with the staleness check, storing the ones in
flight with every checkpoint and reading them back on resume, and the per-stage timeline of each metrics row."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import ray

from actors.base import RolloutMeta
from jobs.rl.config import PPOJobConfig
from jobs.rl.staleness import Ahead, StageClock, check_staleness, load_rollouts, ready_at, save_rollouts


class AsyncRollouts:
    """The controller's side of `max_staleness` (mixed into jobs/rl/controller.py `Controller`, whose state —
    groups, weights version, stage recovery, timings — it shares)."""

    cfg: PPOJobConfig
    expected: Any  # WeightsInfo of the policy's current weights
    timings: StageClock
    state_dir: Path
    rollout: Any
    rollout_bytes: int

    def _async_init(self) -> None:
        self.timings = StageClock()
        self.ahead: dict[int, Ahead] = {}  # iteration → generation in flight
        self.saved: dict[int, dict[str, Any]] = {}  # iteration → in-flight rollouts of the resumed checkpoint
        self.known: dict[int, str] = {}  # version → checksum of the policy's last k+1 weights
        self.consumed_staleness = 0

    # --- the loop's two calls ---------------------------------------------------------------------------------
    def rollouts(self, it: int) -> list[Any]:
        """Iteration `it`'s rollout shards (ObjectRefs): generated now (k = 0: the synchronous loop's exact call,
        or nothing in flight yet), else the generation submitted up to k updates ago, or read back from the
        checkpoint being resumed; refused unless within the staleness bound."""
        k = self.cfg.max_staleness
        if not k:
            return self.generate(it, self.prompts(it))  # type: ignore[attr-defined]
        self.weights_seen()
        if it in self.saved:
            metas, refs = self._load_saved(it)
        elif it in self.ahead:
            metas, refs = self._wait_ahead(self.ahead.pop(it))
        else:
            self.consumed_staleness = 0
            return self.generate(it, self.prompts(it))  # type: ignore[attr-defined]
        check_staleness(metas, self.known, self.expected.version, k)
        self.consumed_staleness = max(self.expected.version - m.weight_version for m in metas)
        self.rollout_bytes = sum(m.nbytes for m in metas)
        return refs

    def submit_ahead(self, it: int) -> None:
        """k >= 1: submit the generation of iterations it+1 … it+k that is not in flight, right after iteration
        `it`'s rollouts were taken, so the rollout workers sample while `it` is scored and the trainers update
        (k = 0: nothing). The workers hold the weights of the policy now; the broadcast after the update queues
        behind these calls (an actor runs its calls in order)."""
        todo = [j for j in range(it + 1, it + 1 + self.cfg.max_staleness)
                if j not in self.ahead and j not in self.saved]
        if todo:  # elastic pool: workers join here too (they may be busy: no liveness check; the dead surface
            # as failed calls, which `_recover` drops)
            self._reconcile_rollout(check_alive=False)  # type: ignore[attr-defined]
        for j in todo:
            shards = self.prompts(j)  # type: ignore[attr-defined]
            pairs = self.rollout.generate(shards)
            metas = [m for m, _ in pairs]
            ready = ray.remote(ready_at).options(num_cpus=0).remote(*metas)
            self.ahead[j] = Ahead(j, shards, metas, [r for _, r in pairs], self.timings.now(), ready)

    # --- bookkeeping ------------------------------------------------------------------------------------------
    def weights_seen(self) -> None:
        """Record the policy's current (version, checksum); keep the last k+1 (what a rollout may use)."""
        self.known[self.expected.version] = self.expected.checksum
        self.known = {v: c for v, c in self.known.items() if v >= self.expected.version - self.cfg.max_staleness}

    def _wait_ahead(self, a: Ahead) -> tuple[list[RolloutMeta], list[Any]]:
        attempts: list[int] = []

        def call() -> tuple[list[Any], Any]:
            attempts.append(1)
            if len(attempts) == 1:
                return a.metas, a.rollouts  # submitted ahead, already running (or done)
            pairs = self.rollout.generate(a.shards)  # its worker died: again, on the weights the group holds now
            return [m for m, _ in pairs], [r for _, r in pairs]

        metas, refs = self._stage(a.iteration, "generate", {"rollout": call})["rollout"]  # type: ignore[attr-defined]
        try:
            end = float(ray.get(a.ready, timeout=self.cfg.fault.stage_timeout_s)) - self.timings.t0
        except Exception:  # noqa: BLE001 - the first attempt failed and was redone: its end is now
            end = self.timings.now()
        self.timings.spans["generate"] = [round(a.submitted, 4), round(end, 4)]
        return metas, refs

    def _load_saved(self, it: int) -> tuple[list[RolloutMeta], list[Any]]:
        """The in-flight rollouts of iteration `it` stored with the checkpoint being resumed, read by a Ray task
        into the object store (num_returns: metas, then rollouts)."""
        t0 = time.perf_counter()
        entry = self.saved.pop(it)
        n = int(entry["shards"])
        refs = ray.remote(load_rollouts).options(num_cpus=0, num_returns=2 * n).remote(
            str(self.state_dir / "rollouts" / entry["file"]))
        metas = ray.get(list(refs[:n]), timeout=self.cfg.fault.stage_timeout_s)
        self.timings["generate"] = time.perf_counter() - t0
        return metas, list(refs[n:])

    def save_in_flight(self, it: int) -> dict[str, Any]:
        """Checkpoint part: write the rollouts in flight (iterations it+1 … it+k) to trainer_state/rollouts/ with
        Ray tasks, wait for them; returns what the controller state records about them. Drops files no kept
        checkpoint names any more."""
        directory = self.state_dir / "rollouts"
        pending = {j: a for j, a in self.ahead.items() if a.saved is None}
        refs = {j: ray.remote(save_rollouts).options(num_cpus=0).remote(
            str((directory / f"it-{j:06d}.npz").resolve()), *a.rollouts) for j, a in pending.items()}
        for j, metas in zip(refs, ray.get(list(refs.values()), timeout=self.cfg.fault.stage_timeout_s) if refs else []):
            self.ahead[j].saved = f"it-{j:06d}.npz"
            self.ahead[j].saved_metas = [dataclasses.asdict(m) for m in metas]
        entries = [{"iteration": j, "file": a.saved, "shards": len(a.rollouts), "metas": a.saved_metas}
                   for j, a in sorted(self.ahead.items())]
        # Kept checkpoints (latest among them) name in-flight iterations > it − keep_checkpoints.
        for old in directory.glob("it-*.npz"):
            if int(old.stem[3:]) <= it - self.cfg.keep_checkpoints:
                old.unlink(missing_ok=True)
        return {"in_flight": entries, "weights_known": {str(v): c for v, c in self.known.items()}}

    def resume_in_flight(self, state: dict[str, Any], start_iteration: int, version: int) -> None:
        """Resume part, before anything starts: take the checkpoint's in-flight rollouts and refuse any that the
        policy would consume outside the staleness bound (its version then: `version` + iterations until then)."""
        self.known = {int(v): c for v, c in state.get("weights_known", {}).items()}
        k = self.cfg.max_staleness
        for entry in state.get("in_flight", []):
            j = int(entry["iteration"])
            metas = [RolloutMeta(**m) for m in entry["metas"]]
            check_staleness(metas, self.known, version + j - start_iteration, k)
            self.saved[j] = entry

    def staleness_metrics(self) -> dict[str, Any]:
        """The row's `timeline` (stage → [start, end] seconds since start-up) and, with k >= 1, how many versions
        behind the policy the consumed rollouts were."""
        out: dict[str, Any] = {"timeline": self.timings.timeline()}
        if self.cfg.max_staleness:
            out["staleness"] = self.consumed_staleness
        return out
