"""Sampler throughput: raygpt's native engine vs `transformers` GPT2LMHeadModel.generate (and vLLM, when the
`raygpt[vllm]` extra is installed: `benchmarks/generate_vllm.py`), same weights — one checkpoint directory that
every side loads — each side in its own fresh process (its peak RSS is its own), one torch thread each.

Workloads (issue 12):
(a) `rlhf` — RLHF-shaped: 64 prompts of 4–32 tokens, 4 samples each, temperature 1 (no top-k/top-p), at most 48
    new tokens, responses ending at EOS at varied lengths, on `tiny`. Weights: the demo's SFT checkpoint when
    runs/demo/sft/checkpoint exists; otherwise a random `tiny` whose EOS logit is biased (the final LayerNorm's bias
    and the EOS row of the tied unembedding share a direction), so responses end at EOS after ~20 tokens on average.
    Goal: native ≥ 2× HF.
(b) `fixed` — 32 prompts of 16 tokens, exactly 64 new tokens each (no EOS stop), top-k 50, random `gpt2` (124M)
    weights with n_ctx 128. Goal: native ≥ 1.2× HF.

Time = best of `repeats` wall-clock runs after one warm-up run (the warm-up also pays any compile); tokens/s counts
generated tokens up to and including EOS.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ROOT, write_section
from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import GPTConfig
from models.gpt import GPT

DEMO_SFT = ROOT / "runs" / "demo" / "sft" / "checkpoint"


@dataclass(frozen=True)
class Workload:
    name: str
    checkpoint: str
    prompts: list[list[int]]
    n: int
    max_new_tokens: int
    temperature: float
    top_k: int
    eos_id: int | None  # None: no EOS stop, every row generates max_new_tokens
    repeats: int
    note: str = ""
    compile_row: bool = False  # also measure the native engine with torch.compile (costly to compile on gpt2)
    options: dict[str, Any] = field(default_factory=dict)  # engine options of the side being measured


def _eos_biased_tiny(path: Path) -> str:
    cfg = GPTConfig.from_name("tiny")
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():  # EOS logit += 0.14 · Σ_d (0.3 + γ_d·x̂_d): ~+5, varying with the context
        model.transformer.ln_f.bias.fill_(0.3)
        model.lm_head.weight[cfg.eos_token_id] = 0.14
    save_checkpoint(model, path)
    return "random `tiny` with an EOS-biased unembedding (no demo checkpoint found)"


def workloads(tmp: Path) -> list[Workload]:
    if (DEMO_SFT / "config.json").exists():
        tiny_ckpt, source = str(DEMO_SFT), f"the demo's SFT checkpoint ({DEMO_SFT.relative_to(ROOT)})"
    else:
        tiny_ckpt, source = str(tmp / "tiny"), _eos_biased_tiny(tmp / "tiny")
    tiny = load_checkpoint(tiny_ckpt).config
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 33, (64,), generator=g).tolist()
    rlhf_prompts = [torch.randint(1, tiny.vocab_size, (n,), generator=g).tolist() for n in lengths]
    torch.manual_seed(0)
    save_checkpoint(GPT(GPTConfig.from_name("gpt2", n_ctx=128)), tmp / "gpt2")
    fixed_prompts = torch.randint(1, 50257, (32, 16), generator=torch.Generator().manual_seed(0)).tolist()
    return [
        Workload("rlhf", tiny_ckpt, rlhf_prompts, n=4, max_new_tokens=48, temperature=1.0, top_k=0,
                 eos_id=tiny.eos_token_id, repeats=5, note=source, compile_row=True),
        Workload("fixed", str(tmp / "gpt2"), fixed_prompts, n=1, max_new_tokens=64, temperature=1.0, top_k=50,
                 eos_id=None, repeats=2, note="random `gpt2` weights, n_ctx 128"),
    ]


def _measure(run, repeats: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = run()
    first = time.perf_counter() - t0
    best, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = run()
        w, c = time.perf_counter() - w, time.process_time() - c
        if w < best:
            best, cpu = w, c
    return dict(first_s=first, seconds=best, cpu_s=cpu, tokens=out)


def bench_native(w: Workload) -> dict[str, Any]:
    from models.generation import SamplingParams, generate

    model = load_checkpoint(w.checkpoint).eval()
    params = SamplingParams(max_new_tokens=w.max_new_tokens, temperature=w.temperature, top_k=w.top_k)

    def run() -> int:
        out = generate(model, w.prompts, params, eos_id=w.eos_id, seeds=0, n=w.n, **w.options)
        return int(out.response_mask.sum())

    return _measure(run, w.repeats)


def bench_hf(w: Workload) -> dict[str, Any]:
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(w.checkpoint).eval()
    P = max(len(p) for p in w.prompts)
    pad = w.eos_id if w.eos_id is not None else 0
    ids = torch.full((len(w.prompts), P), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(w.prompts):
        ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
    stop = dict(eos_token_id=w.eos_id) if w.eos_id is not None else dict(min_new_tokens=w.max_new_tokens)

    def run() -> int:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=w.temperature,
                                 top_k=w.top_k, max_new_tokens=w.max_new_tokens, num_return_sequences=w.n,
                                 pad_token_id=pad, use_cache=True, **stop)
        response = out[:, P:]
        if w.eos_id is None:
            return response.numel()
        # tokens up to and including the first EOS of each row
        is_eos = response == w.eos_id
        ended = is_eos.cumsum(1) - is_eos.long() > 0  # positions after the first EOS
        return int((~ended).sum())

    return _measure(run, w.repeats)


def bench_vllm(w: Workload) -> dict[str, Any] | str:
    """vLLM row — the slot benchmarks/generate_vllm.py fills: `bench_vllm(w: Workload)` loads w.checkpoint, runs
    the workload (w.prompts × w.n, w.max_new_tokens, w.temperature, w.top_k, EOS stop iff w.eos_id is not None)
    and returns `_measure(run, w.repeats)`'s dict (first_s, seconds, cpu_s, tokens = generated tokens up to and
    including EOS), adding "peak_rss_gib" itself if its engine runs in other processes. Runs in its own spawned
    process like every side. Returns a one-line reason when it cannot run here."""
    try:
        from benchmarks.generate_vllm import bench_vllm as run_vllm  # the vLLM helper's module
    except ImportError as e:
        return f"not run ({e.name or e} not importable)"
    return run_vllm(w)


# (label, function, engine options); the HF row is the baseline of the speed-up column
SIDES: list[tuple[str, Any, dict[str, Any]]] = [
    ("native (default: continuous batching, oneDNN-packed weights)", bench_native, {}),
    ("native, the model's own linears (packed=False)", bench_native, {"packed": False}),
    ("native + torch.compile of the decode step", bench_native, {"compile": True}),
    ("HF transformers generate", bench_hf, {}),
    ("vLLM (benchmarks/generate_vllm.py)", bench_vllm, {}),
]
BASELINE = "HF transformers generate"


def peak_rss_gib() -> float:
    """This process's peak resident set (VmHWM: unlike getrusage's ru_maxrss it is not inherited across the
    fork + exec that starts a spawned child)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _child(fn: Any, w: Workload, queue: Any) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        result = fn(w)
        if isinstance(result, dict):
            result.setdefault("peak_rss_gib", peak_rss_gib())
        queue.put(result)
    except Exception as e:  # report, do not hang the parent
        queue.put(f"failed: {e!r}"[:300])


