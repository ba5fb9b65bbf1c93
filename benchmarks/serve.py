"""Serving throughput: dynamic batching (`@serve.batch`, max_batch_size 32) vs no batching (max_batch_size 1),
same deployment otherwise, on a bounded loopback load: 32 concurrent HTTP clients send a fixed number of
/v1/completions requests (random `tiny` checkpoint, 32 new tokens each, sampled, one model replica with one
torch thread). Goal ≥ 5× the requests/s of max_batch_size 1.

Latency is per request, measured at the client (HTTP round trip, keep-alive connections).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import PeakRSS, write_section
from models.checkpoint import save_checkpoint
from models.config import GPTConfig
from models.gpt import GPT
from models.tokenizer import Tokenizer

CLIENTS, REQUESTS, NEW_TOKENS = 32, 192, 32


def make_checkpoint(path: Path) -> Path:
    from pydoc_data.topics import topics

    tok = Tokenizer.train(list(topics.values()), vocab_size=1024)
    torch.manual_seed(0)
    return save_checkpoint(GPT(GPTConfig.from_name("tiny", vocab_size=tok.vocab_size)), path, tokenizer=tok)


def load(port: int, n: int, clients: int) -> tuple[float, list[float], list[int], int]:
    """n requests from `clients` threads → (wall s, latencies s, batch rows seen, completion tokens)."""
    next_i, lock = iter(range(n)), threading.Lock()
    lat: list[float] = []
    rows: list[int] = []
    tokens = [0]
    errors: list[str] = []

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while True:
            with lock:
                i = next(next_i, None)
            if i is None:
                break
            body = json.dumps({"prompt": f"Request {i}: the king said that", "max_tokens": NEW_TOKENS,
                               "temperature": 1.0, "seed": i})
            t = time.perf_counter()
            conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = json.loads(resp.read())
            dt = time.perf_counter() - t
            with lock:
                if resp.status != 200:
                    errors.append(f"{resp.status}: {data}")
                    continue
                lat.append(dt)
                rows.append(int(resp.getheader("x-raygpt-batch-rows", "0")))
                tokens[0] += data["usage"]["completion_tokens"]
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return wall, lat, rows, tokens[0]


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def main() -> None:
    from ray import serve

    from cluster.runtime import init_ray, shutdown_ray
    from jobs.config import from_dict
    from jobs.serving.app import ServeConfig, build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = {}
    load_avg = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="raygpt-bench-serve-") as tmp, PeakRSS() as rss:
        ckpt = make_checkpoint(Path(tmp) / "tiny")
        init_ray(num_cpus=4, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            for label, mbs in (("batched", 32), ("max_batch_size=1", 1)):
                cfg = from_dict(ServeConfig, {
                    "models": [f"tiny={ckpt}"], "app_name": f"bench-{mbs}",
                    "batching": {"max_batch_size": mbs, "batch_wait_timeout_s": 0.01},
                    "scaling": {"num_cpus": 1.0, "torch_threads": 1},
                    "limits": {"max_choices": 1, "request_timeout_s": 600.0},
                })
                serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/", blocking=False)
                load(port, CLIENTS, CLIENTS)  # warm-up: first batches, allocator, HTTP connections
                wall, lat, rows, tokens = load(port, REQUESTS, CLIENTS)
                results[label] = (REQUESTS / wall, tokens / wall, pct(lat, 50), pct(lat, 99), statistics.mean(rows))
                print(f"{label}: {REQUESTS / wall:.1f} req/s, {tokens / wall:,.0f} tok/s, p50 {pct(lat, 50):.2f} s, "
                      f"p99 {pct(lat, 99):.2f} s, mean batch {statistics.mean(rows):.1f} rows", flush=True)
                serve.delete(cfg.app_name)
        finally:
            serve.shutdown()
            shutdown_ray()
    ratio = results["batched"][0] / results["max_batch_size=1"][0]
    table = "\n".join(f"| {k} | {r:.1f} | {t:,.0f} | {p50:.2f} | {p99:.2f} | {b:.1f} |"
                      for k, (r, t, p50, p99, b) in results.items())
    body = (
        f"{CLIENTS} concurrent loopback HTTP clients, {REQUESTS} /v1/completions requests per setting (after a "
        f"{CLIENTS}-request warm-up), random `tiny` checkpoint (4 layers × 128, n_ctx 128), {NEW_TOKENS} sampled "
        "tokens per request, one model replica (1 CPU, 1 torch thread) + one ingress on an embedded Ray cluster. "
        f"Goal ≥ 5× requests/s with batching. 1-minute load average at the start: {load_avg:.1f} (shared machine)."
        "\n\n"
        "| setting | requests/s | tokens/s | p50 latency (s) | p99 latency (s) | mean batch rows |\n"
        "|---|---|---|---|---|---|\n" + table
        + f"\n\nThroughput ratio batched / max_batch_size=1: **{ratio:.1f}×**. Peak RSS of the benchmark process "
        f"tree (driver + every Ray process: GCS, raylet, Serve controller, proxy, replicas): {rss.peak_gib:.2f} GiB."
    )
    write_section("Serving: dynamic batching vs max_batch_size=1 (benchmarks/serve.py)", body)


if __name__ == "__main__":
    main()
