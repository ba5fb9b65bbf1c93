"""Checkpoints survive a SIGKILL in the middle of a save, and an unwritable runs directory is a clear error.

- A real process writing a ~230 MB checkpoint over a previous one is SIGKILLed from outside while the temporary
  directory is being filled (several kill moments; at least one must land mid-write, which the left-over temp
  directory proves): the name then always holds a complete checkpoint — the previous one, bit for bit, or the new
  one — and never a truncated file.
- A kill between the two renames of a replace (previous → `.old-<pid>`, new → name) is recovered by the next
  load: the previous checkpoint is renamed back once its writer is dead, and left alone while it is alive.
- A read-only and a full file system (small tmpfs mounts; skipped where this process may not mount) give a
  CheckpointError naming the directory and the reason, with the previous checkpoint untouched and no temp left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.config import GPTConfig
from models.gpt import GPT

ROOT = Path(__file__).resolve().parents[2]
SMALL = GPTConfig.from_name("nano", vocab_size=97)

# Child: build a big model (~58 M parameters, 230 MB of safetensors), then save it over `path`.
WRITER = textwrap.dedent("""
    import sys, torch
    from models.checkpoint import save_checkpoint
    from models.config import GPTConfig
    from models.gpt import GPT
    torch.manual_seed(1)
    cfg = GPTConfig.from_name("nano", vocab_size=8192, n_layer=4, n_embd=1024, n_head=8)
    model = GPT(cfg)
    print("built", flush=True)
    save_checkpoint(model, sys.argv[1], kind="lm")
    print("saved", flush=True)
""")


def small_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(SMALL)
    save_checkpoint(model, path, kind="lm")
    return {k: v.clone() for k, v in model.state_dict().items()}


def temps(path: Path) -> list[Path]:
    return [p for p in path.parent.glob(f".{path.name}.*") if ".old-" not in p.name]


@pytest.mark.parametrize("delays", [(0.0, 0.02, 0.1)])
def test_sigkill_during_save_leaves_a_complete_checkpoint(tmp_path: Path, delays: tuple[float, ...]) -> None:
    mid_write = 0
    for i, delay in enumerate(delays):
        path = tmp_path / f"run{i}" / "checkpoint"
        before = small_checkpoint(path)
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "built"
            deadline = time.monotonic() + 60
            while not temps(path) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.0005)  # poll for the temporary directory: the write has begun
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
        left = temps(path)
        loaded = load_checkpoint(path)  # never a CheckpointError: the name holds a complete checkpoint
        if left:  # killed mid-write: the previous checkpoint, bit for bit
            mid_write += 1
            assert loaded.config.n_embd == SMALL.n_embd
            for k, v in loaded.state_dict().items():
                assert torch.equal(v, before[k]), k
        else:  # the write had finished: the new one, whole
            assert loaded.config.n_embd == 1024
        # and the next save over it works and cleans nothing it should not
        small_checkpoint(path)
        assert load_checkpoint(path).config.n_embd == SMALL.n_embd
    print(f"{mid_write} of {len(delays)} kills landed inside the write")
    assert mid_write >= 1, "no kill landed inside the write; the test proved nothing"


def test_a_replace_killed_between_its_renames_is_recovered_once_the_writer_is_dead(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint"
    before = small_checkpoint(path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    # The state a SIGKILL after the first rename leaves: no checkpoint under the name, the previous one aside.
    path.rename(path.with_name(f".checkpoint.old-{os.getpid()}"))
    with pytest.raises(CheckpointError, match="does not exist"):  # its writer (this process) is alive: hands off
        load_checkpoint(path)
    path.with_name(f".checkpoint.old-{os.getpid()}").rename(path.with_name(f".checkpoint.old-{dead_pid}"))
    loaded = load_checkpoint(path)  # the writer is gone: recovered
    assert path.is_dir() and not list(tmp_path.glob(".checkpoint.old-*"))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, before[k]), k


@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if got.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({got.stderr.decode().strip()[:100]}): needs root/CAP_SYS_ADMIN")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_read_only_directory_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "8m") as mnt:
        path = mnt / "checkpoint"
        before = small_checkpoint(path)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(CheckpointError, match=rf"{path}: cannot write the checkpoint \(read-only file system\)"):
            save_checkpoint(GPT(SMALL), path, kind="lm")
        for k, v in load_checkpoint(path).state_dict().items():
            assert torch.equal(v, before[k]), k


def test_full_disk_is_a_clear_error_and_leaves_no_partial_files(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "full", "1m") as mnt:
        path = mnt / "checkpoint"
        before = small_checkpoint(path)  # ~0.12 MB
        big = GPT(GPTConfig.from_name("nano", vocab_size=16384))  # ~2.3 MB of weights: cannot fit
        with pytest.raises(CheckpointError, match=rf"{path}: cannot write the checkpoint \(no space left"):
            save_checkpoint(big, path, kind="lm")
        assert not temps(path)  # the partial temp directory was removed: the space is free again
        for k, v in load_checkpoint(path).state_dict().items():
            assert torch.equal(v, before[k]), k


def test_unwritable_runs_root_is_a_config_error_before_any_work(tmp_path: Path) -> None:
    from jobs.config import ConfigError
    from jobs.runs import start_run
    from jobs.sft import SFTConfig

    with tmpfs(tmp_path / "runs", "1m") as mnt:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(ConfigError, match=r"runs_root: cannot write the run directory .*Read-only file system"):
            start_run(SFTConfig(), "x", mnt)
