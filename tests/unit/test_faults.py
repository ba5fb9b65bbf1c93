"""cluster/faults.py: plain classes wrapped with a plan crash (os._exit, in a subprocess) at the planned call
only, after its work; unwrapped classes are untouched; a Ray Train step fault fires once per ledger; holds wait
for their file. No Ray, no DeepSpeed (a few seconds)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster.faults import ActorFault, FaultPlan, Hold, StepFault, instrument_actor, instrument_engine
from models.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]

WORKER = '''
import sys
from pathlib import Path
from cluster.faults import instrument_actor

class Engine:
    def __init__(self, log): self.log = log
    def step(self): self.log("engine step")

class Worker:
    rank = 0
    def __init__(self, path):
        self.path = Path(path)
        self.engine = Engine(self.log)
    def log(self, line):
        with self.path.open("a") as f:
            f.write(line + "\\n")
    def work(self, x):
        self.log(f"work {x}")
        return x
    def other(self):
        self.log("other")
        return "other"
    def update(self):
        for i in range(3):
            self.engine.step()
            self.log(f"after step {i + 1}")
        return "updated"
'''


def run_script(tmp_path: Path, body: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "log.txt"
    script = WORKER + f"w = instrument_actor(Worker, ['work', 'update'])({str(log)!r})\n" + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return proc, log.read_text().splitlines() if log.exists() else []


def test_armed_call_exits_after_its_work_and_only_that_call(tmp_path: Path) -> None:
    proc, log = run_script(tmp_path, '''
        print(w.work(1), flush=True)
        w.arm_fault("work")
        print(w.other(), flush=True)   # not the armed method: runs normally
        print(w.work(2), flush=True)   # the armed call: does its work, never returns
        print("survived", flush=True)
    ''')
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.split() == ["1", "other"]
    assert log == ["work 1", "other", "work 2"]
    assert "Worker.work (rank 0) after its work" in proc.stderr


def test_update_armed_after_one_engine_step_leaves_the_rest_undone(tmp_path: Path) -> None:
    proc, log = run_script(tmp_path, '''
        w.arm_fault("update", after_engine_steps=1)
        print(w.update(), flush=True)
    ''')
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert log == ["engine step"]  # the first optimizer step happened, nothing after it


def test_unarmed_wrapper_behaves_like_the_class_and_refuses_unknown_methods(tmp_path: Path) -> None:
    proc, log = run_script(tmp_path, '''
        print(w.work(3), w.update(), flush=True)
        try:
            w.arm_fault("other")
        except ValueError as e:
            print("refused", flush=True)
    ''')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["3", "updated", "refused"]
    assert log[0] == "work 3" and len(log) == 7


def test_wrapping_leaves_the_class_alone() -> None:
    class Plain:
        def work(self) -> int:
            return 1

    wrapped = instrument_actor(Plain, ["work"])
    assert issubclass(wrapped, Plain) and wrapped.__name__ == "Plain"
    assert not hasattr(Plain, "arm_fault") and hasattr(wrapped, "arm_fault")
    assert Plain.__dict__["work"] is not wrapped.__dict__["work"]
    with pytest.raises(ValueError, match="missing"):
        instrument_actor(Plain, ["missing"])


ENGINE = '''
import sys
from types import SimpleNamespace
from cluster.faults import FaultPlan, StepFault, instrument_engine

class Engine:
    def __init__(self, step):
        self.state = SimpleNamespace(step=step)
    def train_step(self):
        self.state.step += 1
        print(f"step {self.state.step}", flush=True)

rank, start, ledger = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
plan = FaultPlan(steps=(StepFault(rank=1, step=3),), ledger=ledger)
engine = instrument_engine(Engine(start), plan, rank=rank, dp_size=2)
while engine.state.step < 5:
    engine.train_step()
print("done", flush=True)
'''


def run_engine(rank: int, start: int, ledger: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENGINE, str(rank), str(start), str(ledger)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_step_fault_fires_on_its_rank_after_the_step_and_once_per_ledger(tmp_path: Path) -> None:
    ledger = tmp_path / ".faults"
    assert run_engine(0, 0, ledger).stdout.split("\n")[-2] == "done"  # another rank: never
    first = run_engine(1, 0, ledger)
    assert first.returncode == 1 and first.stdout.split() == ["step", "1", "step", "2", "step", "3"]
    assert (ledger / "rank1-step3").is_file()
    again = run_engine(1, 2, ledger)  # the restarted worker, from the step-2 checkpoint: no second crash
    assert again.returncode == 0 and again.stdout.split() == ["step", "3", "step", "4", "step", "5", "done"]


def test_hold_waits_while_its_file_exists_for_its_data_parallel_size_only(tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    hold.touch()
    done: list[int] = []

    def engine(dp: int) -> SimpleNamespace:
        e = SimpleNamespace(state=SimpleNamespace(step=1))
        e.train_step = lambda: done.append(dp)
        return instrument_engine(e, FaultPlan(holds=(Hold(dp=2, step=2, file=str(hold)),)), rank=0, dp_size=dp)

    engine(1).train_step()  # another group size: not held
    assert done == [1]
    held = threading.Thread(target=engine(2).train_step, daemon=True)
    held.start()
    held.join(timeout=1.0)
    assert held.is_alive() and done == [1]  # still waiting: the file exists
    hold.unlink()
    held.join(timeout=30)
    assert not held.is_alive() and done == [1, 2]


def test_plans_parse_and_bad_items_name_the_field() -> None:
    stages = {"update": {"policy": "update", "value": "update"}, "score": {"reward": "score"}}
    assert ActorFault.parse("value:1:update", stages) == ActorFault("value", 1, "update", "update")
    for bad in ("reward:1:update", "value:x:update", "value:1", "policy:1:generate"):
        with pytest.raises(ConfigError, match="inject"):
            ActorFault.parse(bad, stages)
    assert StepFault.parse("1:5") == StepFault(1, 5)
    for bad in ("1:0", "a:1", "1:2:3"):
        with pytest.raises(ConfigError, match="inject"):
            StepFault.parse(bad)
    assert Hold.parse("2:29:/tmp/x:y").file == "/tmp/x:y"
    assert not FaultPlan() and FaultPlan(steps=(StepFault(0, 1),))


def test_the_wrapped_role_class_travels_to_ray_workers_with_its_instrumentation(tmp_path: Path) -> None:
    """Ray ships actor classes with cloudpickle: the wrapped class must go by value, not as a reference to the
    role's module (which would silently give the worker the unwrapped class)."""
    from ray import cloudpickle

    from actors.reference import ReferenceWorker

    blob = tmp_path / "cls.pkl"
    blob.write_bytes(cloudpickle.dumps(instrument_actor(ReferenceWorker, ["compute_logprobs"])))
    check = ("import sys; from ray import cloudpickle; from actors.reference import ReferenceWorker; "
             "cls = cloudpickle.loads(open(sys.argv[1], 'rb').read()); "
             "print(cls is not ReferenceWorker, issubclass(cls, ReferenceWorker), hasattr(cls, 'arm_fault'))")
    proc = subprocess.run([sys.executable, "-c", check, str(blob)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.split() == ["True", "True", "True"], proc.stderr
