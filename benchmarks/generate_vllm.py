"""The vLLM side of benchmarks/generate.py: the project's vLLM rollout engine (actors/engines/vllm.py, vLLM's
offline engine in this process) on the same checkpoint and workload as the native engine and HF `generate`.

`bench_vllm` is what benchmarks/generate.py calls, in a fresh spawned process per workload, with either its
`Workload` or the workload spelled out:

    bench_vllm(checkpoint_dir, prompts, n, max_new_tokens, temperature, eos_id) -> dict

Returned keys: seconds (best wall time of `repeats` runs after one warm-up), first_s (the warm-up run), cpu_s,
tokens (generated, up to and including EOS), tokens_per_s, import_s (`import vllm`), start_s (engine start:
`VLLMEngine(...)`, i.e. vLLM's LLM on the checkpoint), peak_rss_gib (this process: the engine is in-process),
threads (torch threads vLLM's worker ran with).

One thread, like every other side: vLLM's CPU worker would bind OpenMP threads to every core
(`VLLM_CPU_OMP_THREADS_BIND=auto`); `nobind` keeps the caller's `torch.set_num_threads(1)`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol


class _Workload(Protocol):  # benchmarks.generate.Workload, structurally (no import cycle)
    checkpoint: str
    prompts: list[list[int]]
    n: int
    max_new_tokens: int
    temperature: float
    top_k: int
    eos_id: int | None
    repeats: int
    options: dict[str, Any]


def _peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def bench_vllm(checkpoint_dir: str | _Workload, prompts: Sequence[Sequence[int]] | None = None, n: int = 1,
               max_new_tokens: int = 64, temperature: float = 1.0, eos_id: int | None = None, *, top_k: int = 0,
               repeats: int = 2, enforce_eager: bool = True, kv_cache_gib: float = 1.0) -> dict[str, Any]:
    """Measure vLLM on one workload (see the module docstring); `checkpoint_dir` may be a generate.Workload."""
    if not isinstance(checkpoint_dir, str | Path):
        w = checkpoint_dir
        opts = dict(w.options)
        return bench_vllm(w.checkpoint, w.prompts, w.n, w.max_new_tokens, w.temperature, w.eos_id, top_k=w.top_k,
                          repeats=w.repeats, enforce_eager=opts.get("enforce_eager", True),
                          kv_cache_gib=opts.get("kv_cache_gib", 1.0))
    if prompts is None:
        raise ValueError("prompts: required with a checkpoint directory")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    t0 = time.perf_counter()
    import torch
    import vllm  # noqa: F401 - timed on its own

    import_s = time.perf_counter() - t0
    from actors.engines.vllm import VLLMEngine
    from models.generation import SamplingParams

    t0 = time.perf_counter()
    engine = VLLMEngine(str(checkpoint_dir), kv_cache_gib=kv_cache_gib, enforce_eager=enforce_eager)
    start_s = time.perf_counter() - t0
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
    seeds = list(range(len(prompts) * n))

    def run() -> int:
        g = engine.generate([list(p) for p in prompts], params, eos_id=eos_id, seeds=seeds, n=n)
        return int(g.response_mask.sum())

    t0 = time.perf_counter()
    tokens = run()
    first_s = time.perf_counter() - t0
    best, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        tokens = run()
        w1, c1 = time.perf_counter() - w0, time.process_time() - c0
        if w1 < best:
            best, cpu = w1, c1
    return dict(seconds=best, first_s=first_s, cpu_s=cpu, tokens=tokens, tokens_per_s=tokens / best,
                import_s=import_s, start_s=start_s, peak_rss_gib=_peak_rss_gib(), threads=torch.get_num_threads(),
                enforce_eager=enforce_eager)


if __name__ == "__main__":  # a quick look: python -m benchmarks.generate_vllm CHECKPOINT
    import sys

    import torch

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    ps = [torch.randint(1, 500, (int(k),), generator=g).tolist() for k in torch.randint(4, 33, (64,), generator=g)]
    print(bench_vllm(sys.argv[1], ps, n=4, max_new_tokens=48, temperature=1.0, eos_id=0, repeats=2))
