"""Kill -9 from outside, through the CLI (docs/RELIABILITY.md). Every job here is `python -m jobs.cli <cmd>` (what
`raygpt <cmd>` runs) as a separate driver process attached to a real `ray start --head` node (headnode.py); the
test finds its victims with Ray's state API (`ray.util.state.list_actors`) and SIGKILLs one at a random moment —
no fault hook inside the job is armed.

- A Ray Train worker (`RayTrainWorker`) of `raygpt pretrain`, `raygpt sft`, `raygpt rm` is killed after the first
  checkpoint: Ray Train restarts the group from it. The run ends with the same per-step losses and final weights
  as an undisturbed run of the same command, every step logged exactly once.
- The driver of `raygpt pretrain` / `raygpt sft` / `raygpt rm` is killed; the same command run again continues
  from the last checkpoint (Ray Train's run restoration: what a user does) — steps 1..N each once, same losses
  and weights as the undisturbed run: nothing skipped, nothing repeated.
- Every RLHF role's actor (policy, reference, reward, value) of `raygpt ppo` is killed, one at a time at a random
  moment; the controller reloads that group from the last checkpoint and the run matches the undisturbed one.
- The `raygpt ppo` driver is killed; the same command with `--set resume=true` continues from the last committed
  checkpoint: iterations 1..N each logged once, the killed run's rows up to that checkpoint kept as they were, the
  metrics and final weights of the undisturbed run (stated tolerance for PPO: relative 1e-6).

Stated tolerance: losses relative 1e-5, weights absolute 1e-5 (runs restart from an exact checkpoint: data
position = step, RNG state saved; in practice the results are bitwise equal). The pretrain tests run in
`make test` (worker kill) and `make chaos` (driver kill); SFT, RM and PPO are marked `chaos`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from headnode import actors, head_node

from cluster.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
LOSS_REL, WEIGHT_ABS = 1e-5, 1e-5
TRAIN_WORKER = "RayTrainWorker"


@pytest.fixture(scope="module")
def head():
    with head_node(num_cpus=4) as h:
        yield h


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A BPE tokenizer, the pydoc corpus prepared as token shards, and a random `nano` LM checkpoint."""
    from jobs.data.corpus import load_texts
    from jobs.data.tokens import prepare
    from models.checkpoint import save_checkpoint
    from models.config import GPTConfig
    from models.gpt import GPT
    from models.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("chaos-data")
    tok = Tokenizer.train(load_texts("pydoc"), vocab_size=512, min_frequency=2)
    tok.save(root / "tokenizer.json")
    prepare("pydoc", root / "tokenizer.json", root / "pydoc", row_tokens=256)
    torch.manual_seed(0)
    lm = save_checkpoint(GPT(GPTConfig.from_name("nano", vocab_size=tok.vocab_size)), root / "lm",
                         tokenizer=root / "tokenizer.json")
    return {"root": root, "dataset": root / "pydoc", "lm": lm}


def command(kind: str, data: dict[str, Path], runs: Path, name: str) -> list[str]:
    """`raygpt <kind>` for a short run: 10 optimizer steps, a checkpoint every 2, up to 3 worker restarts."""
    common = [f"name={name}", f"runs_root={runs}", "log_every=1", "checkpoint.every_n_steps=2",
              "failure.max_failures=3", "optim.max_steps=10", "optim.warmup_steps=2"]
    sets = {
        "pretrain": ["model.preset=nano", f"data.dir={data['dataset']}", "data.seq_len=32", "seed=3",
                     "optim.micro_batch_size=2", "optim.lr=3e-3", "parallel.num_workers=2", "parallel.zero_stage=1",
                     "eval.every_n_steps=5", "eval.batches=1"],
        "sft": [f"init_from={data['lm']}", "data.max_demonstrations=64", "data.val_demonstrations=8",
                "optim.micro_batch_size=4", "parallel.num_workers=2", "eval.prompts=4", "eval.every_n_steps=5"],
        "rm": [f"init_from={data['lm']}", "generate.k=3", "generate.train_prompts=48", "generate.heldout_prompts=8",
               "generate.workers=1", "optim.micro_batch_size=2", "parallel.num_workers=2", "eval_every=5",
               "normalize_demonstrations=8"],
    }[kind]
    out = [sys.executable, "-m", "jobs.cli", kind]
    for s in common + sets:
        out += ["--set", s]
    return out


