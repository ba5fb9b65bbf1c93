"""Data pipeline at scale: `raygpt prepare` on Ray Data over a generated text corpus, and pretraining on the result.

1. Corpus: `RAYGPT_BENCH_PREPARE_MB` (default 2048) MB of `.txt` files of 4 MB, each a seeded random sequence of
   Shakespeare speeches (so the tokenizer sees real text; each file is cut into ~20 documents of 200k chars).
2. Baseline: one process calling `tokenizers`' `encode_batch` (TOKENIZERS_PARALLELISM=false: one thread) on the
   documents of the first `BASELINE_MB` of the corpus (the same 200k-char parts prepare tokenises; whole 4 MB
   strings tokenise ~2× slower), in its own session — tokens/s, run before and after prepare (the mean brackets
   the load prepare met). The corpus is one seeded mix of the same speeches, so the first 32 MB is a fair sample
   of the rate; the report also gives the baseline's time for the whole corpus at that rate.
3. `raygpt prepare` with engine=ray on the embedded cluster (`WORKERS` tokeniser actors): tokens/s over the whole
   run (names pass, Ray Data start, writing included) and peak RSS of the whole process tree (driver, raylet,
   GCS, Ray Data tasks and actors) above the idle tree (Ray started, nothing running). Shared-memory pages of the
   object store count once per process that maps them, so the tree RSS overstates real use. The peak of each
   quarter of the run shows whether memory climbs as more of the corpus has gone through.
4. `raygpt pretrain` for `STEPS` steps (tiny preset) on that dataset and on Shakespeare: peak tree RSS of each; the
   streaming reader should make the difference independent of the corpus size (goal ≤ 300 MB).
5. Raw numbers go to .tmp/bench-prepare/result-<MB>.json; the corpus and dataset (GBs) are deleted at the end
   unless RAYGPT_BENCH_KEEP is set.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.common import ROOT, PeakRSS, tree_rss, write_section

SIZE_MB = int(os.environ.get("RAYGPT_BENCH_PREPARE_MB", "2048"))
FILE_MB = 4
BASELINE_MB = 32
WORKERS = max(2, (os.cpu_count() or 2))
STEPS, PRESET, SEQ, MBS = 50, "tiny", 128, 16
WORK = ROOT / ".tmp" / "bench-prepare"
TOKENIZER = ROOT / "runs" / "tokenizer" / "tokenizer.json"


def generate(size_mb: int) -> Path:
    """size_mb MB of text files (cached under .tmp/bench-prepare/corpus-<size>)."""
    from jobs.data.corpus import load_documents

    out = WORK / f"corpus-{size_mb}"
    if (out / "DONE").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    speeches = [s for d in load_documents("shakespeare") for s in d.text.split("\n\n")]
    rng = random.Random(0)
    for i in range(size_mb // FILE_MB):
        parts, size = [], 0
        while size < FILE_MB << 20:
            s = rng.choice(speeches)
            parts.append(s)
            size += len(s) + 2
        (out / f"part-{i:05d}.txt").write_text("\n\n".join(parts) + "\n")
    (out / "DONE").write_text("")
    return out


def baseline(corpus: Path) -> dict[str, float]:
    """Single-process encode_batch on the first BASELINE_MB of the corpus (run as `--baseline`)."""
    from jobs.data.sources import list_inputs, read_documents
    from models.tokenizer import Tokenizer

    tok = Tokenizer.from_file(TOKENIZER)
    texts, size = [], 0
    for f in list_inputs(str(corpus / "*.txt")):  # the same documents (200k-char file parts) prepare tokenises
        if size >= BASELINE_MB << 20:
            break
        texts.extend(d.text for d in read_documents(f))
        size += f.size
    t0 = time.perf_counter()
    tokens = sum(len(x) for x in tok.encode_batch(texts))
    dt = time.perf_counter() - t0
    return {"bytes": sum(len(t.encode()) for t in texts), "tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt}


def _baseline_process(corpus: Path) -> dict[str, float]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.prepare", "--baseline", str(corpus)], check=True,
                         capture_output=True, text=True, start_new_session=True, cwd=ROOT, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


class PeakWithBreakdown(PeakRSS):
    """PeakRSS that also keeps, at the peak, the RSS per kind of process (Ray sets worker titles like
    `ray::MapWorker(...)`, `ray::IDLE`)."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(interval)
        self.at_peak: dict[str, tuple[int, int]] = {}
        self.samples: list[tuple[float, int]] = []  # (time, tree RSS): does the RSS climb as the corpus goes by?

    def _run(self) -> None:
        while not self._stop.is_set():
            groups: dict[str, tuple[int, int]] = {}
            try:
                root = psutil.Process()
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    cmd = p.cmdline()
                    label = (cmd[0] if cmd else p.name()).split("/")[-1].split(" ")[0][:48]
                    n, rss = groups.get(label, (0, 0))
                    groups[label] = (n + 1, rss + p.memory_info().rss)
                except psutil.Error:
                    pass
            total = sum(r for _, r in groups.values())
            self.samples.append((time.perf_counter(), total))
            if total > self.peak:
                self.peak, self.at_peak = total, groups
            self._stop.wait(self.interval)

    def quarter_peaks(self) -> list[float]:
        """Peak tree RSS (GiB) in each quarter of the run's wall time: flat if memory does not grow with the
        corpus read so far (a leak or an unbounded queue shows as a rising sequence)."""
        if not self.samples:
            return []
        t0, t1 = self.samples[0][0], self.samples[-1][0]
        peaks = [0] * 4
        for t, rss in self.samples:
            q = min(3, int(4 * (t - t0) / max(t1 - t0, 1e-9)))
            peaks[q] = max(peaks[q], rss)
        return [p / 2**30 for p in peaks]

    def top(self, k: int = 5) -> str:
        rows = sorted(self.at_peak.items(), key=lambda kv: -kv[1][1])[:k]
        return ", ".join(f"{label} ×{n}: {rss / 2**20:,.0f} MiB" for label, (n, rss) in rows)


