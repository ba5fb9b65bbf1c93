"""Fault injection — a chaos tool for users and the recovery tests — kept in this one module.

Nothing here runs unless faults are configured: the jobs wrap a worker class or a training engine with
`instrument_actor` / `instrument_engine` at wiring time when their plan is non-empty, and the role methods and
training loops themselves carry no hooks.

A crash is `os._exit(1)` inside the call: no exception, no cleanup, no reply — what an OOM kill or a segfault
does to a process. It happens after the call's work (for an update: after its first optimizer step, leaving
half-updated weights behind) and before its result is returned, so recovery must come from checkpoints.

Two targets:

- Ray actors (the PPO roles, config `fault.inject: ["role:iteration:stage", …]`, parsed by `ActorFault.parse`).
  `instrument_actor(cls, methods)` returns a subclass whose `methods` can be armed: `arm_fault(method,
  after_engine_steps)`. The controller arms replica 0 right before it submits the stage the plan names; the next
  call of that method on that process then crashes. The arming lives in the process's memory, so the process Ray
  restarts is not armed: one arming, one crash.
- Ray Train loops (pretrain, SFT, RM; config `failure.inject: ["rank:step", …]`, `StepFault.parse`).
  `instrument_engine(engine, plan, rank, dp_size)` wraps the engine's `train_step`: worker `rank` exits during
  optimizer step `step` (1-based), after the step's work, before it is reported. Ray Train restarts workers as new
  processes, so a fault's firing is recorded in `plan.ledger` (a file created with O_EXCL): it fires once per run.
  `failure.hold: ["dp:step:FILE", …]` makes a worker group of data-parallel size dp wait before optimizer step
  `step` while FILE exists — how a test resizes the cluster at a known point of the run (`Hold`).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from models.config import ConfigError

C = TypeVar("C", bound=type)


def crash(reason: str) -> NoReturn:
    """End this process on the spot, the way an OOM kill would (no exception handlers, no atexit, no reply)."""
    print(f"[fault injection] {reason}: exiting", file=sys.stderr, flush=True)
    os._exit(1)


# --- plans ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActorFault:
    """Replica 0 of `role` exits during `stage` of PPO iteration `iteration` (0-based), in the call `method`."""

    role: str
    iteration: int
    stage: str
    method: str

    @classmethod
    def parse(cls, item: str, stages: Mapping[str, Mapping[str, str]]) -> ActorFault:
        """'role:iteration:stage'; `stages` maps stage → role → the worker method that runs it."""
        parts = item.split(":")
        if len(parts) != 3 or parts[2] not in stages or parts[0] not in stages[parts[2]] or not parts[1].isdigit():
            choices = {s: sorted(roles) for s, roles in stages.items()}
            raise ConfigError(f"inject: {item!r} is not 'role:iteration:stage' with a role of that stage ({choices})")
        return cls(parts[0], int(parts[1]), parts[2], stages[parts[2]][parts[0]])


@dataclass(frozen=True)
class StepFault:
    """Worker `rank` exits during optimizer step `step` (1-based)."""

    rank: int
    step: int

    @classmethod
    def parse(cls, item: str) -> StepFault:
        parts = item.split(":")
        if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[1]) < 1:
            raise ConfigError(f"inject: {item!r} is not 'rank:step' (a worker rank ≥ 0 and an optimizer step ≥ 1)")
        return cls(int(parts[0]), int(parts[1]))


@dataclass(frozen=True)
class Hold:
    """Workers of a group of data-parallel size `dp` wait before optimizer step `step` while `file` exists."""

    dp: int
    step: int
    file: str

    @classmethod
    def parse(cls, item: str) -> Hold:
        parts = item.split(":", 2)
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() or not parts[2]:
            raise ConfigError(f"hold: {item!r} is not 'dp:step:FILE'")
        return cls(int(parts[0]), int(parts[1]), str(Path(parts[2]).expanduser().resolve()))


@dataclass(frozen=True)
class FaultPlan:
    """What a Ray Train run is told to suffer: step faults (each once per run, recorded under `ledger`) and holds."""

    steps: tuple[StepFault, ...] = ()
    holds: tuple[Hold, ...] = ()
    ledger: str | None = None  # directory recording fired faults (shared by all workers: the run directory)

    def __bool__(self) -> bool:
        return bool(self.steps or self.holds)

    def claim(self, fault: StepFault) -> bool:
        """Whether `fault` fires now: True exactly once per ledger (atomic create), always without a ledger."""
        if self.ledger is None:
            return True
        Path(self.ledger).mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(Path(self.ledger) / f"rank{fault.rank}-step{fault.step}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True


# --- wrappers ---------------------------------------------------------------------------------------------------
def instrument_actor(cls: C, methods: Collection[str]) -> C:
    """A subclass of the worker class `cls` whose `methods` can be armed to crash (see the module docstring).

    `arm_fault(method, after_engine_steps=None)`: the next call of `method` exits after its work, or — with
    `after_engine_steps=n` — right after the n-th optimizer step it takes on `self.engine` (a DeepSpeed engine)."""
    unknown = [m for m in methods if not callable(getattr(cls, m, None))]
    if unknown:
        raise ValueError(f"instrument_actor: {cls.__name__} has no method(s) {unknown}")

    def arm_fault(self: Any, method: str, after_engine_steps: int | None = None) -> None:
        if method not in methods:
            raise ValueError(f"arm_fault: {cls.__name__}.{method} is not instrumented (only {sorted(methods)})")
        self._fault_armed = (method, after_engine_steps)

    # Defined in this module (not cls's): cloudpickle then ships the subclass to Ray workers by value instead of
    # importing `cls` by name on the other side, which would drop the instrumentation.
    namespace: dict[str, Any] = {"arm_fault": arm_fault, "_fault_armed": None, "__module__": __name__,
                                 "__qualname__": cls.__name__, "__doc__": cls.__doc__}
    for name in methods:
        namespace[name] = _armable(getattr(cls, name), name, cls.__name__)
    return type(cls.__name__, (cls,), namespace)  # type: ignore[return-value]


def _armable(method: Any, name: str, owner: str) -> Any:
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        armed = self._fault_armed
        if armed is None or armed[0] != name:
            return method(self, *args, **kwargs)
        self._fault_armed = None
        where = f"{owner}.{name} (rank {getattr(self, 'rank', 0)})"
        if armed[1] is not None:
            _crash_after_steps(self.engine, armed[1], where)
        result = method(self, *args, **kwargs)
        crash(f"{where} after its work, before its reply")
        return result  # unreachable

    return call


def _crash_after_steps(engine: Any, n: int, where: str) -> None:
    """Make `engine.step()` exit the process after its n-th call from now (instance attribute shadows the method)."""
    step, count = engine.step, [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        out = step(*args, **kwargs)
        count[0] += 1
        if count[0] >= n:
            crash(f"{where} after optimizer step {count[0]} of the call")
        return out

    engine.step = counted


def instrument_engine(engine: Any, plan: FaultPlan, rank: int, dp_size: int) -> Any:
    """Wrap `engine.train_step` (a cluster/train TrainEngine, or anything with `train_step` and `state.step`) with
    the plan's holds and step faults for this worker. Returns the engine (the same object)."""
    if not plan:
        return engine
    train_step = engine.train_step
    faults = [f for f in plan.steps if f.rank == rank]
    holds = [h for h in plan.holds if h.dp == dp_size]

    @functools.wraps(train_step)
    def step(*args: Any, **kwargs: Any) -> Any:
        n = engine.state.step + 1  # the optimizer step this call performs
        for h in holds:
            while h.step == n and Path(h.file).exists():
                time.sleep(0.2)
        out = train_step(*args, **kwargs)
        for f in faults:
            if f.step == n and plan.claim(f):
                crash(f"worker rank {rank} during optimizer step {n}, after its work, before its report")
        return out

    engine.train_step = step
    return engine