def start(head: dict[str, Any], cmd: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, env=head["env"], cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    rc = proc.wait(timeout=timeout)
    assert rc == 0, f"exit {rc}:\n{log.read_text()[-4000:]}"


def rows_of(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a last line still being appended while we read is left for the next poll."""
    path = run_dir / "metrics.jsonl"
    out = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def train_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in rows_of(run_dir) if "loss" in r]


def wait_for(predicate: Any, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the job ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)  # a tiny PPO iteration takes ~0.4 s: poll well inside one


def live_pids(head: dict[str, Any], class_names: list[str]) -> dict[str, list[int]]:
    """{class name: sorted pids of its alive actors} from Ray's state API."""
    listed = actors(head)
    return {c: sorted({a["pid"] for a in listed if a["class_name"] == c}) for c in class_names}


def sigkill_one(head: dict[str, Any], class_name: str, rng: random.Random) -> int:
    """SIGKILL one alive actor process of `class_name` (found with Ray's state API); returns its pid."""
    pids = sorted({a["pid"] for a in actors(head) if a["class_name"] == class_name})
    assert pids, f"no alive {class_name} actor"
    pid = rng.choice(pids)
    os.kill(pid, signal.SIGKILL)
    return pid


def assert_same_run(run_dir: Path, ref_dir: Path, steps: int = 10) -> float:
    """Steps 1..N each logged once, losses and final weights equal to the reference; returns the max loss diff."""
    from safetensors.torch import load_file

    rows, ref = train_rows(run_dir), train_rows(ref_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # nothing skipped, nothing repeated
    assert [r["step"] for r in ref] == list(range(1, steps + 1))
    diff = max(abs(r["loss"] - q["loss"]) / abs(q["loss"]) for r, q in zip(rows, ref))
    assert diff <= LOSS_REL, [(r["step"], r["loss"], q["loss"]) for r, q in zip(rows, ref)]
    got, want = (load_file(str(d / "checkpoint" / "model.safetensors")) for d in (run_dir, ref_dir))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=WEIGHT_ABS, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    return diff


_REFERENCES: dict[str, Path] = {}


def reference(head: dict[str, Any], data: dict[str, Path], runs: Path, kind: str) -> Path:
    """The undisturbed run of `kind` (one per module: the worker-kill and driver-kill tests share it)."""
    if kind not in _REFERENCES:
        root = data["root"] / "references"
        log = root / f"{kind}-ref.log"
        finish(start(head, command(kind, data, root, f"{kind}-ref"), log), log)
        _REFERENCES[kind] = root / f"{kind}-ref"
    return _REFERENCES[kind]


def worker_kill(head: dict[str, Any], data: dict[str, Path], tmp_path: Path, kind: str, seed: int) -> None:
    runs = tmp_path / "runs"
    ref = reference(head, data, runs, kind)
    rng = random.Random(seed)
    name, log = f"{kind}-kill", runs / f"{kind}-kill.log"
    proc = start(head, command(kind, data, runs, name), log)
    # after the first checkpoint (step 2) and its report, at a random moment of the following steps
    wait_for(lambda: any(r["step"] >= 3 for r in train_rows(runs / name)), proc, "step 3")
    time.sleep(rng.uniform(0.0, 1.0))
    assert proc.poll() is None, "the run finished before the kill: nothing was shown"
    victim = sigkill_one(head, TRAIN_WORKER, rng)
    finish(proc, log)
    print(f"{kind}: SIGKILLed train worker pid {victim}; max loss diff vs undisturbed "
          f"{assert_same_run(runs / name, ref):.2e}")
    assert victim not in {a["pid"] for a in actors(head)}


def driver_kill(head: dict[str, Any], data: dict[str, Path], tmp_path: Path, kind: str, seed: int) -> None:
    runs = tmp_path / "runs"
    ref = reference(head, data, runs, kind)
    rng = random.Random(seed)
    name = f"{kind}-driver"
    cmd = command(kind, data, runs, name)
    log = runs / f"{name}-1.log"
    proc = start(head, cmd, log)
    # a checkpoint exists (step 4 reported after the step-4 save), then a random moment later
    wait_for(lambda: any(r["step"] >= 5 for r in train_rows(runs / name)), proc, "step 5")
    time.sleep(rng.uniform(0.0, 1.0))
    assert proc.poll() is None, "the run finished before the kill: nothing was shown"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    before = train_rows(runs / name)
    # Ray ends a dead driver's actors; wait for its Train workers to be gone before the user re-runs
    deadline = time.monotonic() + 120
    while any(a["class_name"] == TRAIN_WORKER for a in actors(head)):
        assert time.monotonic() < deadline, "the dead driver's train workers are still alive"
        time.sleep(1)
    log = runs / f"{name}-2.log"
    finish(start(head, cmd, log), log)  # the same command again
    diff = assert_same_run(runs / name, ref)
    # It continued rather than starting over: the rows up to the checkpoint it resumed from are the killed run's
    # own, untouched (a fresh start would have rewritten them: their wall-clock fields differ), and that
    # checkpoint is a checkpoint step (every 2) at or after the first one.
    after = train_rows(runs / name)
    kept = next((i for i, (a, b) in enumerate(zip(after, before)) if a != b), len(before))
    print(f"{kind}: driver SIGKILLed after step {before[-1]['step']}; the re-run resumed from step {kept}; "
          f"max loss diff vs undisturbed {diff:.2e}")
    assert kept >= 2 and kept % 2 == 0, (kept, before[-1]["step"])


def test_pretrain_survives_a_killed_train_worker(head, data, tmp_path) -> None:
    worker_kill(head, data, tmp_path, "pretrain", seed=1)


@pytest.mark.chaos  # ~1.5 min: make chaos (make test keeps the worker kill)
def test_pretrain_driver_killed_then_rerun_continues_from_the_last_checkpoint(head, data, tmp_path) -> None:
    driver_kill(head, data, tmp_path, "pretrain", seed=2)


@pytest.mark.chaos
@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_finetune_survives_a_killed_train_worker(head, data, tmp_path, kind: str) -> None:
    worker_kill(head, data, tmp_path, kind, seed=3)


@pytest.mark.chaos
@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_finetune_driver_killed_then_rerun_continues(head, data, tmp_path, kind: str) -> None:
    driver_kill(head, data, tmp_path, kind, seed=4)


# --- PPO: each role's actor process, and the driver ---------------------------------------------------------------
PPO_ROLES = ["PolicyWorker", "ReferenceWorker", "RewardWorker", "ValueWorker"]
PPO_ITERATIONS = 8  # ~0.4 s each on 2 cores: room for four kills, each followed by a recovery of a few seconds
PPO_VOLATILE = ("time", "samples_per_s", "recoveries")  # wall-clock and bookkeeping, not results


@pytest.fixture(scope="module")
def ppo_art(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """ppo_setup's tiny artifacts, a runs root and the yaml configs, shared by the PPO tests of this module."""
    from ppo_setup import build_artifacts

    root = tmp_path_factory.mktemp("chaos-ppo")
    return {**build_artifacts(root / "art"), "runs": root / "runs", "configs": root}


def ppo_command(art: dict[str, Any], name: str) -> tuple[list[str], Path]:
    """`raygpt ppo --config <name>.yaml`: PPO_ITERATIONS iterations of ppo_setup's tiny run (2-rank ZeRO-1 policy
    and value), a checkpoint after each; returns the command and its log path."""
    import yaml
    from ppo_setup import tiny_overrides

    cfg = tiny_overrides(art, art["runs"], name, iterations=PPO_ITERATIONS, keep_checkpoints=PPO_ITERATIONS,
                         **{"fault.stage_timeout_s": 300.0})
    path = art["configs"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return [sys.executable, "-m", "jobs.cli", "ppo", "--config", str(path)], art["runs"] / f"{name}.log"


def ppo_reference(head: dict[str, Any], art: dict[str, Any]) -> Path:
    """The undisturbed PPO run (once per module: the role-kill and driver-kill tests share it)."""
    ref = art["runs"] / "ref"
    if not (ref / "report.md").is_file():
        cmd, log = ppo_command(art, "ref")
        finish(start(head, cmd, log), log)
    return ref


def iteration_s(ref: Path) -> float:
    """The undisturbed run's median iteration time: kills are drawn at a uniform moment inside one iteration."""
    return statistics.median(r["time_iteration"] for r in read_metrics(ref))


def assert_same_ppo_run(run_dir: Path, ref_dir: Path) -> None:
    """Iterations 1..N each logged once; every metric and the final policy weights equal the reference (rel 1e-6)."""
    from safetensors.torch import load_file

    rows, ref = ([{k: v for k, v in r.items() if not k.startswith(PPO_VOLATILE)} for r in read_metrics(d)]
                 for d in (run_dir, ref_dir))
    assert [r["iteration"] for r in rows] == [r["iteration"] for r in ref] == list(range(1, PPO_ITERATIONS + 1))
    for r, q in zip(rows, ref):
        assert r.keys() == q.keys(), (r["iteration"], r.keys() ^ q.keys())
        for k, v in q.items():
            assert r[k] == (pytest.approx(v, rel=1e-6) if isinstance(v, float) else v), (r["iteration"], k)
    got, want = (load_file(str(d / "checkpoint" / "model.safetensors")) for d in (run_dir, ref_dir))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=0)


@pytest.mark.chaos
def test_ppo_survives_each_role_actor_killed_from_outside(head, ppo_art) -> None:
    ref = ppo_reference(head, ppo_art)
    rng = random.Random(5)
    cmd, log = ppo_command(ppo_art, "kill")
    run_dir = ppo_art["runs"] / "kill"
    proc = start(head, cmd, log)
    # The victims' pids, listed once while the actors start (Ray's state API takes seconds; a whole iteration takes
    # ~0.4 s): each role is killed once and only the killed role's group is rebuilt, so the others' pids stay valid.
    want = {"PolicyWorker": 2, "ReferenceWorker": 1, "RewardWorker": 1, "ValueWorker": 2}
    pids: dict[str, list[int]] = {}
    wait_for(lambda: pids.update(live_pids(head, PPO_ROLES)) or all(len(pids.get(c, [])) == n
                                                                   for c, n in want.items()), proc, "the actors")
    killed = []
    for i, cls in enumerate(PPO_ROLES):
        # one role per iteration, at a random moment inside it (after the previous iteration's checkpoint)
        wait_for(lambda i=i: len(rows_of(run_dir)) >= i + 1, proc, f"iteration {i + 1}")
        time.sleep(rng.uniform(0.0, iteration_s(ref)))
        if proc.poll() is not None:
            break
        victim = rng.choice(pids[cls])
        os.kill(victim, signal.SIGKILL)
        killed.append((cls, victim))
    finish(proc, log)
    assert len(killed) == 4, killed
    assert_same_ppo_run(run_dir, ref)
    print("ppo: SIGKILLed", killed)


@pytest.mark.chaos
def test_ppo_driver_killed_then_resume_continues_from_the_last_checkpoint(head, ppo_art) -> None:
    """`raygpt ppo` SIGKILLed at a random moment after its second iteration; the user runs the same command again
    with `--set resume=true`: it continues from `trainer_state/latest`, and the run ends with iterations 1..5 each
    logged once, with the metrics and final weights of the undisturbed run (rel 1e-6)."""
    ref = ppo_reference(head, ppo_art)
    rng = random.Random(6)
    cmd, log = ppo_command(ppo_art, "driver")
    run_dir = ppo_art["runs"] / "driver"
    proc = start(head, cmd, log)
    wait_for(lambda: len(rows_of(run_dir)) >= 2, proc, "iteration 2")
    time.sleep(rng.uniform(0.0, iteration_s(ref)))
    assert proc.poll() is None, "the run finished before the kill: nothing was shown"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    before = rows_of(run_dir)
    latest = (run_dir / "trainer_state" / "latest").read_text().strip()
    # Ray ends a dead driver's actors (and its placement groups); wait for them before the user re-runs
    deadline = time.monotonic() + 120
    while any(a["class_name"] in PPO_ROLES for a in actors(head)):
        assert time.monotonic() < deadline, "the dead driver's PPO actors are still alive"
        time.sleep(1)
    log = ppo_art["runs"] / "driver-resume.log"
    finish(start(head, [*cmd, "--set", "resume=true"], log), log)
    assert_same_ppo_run(run_dir, ref)
    # It continued rather than starting over: the rows up to the checkpoint it resumed from are the killed run's
    # own, wall-clock fields included (a fresh start would have rewritten them), and the rest were redone.
    resumed_from = int(latest.removeprefix("iter-"))
    after = rows_of(run_dir)
    assert 2 <= resumed_from <= len(before) < PPO_ITERATIONS, (latest, len(before))
    assert after[:resumed_from] == before[:resumed_from]
    assert after[resumed_from]["time"] > before[-1]["time"]  # the first iteration after it: run again, later
    print(f"ppo: driver SIGKILLed after iteration {len(before)} ({latest} committed); the re-run resumed from "
          f"iteration {resumed_from}")