def ray_prepare(corpus: Path, out: Path) -> dict[str, float]:
    from cluster.runtime import init_ray, shutdown_ray
    from jobs.data.tokens import prepare, stderr_line

    init_ray(num_cpus=WORKERS + 1)
    try:
        time.sleep(5)  # let Ray's processes settle: the idle tree is the baseline for memory
        idle = tree_rss()
        t0 = time.perf_counter()
        with PeakWithBreakdown() as rss:
            meta = prepare(str(corpus), TOKENIZER, out, engine="ray", workers=WORKERS, progress=stderr_line)
        dt = time.perf_counter() - t0
    finally:
        shutdown_ray()
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    return {"tokens": tokens, "docs": sum(s["docs"] for s in meta["splits"].values()), "seconds": dt,
            "tokens_per_s": tokens / dt, "idle_gib": idle / 2**30, "peak_gib": rss.peak / 2**30,
            "growth_gib": (rss.peak - idle) / 2**30, "breakdown": rss.top(),  # type: ignore[dict-item]
            "quarters": rss.quarter_peaks()}  # type: ignore[dict-item]


def pretrain_peak(data: Path, root: Path, name: str) -> float:
    from jobs.config import load_config
    from jobs.pretrain import PretrainConfig, run

    cfg = load_config(PretrainConfig, base={
        "name": name, "runs_root": str(root), "log_every": 10, "model": {"preset": PRESET},
        "data": {"dir": str(data), "tokenizer": str(TOKENIZER), "seq_len": SEQ},
        "optim": {"max_steps": STEPS, "warmup_steps": 5, "micro_batch_size": MBS, "grad_accum": 1},
        "parallel": {"num_workers": 1, "cpus_per_worker": 1, "zero_stage": 1},
        "checkpoint": {"every_n_steps": STEPS}, "eval": {"every_n_steps": STEPS, "batches": 1},
    })
    from cluster.runtime import shutdown_ray

    try:
        with PeakRSS() as rss:
            run(cfg)
    finally:
        shutdown_ray()
    return rss.peak / 2**30


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    from benchmarks.pretrain import ensure_data

    shakespeare = ensure_data()  # also trains runs/tokenizer/tokenizer.json if missing
    corpus = generate(SIZE_MB)
    size = sum(p.stat().st_size for p in corpus.glob("*.txt"))
    # baseline, prepare, baseline: on a shared machine the mean of the two brackets prepare's load
    load = {"start": _load()}
    before = _baseline_process(corpus)
    dataset = WORK / f"data-{SIZE_MB}"
    ours = ray_prepare(corpus, dataset)
    load["after prepare"] = _load()
    after = _baseline_process(corpus)
    base = {k: (before[k] + after[k]) / 2 for k in before}
    print(f"baseline encode_batch: {before['tokens_per_s']:,.0f} / {after['tokens_per_s']:,.0f} tokens/s on "
          f"{base['bytes'] / 1e6:.0f} MB", flush=True)
    print(f"raygpt prepare: {ours['tokens_per_s']:,.0f} tokens/s in {ours['seconds']:,.0f} s, peak tree RSS "
          f"{ours['peak_gib']:.2f} GiB ({ours['growth_gib']:+.2f} over idle; per quarter "
          f"{ours['quarters']}): {ours['breakdown']}", flush=True)
    with tempfile.TemporaryDirectory(dir=ROOT / ".tmp") as tmp:
        small = pretrain_peak(shakespeare, Path(tmp), "shakespeare")
        big = pretrain_peak(dataset, Path(tmp), "generated")
    load["end"] = _load()
    print(f"pretrain {STEPS} steps peak RSS: Shakespeare {small:.2f} GiB, generated {big:.2f} GiB", flush=True)
    (WORK / f"result-{SIZE_MB}.json").write_text(json.dumps(
        {"size": size, "baseline": [before, after], "prepare": ours, "pretrain_gib": [small, big], "load": load},
        indent=2) + "\n")
    speed = ours["tokens_per_s"] / base["tokens_per_s"]
    quarters = " → ".join(f"{q:.2f}" for q in ours["quarters"])
    extrapolated = "" if SIZE_MB >= 2048 else (
        f"\nMeasured at {SIZE_MB} MB instead of 2 GB (RAYGPT_BENCH_PREPARE_MB). Time scales linearly in the "
        f"corpus: 2 GB ≈ {ours['seconds'] * 2048 / SIZE_MB / 60:.0f} min at this rate.\n")
    write_section("Data: raygpt prepare on Ray Data, streaming reader (benchmarks/prepare.py)", f"""
Generated corpus: {size / 1e6:,.0f} MB of text ({size // (FILE_MB << 20)} files of {FILE_MB} MB of random Shakespeare
speeches; {ours['docs']:,} documents, {ours['tokens']:,} tokens with the 4,096-token BPE). `raygpt prepare
--set engine=ray --set workers={WORKERS}` on the embedded cluster ({WORKERS + 1} logical CPUs). Load average
(1 / 5 / 15 min): {load['start']} at the start, {load['after prepare']} after prepare, {load['end']} at the end.

| | tokens/s | wall | peak RSS, process tree |
|---|---|---|---|
| `tokenizers` `encode_batch`, one process, one thread, on the first {base['bytes'] / 1e6:.0f} MB of the corpus \
(before / after prepare) | {base['tokens_per_s']:,.0f} ({before['tokens_per_s']:,.0f} / \
{after['tokens_per_s']:,.0f}) | {base['seconds']:.0f} s ({ours['tokens'] / base['tokens_per_s'] / 60:,.0f} min \
for the whole corpus at this rate) | — |
| `raygpt prepare`, Ray Data, {WORKERS} actors (names pass + tokenise + write) | {ours['tokens_per_s']:,.0f} \
| {ours['seconds'] / 60:,.1f} min | {ours['peak_gib']:.2f} GiB (idle tree {ours['idle_gib']:.2f} GiB: \
**{ours['growth_gib']:+.2f} GiB**; goal ≤ +2 GiB) |

Ratio: **{speed:.2f}×** the single-threaded baseline (mean of the runs before and after) with {WORKERS} actors on
{os.cpu_count()} cores; the machine is shared, so the ratio moves with the load of the moment.
Peak tree RSS in each quarter of the prepare run (GiB): {quarters} (second half's peak
{max(ours['quarters'][2:]) - max(ours['quarters'][:2]):+.2f} GiB from the first half's).
Largest processes at the RSS peak: {ours['breakdown']}. (Object-store pages count once per process that maps
them, so the tree RSS overstates real use.)
{extrapolated}
`raygpt pretrain`, {STEPS} steps, `{PRESET}` preset, {SEQ}-token sequences × {MBS}, 1 worker: peak tree RSS
{small:.2f} GiB on Shakespeare (1.2M tokens), {big:.2f} GiB on the generated dataset ({ours['tokens'] / 1e6:,.0f}M
tokens): **{(big - small) * 1024:+.0f} MB** (goal ≤ +300 MB).
""")
    if not os.environ.get("RAYGPT_BENCH_KEEP"):  # gigabytes of scratch: regenerated (minutes) by the next run
        shutil.rmtree(corpus, ignore_errors=True)
        shutil.rmtree(dataset, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--baseline"]:
        print(json.dumps(baseline(Path(sys.argv[2]))))
    else:
        main()
