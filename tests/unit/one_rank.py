"""Run a function inside a real one-rank gloo world (torch.distributed over a FileStore, loopback only) in a spawned
process, so a DeepSpeed engine can be built in a unit test without Ray and without binding a TCP port."""

from __future__ import annotations

import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def _main(fn: Callable[..., Any], args: tuple[Any, ...], store: str, results: Any, errors: Any) -> None:
    try:
        import torch.distributed as dist

        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")  # never bound: the group exists before DeepSpeed looks
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        results.put(fn(*args))
        dist.destroy_process_group()
    except BaseException:
        errors.put(traceback.format_exc())
        raise


def run_one_rank(fn: Callable[..., Any], *args: Any, timeout: float = 300.0) -> Any:
    """fn(*args) in a spawned one-rank world; its (picklable) result, or AssertionError with the child's traceback.
    `fn` must be importable by name (a module-level function of the test module)."""
    ctx = mp.get_context("spawn")
    results, errors = ctx.Queue(), ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        proc = ctx.Process(target=_main, args=(fn, args, os.path.join(d, "store"), results, errors))
        proc.start()
        try:
            for _ in range(int(timeout)):
                try:
                    return results.get(timeout=1.0)
                except queue.Empty:
                    if not errors.empty() or not proc.is_alive():
                        break
            try:  # the child may have put its result just before exiting
                return results.get(timeout=1.0)
            except queue.Empty:
                pass
            try:
                detail = errors.get(timeout=5.0)
            except queue.Empty:
                detail = f"no result within {timeout:.0f} s (exit code {proc.exitcode})"
            raise AssertionError(detail)
        finally:
            proc.join(timeout=60)
