"""Streaming data path without Ray: the hash-threshold split, the streaming file readers, the shard writer's
independence from batching, and the streaming `TokenDataset` against a reader that loads everything."""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import jobs.data.corpus as corpus
import jobs.data.sources as sources
from jobs.data.corpus import DataError, Document, HoldOut, load_documents, load_texts, split_documents
from jobs.data.reader import TokenDataset, check_dataset
from jobs.data.tokens import prepare
from models.tokenizer import Tokenizer


def naive_split(names: list[str], fraction: float) -> set[str]:
    """The rule as first written: rank all names by their SHA-256 hex digest, hold out the first ⌈f·n⌉."""
    n_val = 0 if fraction == 0 else min(len(names) - 1, math.ceil(fraction * len(names)))
    return set(sorted(names, key=lambda x: hashlib.sha256(x.encode()).hexdigest())[:n_val])


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.1, 0.37, 0.9])
def test_threshold_rule_equals_ranking(fraction: float) -> None:
    rng = random.Random(7)
    for n in (1, 2, 3, 50, 400):
        names = [f"doc/{rng.random():.12f}" for _ in range(n)]
        got = {d.name for d in split_documents([Document(x, "t") for x in names], fraction)["validation"]}
        assert got == naive_split(names, fraction)


def test_threshold_rule_resolves_ties_by_full_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 4-bit key makes most keys collide: the tie path must still pick exactly the naive ranking's documents.
    monkeypatch.setattr(corpus, "name_key", lambda x: hashlib.sha256(x.encode()).digest()[0] >> 4)
    names = [f"n{i}" for i in range(300)]
    for fraction in (0.05, 0.1, 0.5):
        got = {d.name for d in split_documents([Document(x, "t") for x in names], fraction)["validation"]}
        assert got == naive_split(names, fraction) and len(got) == math.ceil(fraction * 300)
    with pytest.raises(DataError, match="'n3' listed twice"):
        HoldOut.from_keys(np.array([1, 1], np.uint64), 0.5, lambda keys: ["n3", "n3"])


