"""Bounded-staleness asynchronous PPO (`max_staleness`, jobs/rl/staleness.py) beside the synchronous loop, on
benchmarks/ppo.py's setup (same `tiny` checkpoints, batch, response length, epochs, minibatches, iterations) with
one rollout worker added — the colocated layout of that benchmark, and the disaggregated one (every role in a
pool of its own). Four runs, each in its own subprocess (clean peak RSS): layout × max_staleness ∈ {0, 1}.

Per run: the median wall time of iterations 2–4 as the loop sees it (`time_iteration`: every stage, the weight
broadcast and the checkpoint — with k = 1 the stages overlap, so the sum of stage timings would overstate it),
samples/s = batch / that, the median generate and update stage times, and the overlap: the seconds of
generate(t+1)'s span (submission → its metadata resolved, metrics.jsonl `timeline`) that fall inside iteration
t's score → update end.

    python -m benchmarks.ppo_async            # writes its section of docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.ppo import BATCH, ITERATIONS, build, part_raygpt

RUNS = [(layout, k) for layout in ("colocated", "disaggregated") for k in (0, 1)]


def overlap_s(rows: list[dict[str, Any]]) -> float:
    """Median over iterations t of |generate(t+1) ∩ [score(t) start, update(t) end]| in seconds."""
    out = []
    for a, b in zip(rows, rows[1:]):
        lo, hi = a["timeline"]["score"][0], a["timeline"]["update"][1]
        g0, g1 = b["timeline"]["generate"]
        out.append(max(0.0, min(hi, g1) - max(lo, g0)))
    return statistics.median(out) if out else 0.0


def part(art: dict[str, str], root: Path, layout: str, k: int) -> dict[str, Any]:
    from cluster.metrics import read_metrics

    extra = {"placement.layout": layout, "placement.replicas.rollout": 1, "max_staleness": k}
    result = part_raygpt(art, root, extra)
    rows = read_metrics(root / "runs" / "bench")
    result["overlap_s"] = overlap_s(rows[1:])
    result["staleness"] = [r.get("staleness", 0) for r in rows]
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part")  # "layout:k"
    ap.add_argument("--root")
    ap.add_argument("--art")
    ap.add_argument("--out")
    a = ap.parse_args(argv if argv is not None else [])
    if a.part:
        layout, k = a.part.split(":")
        Path(a.out).write_text(json.dumps(part(json.loads(a.art), Path(a.root), layout, int(k))))
        return
    from benchmarks.common import write_section

    load = os.getloadavg()[0]
    results: dict[tuple[str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ppo-async-") as tmp:
        root = Path(tmp)
        art = build(root)
        for layout, k in RUNS:
            out = root / f"{layout}-{k}.json"
            subprocess.run([sys.executable, "-m", "benchmarks.ppo_async", "--part", f"{layout}:{k}", "--root",
                            str(root), "--art", json.dumps(art), "--out", str(out)], check=True)
            results[layout, k] = json.loads(out.read_text())
            print(layout, k, json.dumps(results[layout, k]), flush=True)
    end_load = os.getloadavg()[0]
    lines = ["| layout | max_staleness | s / iteration | samples/s | generate s | update s | generate ∩ score→update "
             "s | peak RSS |", "|---|---|---|---|---|---|---|---|"]
    for (layout, k), r in results.items():
        lines.append(f"| {layout} | {k} | {r['iteration_wall_s']:.2f} | {BATCH / r['iteration_wall_s']:.1f} | "
                     f"{r['stages_s']['generate']:.2f} | {r['stages_s']['update']:.2f} | {r['overlap_s']:.2f} | "
                     f"{r['peak_gib']:.2f} GiB |")
    speed = {layout: results[layout, 0]["iteration_wall_s"] / results[layout, 1]["iteration_wall_s"]
             for layout in ("colocated", "disaggregated")}
    body = (
        f"benchmarks/ppo.py's setup (`tiny` policy/reference/reward/value, {BATCH} responses × 32 tokens, 4 epochs × "
        f"4 minibatches, CPU, fp32, {ITERATIONS} iterations, median over 2–{ITERATIONS}) plus one rollout worker "
        f"(native engine), synchronous (`max_staleness: 0`) vs asynchronous (`max_staleness: 1`), in the colocated "
        f"layout (all roles share one pool's bundles) and the disaggregated one. s / iteration = the loop's wall "
        f"time per iteration incl. the weight broadcast and the checkpoint. 1-minute load average: {load:.1f} at "
        f"the start, {end_load:.1f} at the end.\n\n" + "\n".join(lines) + "\n\n"
        f"Speed-up of max_staleness=1 over 0: colocated **{speed['colocated']:.2f}×**, disaggregated "
        f"**{speed['disaggregated']:.2f}×**. Consumed rollouts' staleness per iteration (k=1): "
        f"{results['colocated', 1]['staleness']}."
    )
    write_section("PPO: bounded-staleness asynchronous RL (benchmarks/ppo_async.py)", body)


if __name__ == "__main__":
    main(sys.argv[1:])
