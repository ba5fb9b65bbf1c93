"""`raygpt prepare` on Ray Data and the streaming reader, on a 2-node `ray.cluster_utils.Cluster` (loopback only).

- The dataset (every file, compared byte for byte, meta.json included) is the same with 1 and 3 tokeniser
  actors spread over the two nodes, and the same as the in-process engine's; blocks are small so the three
  actors finish out of order.
- `prepare` without an address starts its own embedded cluster even where `ray start` has left a cluster's
  address in Ray's temp dir (bare `ray.init()` would join that cluster, then refuse `num_cpus`).
- A pretraining run resumed from its mid-epoch step-4 checkpoint trains on the same data as the uninterrupted
  run (same losses, same final weights), reading row groups on demand from a dataset whose row groups are
  smaller than a batch's span of tokens.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

pytestmark = pytest.mark.slow

KW = {"validation_fraction": 0.2, "row_tokens": 200, "shard_rows": 30, "shard_tokens": 20_000, "group_tokens": 3000,
      "block_bytes": 20_000}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    from cluster.runtime import init_ray

    node = {"num_cpus": 2, "node_ip_address": "127.0.0.1", "object_store_memory": 150 * 1024 * 1024}
    c = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False,
                                                      "dashboard_agent_listen_port": _free_port()})
    c.add_node(**node)
    init_ray(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    from jobs.data.corpus import load_texts
    from models.tokenizer import Tokenizer

    return Tokenizer.train(load_texts("pydoc"), vocab_size=512).save(tmp_path_factory.mktemp("tok") / "tok.json")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """txt (one file long enough to be cut into parts), jsonl and Parquet files of pydoc topics."""
    from jobs.data.corpus import load_texts

    root = tmp_path_factory.mktemp("corpus")
    texts = load_texts("pydoc")
    rng = random.Random(3)
    (root / "big.txt").write_text("\n\n".join(texts[:40]))  # > MAX_DOC_CHARS: several documents
    for i in range(3):
        (root / f"t{i}.txt").write_text("\n\n".join(rng.sample(texts, 3)))
    with open(root / "lines.jsonl", "w") as f:
        for t in texts[40:60]:
            f.write(json.dumps({"text": t}) + "\n")
    pq.write_table(pa.table({"text": texts[60:]}), root / "rows.parquet", row_group_size=5)
    return root


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_ray_prepare_identical_for_1_and_3_workers_and_local(cluster, corpus, tokenizer, tmp_path):
    from jobs.data.tokens import prepare

    lines: list[str] = []
    local = prepare(str(corpus), tokenizer, tmp_path / "local", engine="local", **KW)
    one = prepare(str(corpus), tokenizer, tmp_path / "ray1", engine="ray", workers=1, **KW)
    three = prepare(str(corpus), tokenizer, tmp_path / "ray3", engine="ray", workers=3, progress=lines.append, **KW)
    assert local == one == three
    assert local["splits"]["train"]["docs"] > 30 and len(local["splits"]["train"]["shards"]) > 3
    want = _files(tmp_path / "local")
    assert _files(tmp_path / "ray1") == want and _files(tmp_path / "ray3") == want
    assert lines and "docs/s" in lines[-1] and "tokens/s" in lines[-1] and "ray, 3 workers" in lines[-1]


def test_embedded_prepare_ignores_an_advertised_cluster(cluster, corpus, tokenizer, tmp_path):
    from jobs.data.tokens import prepare

    ray_tmp = Path(tempfile.mkdtemp(prefix="rgp-", dir="/tmp"))  # short: Ray's Unix sockets live under it
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(cluster.address)  # what `ray start --head` writes
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": str(ray_tmp)}
        code = ("import sys; from jobs.data.tokens import prepare; "
                "prepare(sys.argv[1], sys.argv[2], sys.argv[3], engine='ray', workers=1)")
        r = subprocess.run([sys.executable, "-c", code, str(corpus), str(tokenizer), str(tmp_path / "ray")],
                           env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                           timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    prepare(str(corpus), tokenizer, tmp_path / "local", engine="local")
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")


def _pretrain(dataset: Path, root: Path, name: str, **sets: object):
    from jobs.config import load_config
    from jobs.pretrain import PretrainConfig, run

    base = {
        "name": name, "runs_root": str(root), "log_every": 1, "seed": 3, "model": {"preset": "nano"},
        "data": {"dir": str(dataset), "seq_len": 32, "seed": 5},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "max_steps": 8, "micro_batch_size": 2, "grad_accum": 2},
        "parallel": {"num_workers": 2, "zero_stage": 1}, "checkpoint": {"every_n_steps": 4, "keep": 2},
        "failure": {"max_failures": 0}, "eval": {"every_n_steps": 8, "batches": 1},
    }
    return run(load_config(PretrainConfig, base=base, overrides=[f"{k}={v}" for k, v in sets.items()]))


def test_resume_mid_epoch_equals_uninterrupted_run(cluster, tokenizer, tmp_path):
    from cluster.metrics import read_metrics
    from jobs.data.corpus import load_texts
    from jobs.data.reader import TokenDataset
    from jobs.data.tokens import prepare
    from models.checkpoint import load_checkpoint

    src = tmp_path / "small.jsonl"
    src.write_text("".join(json.dumps({"text": t[:400]}) + "\n" for t in load_texts("pydoc")[:10]))
    data = tmp_path / "data"
    prepare(str(src), tokenizer, data, engine="ray", workers=2, row_tokens=40, group_tokens=60, block_bytes=1000)
    ranks = [TokenDataset(data, "train", r, 2, block_size=32, seed=5) for r in range(2)]
    n_blocks = min(d.n_blocks for d in ranks)
    # 4 blocks per rank and step: the step-4 checkpoint is mid-epoch 0, and step 8 (positions 28–31) is in epoch 1
    assert 7 * 4 >= n_blocks > 4 * 4, n_blocks
    assert all(len(d._pieces) > 5 for d in ranks)  # many row groups: blocks are assembled across them

    full = Path(_pretrain(data, tmp_path, "full")["run_dir"])
    half = full / "trainer_state" / "step-00000004"
    resumed = Path(_pretrain(data, tmp_path, "resumed", **{"checkpoint.resume_from": str(half)})["run_dir"])
    loss = {n: {r["step"]: r["loss"] for r in read_metrics(d) if "loss" in r} for n, d in (("f", full), ("r", resumed))}
    assert sorted(loss["r"]) == [5, 6, 7, 8]
    np.testing.assert_allclose([loss["r"][s] for s in range(5, 9)], [loss["f"][s] for s in range(5, 9)],
                               atol=2e-5, rtol=0)
    epochs = [r["epoch"] for r in read_metrics(resumed) if "epoch" in r]
    assert epochs[0] == 0 and epochs[-1] == 1  # the resumed part crosses into the next epoch
    a, b = load_checkpoint(full / "checkpoint").state_dict(), load_checkpoint(resumed / "checkpoint").state_dict()
    for k, t in a.items():
        torch.testing.assert_close(b[k], t, atol=1e-5, rtol=0)