def split_long_reference(name: str, text: str, limit: int) -> list[Document]:
    """The whole-text cutter the streaming reader replaced (corpus._split_long before streaming)."""
    if len(text) <= limit:
        return [Document(name, text)]
    parts, start = [], 0
    while start < len(text):
        end = min(len(text), start + limit)
        if end < len(text):
            cut = text.rfind("\n\n", start + limit // 2, end)
            end = cut + 2 if cut >= 0 else end
        parts.append(text[start:end])
        start = end
    return [d for d in (Document(f"{name}#{i}", t) for i, t in enumerate(parts)) if d.text.strip()]


def test_streamed_text_parts_equal_whole_text_cutting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_DOC_CHARS", 97)
    rng = random.Random(0)
    words = ["alpha", "beta", "\n", "\n\n", "γάμμα", "\r\n", "  ", "\r\n\r\n"]
    cut = 0
    for i in range(40):
        raw = "".join(rng.choice(words) + " " for _ in range(rng.randint(0, 120)))
        if i % 5 == 0:
            raw = " \n " * 80 + raw  # a whitespace-only leading part is dropped, its index still counts
        p = tmp_path / f"f{i}.txt"
        p.write_bytes(raw.encode())
        text = raw.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as Path.read_text
        got = list(sources.read_documents(sources.list_inputs(str(p))[0]))
        want = split_long_reference(str(p), text, 97)
        assert got == [d for d in want if d.text.strip()]
        cut += len(got) > 1
    assert cut > 20  # most files were cut into parts


def test_jsonl_and_parquet_documents_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "a.jsonl"
    good.write_text('{"text": "first"}\n\n{"text": "  "}\n{"text": "third", "id": 3}\n{"text": null}\n')
    docs = load_documents(str(good))
    assert [(d.name, d.text) for d in docs] == [(f"{good}#0", "first"), (f"{good}#3", "third")]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:3: not valid JSON"):
        load_documents(str(bad))
    bad.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: no field 'text' \(found: body\)"):
        load_documents(str(bad))
    bad.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:1: field 'text' must be a string"):
        load_documents(str(bad))
    (tmp_path / "c.txt").write_bytes(b"line one\nline two\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"c\.txt:3: not UTF-8 text"):
        load_documents(str(tmp_path / "c.txt"))
    (tmp_path / "d.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"d\.parquet: not a readable Parquet file"):
        load_documents(str(tmp_path / "d.parquet"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "e.parquet")
    with pytest.raises(DataError, match=r"e\.parquet: Parquet file has no column 'body2'"):
        load_documents(str(tmp_path / "e.parquet"), text_field="body2")
    assert [d.name for d in load_documents(str(tmp_path / "e.parquet"), text_field="body")] == [
        f"{tmp_path / 'e.parquet'}#0"]


def test_filesystem_uri_sources(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("alpha\n")
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "beta"}\n')
    (tmp_path / "sub" / "skip.md").write_text("not listed from a directory\n")
    by_dir = load_documents(f"file://{tmp_path}/sub")
    assert [(d.name, d.text) for d in by_dir] == [(f"file://{tmp_path}/sub/a.txt", "alpha\n"),
                                                  (f"file://{tmp_path}/sub/b.jsonl#0", "beta")]
    assert [d.name for d in load_documents(f"file://{tmp_path}/sub/*.txt")] == [f"file://{tmp_path}/sub/a.txt"]
    with pytest.raises(DataError, match="no file matches"):
        load_documents(f"file://{tmp_path}/sub/*.csv")


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Tokenizer.train(load_texts("pydoc"), vocab_size=600).save(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Text, JSON-lines and Parquet files with pydoc topics (mixed sizes, some cut into parts)."""
    root = tmp_path_factory.mktemp("corpus")
    texts = load_texts("pydoc")
    rng = random.Random(1)
    for i in range(4):
        (root / f"t{i}.txt").write_text("\n\n".join(rng.sample(texts, 6 + 30 * (i == 0))))
    with open(root / "j.jsonl", "w") as f:
        for t in texts[:25]:
            f.write(json.dumps({"text": t}) + "\n")
    pq.write_table(pa.table({"text": texts[25:60]}), root / "p.parquet", row_group_size=7)
    return root


KW = {"validation_fraction": 0.2, "row_tokens": 300, "shard_rows": 40, "shard_tokens": 30_000, "group_tokens": 4000}


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_local_output_independent_of_batching(corpus_dir: Path, tok_path: Path, tmp_path: Path) -> None:
    a = prepare(str(corpus_dir), tok_path, tmp_path / "a", engine="local", block_bytes=1, **KW)  # one doc per batch
    b = prepare(str(corpus_dir), tok_path, tmp_path / "b", engine="local", block_bytes=1 << 30, **KW)  # one batch
    assert a == b and _files(tmp_path / "a") == _files(tmp_path / "b")
    docs = load_documents(str(corpus_dir))
    held = {d.name for d in split_documents(docs, 0.2)["validation"]}
    for split, info in a["splits"].items():
        names = [n for s in info["shards"] for n in pq.read_table(tmp_path / "a" / s["file"]).column("doc").to_pylist()]
        want = [d.name for d in docs if (d.name in held) == (split == "validation")]
        assert list(dict.fromkeys(names)) == want  # corpus order, the rule's split
        for s in info["shards"]:
            md = pq.ParquetFile(tmp_path / "a" / s["file"]).metadata
            assert s["group_rows"] == [md.row_group(g).num_rows for g in range(md.num_row_groups)]
            assert sum(s["group_tokens"]) == s["tokens"] and all(t >= 4000 for t in s["group_tokens"][:-1])


def naive_rank_tokens(d: Path, split: str, rank: int, world: int) -> np.ndarray:
    """Reference: every row of the split loaded, the rank's contiguous row range concatenated."""
    meta = json.loads((d / "meta.json").read_text())
    rows = [r for s in meta["splits"][split]["shards"] for r in pq.read_table(d / s["file"]).column(0).to_pylist()]
    lo, hi = rank * len(rows) // world, (rank + 1) * len(rows) // world
    return np.array([t for r in rows[lo:hi] for t in r], dtype=np.int32)


@pytest.fixture(scope="module")
def dataset(corpus_dir: Path, tok_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "ds"
    prepare(str(corpus_dir), tok_path, out, engine="local", **KW)
    return out


@pytest.mark.parametrize("world", [1, 3])
def test_streaming_reader_equals_full_load(dataset: Path, world: int, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[int] = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **k: decoded.append(i) or real(self, i, *a, **k))
    rng = np.random.default_rng(0)
    for rank in range(world):
        ref = naive_rank_tokens(dataset, "train", rank, world)
        ds = TokenDataset(dataset, "train", rank, world, block_size=50, seed=9, cache_groups=2)
        assert len(ds) == ref.size and ds.n_blocks == (ref.size - 1) // 50
        for a in rng.integers(0, ref.size, 30):
            b = min(ref.size, int(a) + int(rng.integers(0, 9000)))
            assert np.array_equal(ds.read(int(a), b), ref[a:b])
        decoded.clear()
        block = ds.block(7)
        assert len(decoded) <= 3  # one block decodes the row groups it spans (≤ 2 here, 4000-token groups)
        start = ds.block_start(7)
        assert np.array_equal(block, ref[start:start + 51])
        # the data order is today's rule: epoch permutation from PCG64 seeded with (seed, epoch, rank)
        perm = np.random.Generator(np.random.PCG64(np.random.SeedSequence([9, 1, rank]))).permutation(ds.n_blocks)
        assert [ds.block_start(ds.n_blocks + i) for i in range(5)] == [int(p) * 50 for p in perm[:5]]


def test_reader_without_index_and_tampered_index(dataset: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(dataset, old)
    meta = json.loads((old / "meta.json").read_text())
    for info in meta["splits"].values():
        for s in info["shards"]:
            del s["group_rows"], s["group_tokens"]  # a dataset prepared before the index existed
    (old / "meta.json").write_text(json.dumps(meta))
    for world in (1, 2):
        for r in range(world):
            want = naive_rank_tokens(dataset, "train", r, world)
            assert np.array_equal(TokenDataset(old, "train", r, world).tokens, want)
    meta["splits"]["train"]["shards"][0]["group_rows"] = [1, 1]
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="train-00000.parquet: row groups hold"):
        TokenDataset(old, "train")


def test_check_dataset(dataset: Path, tok_path: Path, tmp_path: Path) -> None:
    meta = check_dataset(dataset, tokenizer=tok_path, block_size=64, world_size=2)
    assert meta["tokenizer"]["sha256"] == Tokenizer.from_file(tok_path).sha256()
    other = Tokenizer.train(load_texts("pydoc")[:20], vocab_size=300).save(tmp_path / "other.json")
    with pytest.raises(DataError, match=r"other\.json: tokenizer sha256 .* differs"):
        check_dataset(dataset, tokenizer=other)
    # (which split is smaller depends on the temporary paths: document names, hence the split, contain them)
    small = min(meta["splits"], key=lambda s: meta["splits"][s]["tokens"])
    n = meta["splits"][small]["tokens"]
    with pytest.raises(DataError, match=rf"rank 0 of 1 has {n} tokens of split '{small}', fewer than one sequence"):
        check_dataset(dataset, block_size=n)
    check_dataset(dataset, block_size=n - 1)


def test_engine_choice(corpus_dir: Path, tok_path: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="engine: must be one of"):
        prepare(str(corpus_dir), tok_path, tmp_path / "x", engine="spark")
    # small inputs: auto stays in-process (no Ray started) and writes what engine=local writes
    auto = prepare(str(corpus_dir), tok_path, tmp_path / "auto", **KW)
    local = prepare(str(corpus_dir), tok_path, tmp_path / "local", engine="local", **KW)
    assert auto == local and _files(tmp_path / "auto") == _files(tmp_path / "local")
    import ray

    assert not ray.is_initialized()