def run_side(fn: Any, w: Workload) -> dict[str, Any] | str:
    """One side of one workload in a fresh spawned process (vLLM starts its engine by spawn, so all sides do)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, w, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _row(side: str, r: dict[str, Any] | str, base: dict[str, Any] | str) -> str:
    if isinstance(r, str):
        return f"| {side} | {r} | | | | | |"
    tps = r["tokens"] / r["seconds"]
    ratio = (f"**{(base['seconds'] / r['seconds']):.2f}×**" if isinstance(base, dict) else "")
    return (f"| {side} | {r['seconds']:.2f} | {r['cpu_s']:.2f} | {r['tokens']:,} | {tps:,.0f} | {ratio} | "
            f"{r['first_s']:.2f} | {r['peak_rss_gib']:.2f} |")


NOTES = """What the native rows do (models/batching.py, models/rng.py, models/packed.py): continuous batching at the
row level (a row that ends leaves the batch; dead slots are dropped once a quarter of the batch is dead and nothing
waits; with `max_rows` below the row count, waiting prompts take freed KV-cache slots), one prefill per prompt for
its n samples, per-row counter-based sampling with no Python loop over rows, logits only for the last prompt
position, and — the default on CPU — the decode step's matmuls with oneDNN-packed weights (2–3× faster than
MKL sgemm on row-major weights for these skinny products on this AVX-512 CPU). The `packed=False` row isolates
the scheduling gains. torch.compile (inductor, dynamic shapes) of the decode step is slower than packed eager and
costs its compilation in every process: "first run s" includes it with inductor's on-disk cache warm (~25 s cold
for `tiny`), so it stays off by default. CUDA graphs are not implemented (no GPU to test on here).
Peak RSS = the side's own process (VmHWM); the native default also holds a packed copy of the linear weights
(compare the packed=False row)."""


def main() -> None:
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    sections = []
    with tempfile.TemporaryDirectory(prefix="raygpt-bench-generate-") as tmp:
        for w in workloads(Path(tmp)):
            results = {label: run_side(fn, dataclasses.replace(w, options=opts)) for label, fn, opts in SIDES
                       if w.compile_row or not opts.get("compile")}
            base = results[BASELINE]
            rows = [_row(side, r, base) for side, r in results.items()]
            for line in rows:
                print(f"{w.name}: {line}", flush=True)
            shape = (f"{len(w.prompts)} prompts × {w.n} samples, ≤ {w.max_new_tokens} new tokens, "
                     f"temperature {w.temperature}, top-k {w.top_k or 'off'}, "
                     f"{'EOS stop' if w.eos_id is not None else 'no EOS stop'}; {w.note}")
            sections.append(
                f"**{w.name}** — {shape}. Best of {w.repeats} after a warm-up.\n\n"
                "| engine | wall s | CPU s | tokens | tokens/s | speed-up vs HF | first run s | peak RSS GiB |\n"
                "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
            )
    body = (
        "Same checkpoint directory loaded by every side, each side in its own fresh process with 1 torch thread; "
        f"1-minute load average at the start: {load:.1f} (shared machine). Goals (issue 12): rlhf native ≥ 2× HF "
        "and ≥ vLLM; fixed native ≥ 1.2× HF. Speed-up = HF wall time / the row's wall time for the same workload "
        "(the sides draw different random numbers, so their EOS-ended token counts differ slightly; tokens/s "
        "accounts for that).\n\n" + "\n\n".join(sections) + "\n\n" + NOTES
    )
    write_section("Sampler: raygpt vs transformers generate (benchmarks/generate.py)", body)


if __name__ == "__main__":
    main()
