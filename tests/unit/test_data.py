"""Corpus, document split, Parquet shards and the TokenDataset reader (jobs/data/)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.data.corpus import DataError, Document, load_documents, load_texts, parse_play, split_documents, verse_lines
from jobs.data.tokens import SCHEMA, TokenDataset, prepare
from models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Tokenizer.train(load_texts("pydoc"), vocab_size=600).save(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, tok_path: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("data") / "pydoc"
    # small rows and shards so several shards and multi-chunk documents are exercised
    meta = prepare("pydoc", tok_path, out, validation_fraction=0.2, row_tokens=500, shard_rows=40, shard_tokens=15_000)
    return out, meta


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_prepare_writes_schema_and_counts(dataset: tuple[Path, dict], tok_path: Path) -> None:
    out, meta = dataset
    tok = Tokenizer.from_file(tok_path)
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["eos_id"] == tok.eos_id == 0 and meta["vocab_size"] == 600
    assert meta["tokenizer"]["sha256"] == tok.sha256()
    files = sorted(p.name for p in out.iterdir())
    expected = sorted([s["file"] for split in meta["splits"].values() for s in split["shards"]] + ["meta.json"])
    assert files == expected and len(meta["splits"]["train"]["shards"]) > 2  # nothing else (no temp dirs)
    docs = {d.name: d.text for d in load_documents("pydoc")}
    seen: dict[str, str] = {}
    for split, info in meta["splits"].items():
        n_tokens = n_rows = 0
        chunks: dict[str, list[tuple[int, list[int]]]] = {}
        for shard in info["shards"]:
            assert pq.read_schema(out / shard["file"]).equals(SCHEMA, check_metadata=False)
            rows = _rows(out / shard["file"])
            assert shard["rows"] == len(rows) and shard["tokens"] == sum(len(r["input_ids"]) for r in rows)
            assert all(0 < len(r["input_ids"]) <= 500 for r in rows)
            n_rows += len(rows)
            n_tokens += sum(len(r["input_ids"]) for r in rows)
            for r in rows:
                chunks.setdefault(r["doc"], []).append((r["chunk"], r["input_ids"]))
        assert info["rows"] == n_rows and info["tokens"] == n_tokens and info["docs"] == len(chunks)
        for name, parts in chunks.items():
            assert [c for c, _ in parts] == list(range(len(parts)))  # chunks in order
            ids = [i for _, p in parts for i in p]
            assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
            assert tok.decode(ids[:-1]) == docs[name]
            seen[name] = split
    assert sorted(seen) == sorted(docs)  # every document exactly once, in one split
    assert {n for n, s in seen.items() if s == "validation"} == {
        d.name for d in split_documents(load_documents("pydoc"), 0.2)["validation"]}


def test_split_is_deterministic_by_name() -> None:
    docs = [Document(f"d{i}", "x") for i in range(50)]
    a = split_documents(docs, 0.2)
    b = split_documents(list(reversed(docs)), 0.2)
    assert len(a["validation"]) == 10 and sorted(d.name for d in a["validation"]) == sorted(
        d.name for d in b["validation"])
    assert not {d.name for d in a["train"]} & {d.name for d in a["validation"]}
    assert len(split_documents(docs[:2], 0.01)["validation"]) == 1  # any positive fraction holds out ≥ 1
    assert split_documents(docs[:1], 0.5)["validation"] == []  # … but never everything
    assert split_documents(docs, 0.0)["validation"] == []


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_rank_sharding_partitions_rows(dataset: tuple[Path, dict], world_size: int) -> None:
    out, meta = dataset
    full = TokenDataset(out, "train")
    parts = [TokenDataset(out, "train", rank=r, world_size=world_size) for r in range(world_size)]
    ranges = [p.row_range for p in parts]
    assert ranges[0][0] == 0 and ranges[-1][1] == meta["splits"]["train"]["rows"]
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, disjoint, covering
    assert np.array_equal(np.concatenate([p.tokens for p in parts]), full.tokens)
    assert sum(len(p.docs) for p in parts) == len(full.docs)
    assert len(full.tokens) == meta["splits"]["train"]["tokens"] and full.tokens.dtype == np.int32


def test_blocks_deterministic_and_resumable(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    ds = TokenDataset(out, "train", block_size=64, seed=3)
    n = ds.n_blocks
    assert n == (len(ds.tokens) - 1) // 64
    # one epoch visits every block start exactly once; a block is a window of the token stream
    starts = [ds.block_start(p) for p in range(n)]
    assert sorted(starts) == list(range(0, n * 64, 64)) and starts != sorted(starts)  # a permutation, shuffled
    tokens = ds.tokens
    assert all(np.array_equal(ds.block(p), tokens[s:s + 65]) for p, s in enumerate(starts))
    run = [ds.batch_at(s, 8) for s in range(2 * n // 8 + 3)]  # crosses an epoch boundary
    assert all(b.shape == (8, 65) and b.dtype == np.int32 for b in run)
    resumed = TokenDataset(out, "train", block_size=64, seed=3)  # fresh process state
    it = resumed.iter_batches(8, start_step=5)
    for s in range(5, len(run)):
        assert np.array_equal(next(it), run[s])
    assert starts != [ds.block_start(n + p) for p in range(n)]  # each epoch has its own order
    other = TokenDataset(out, "train", block_size=64, seed=4)
    assert not all(np.array_equal(other.batch_at(s, 8), run[s]) for s in range(3))
    ordered = TokenDataset(out, "validation", block_size=64, shuffle=False)
    assert np.array_equal(ordered.batch_at(0, 2)[1], ordered.tokens[64:129])


def test_bad_inputs_clear_errors_and_nothing_left(tmp_path: Path, tok_path: Path) -> None:
    out = tmp_path / "out"
    (tmp_path / "empty.txt").write_text("  \n\n ")
    with pytest.raises(DataError, match="empty"):
        prepare(str(tmp_path / "empty.txt"), tok_path, out)
    with pytest.raises(DataError, match="no file matches"):
        prepare(str(tmp_path / "nothing-*.txt"), tok_path, out)
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet.*'text'"):
        prepare(str(tmp_path / "t.parquet"), tok_path, out)
    with pytest.raises(DataError, match="nope.json"):
        prepare("pydoc", tmp_path / "nope.json", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "t.parquet"]  # no out dir, no temp dir
    with pytest.raises(DataError, match="does not exist"):
        TokenDataset(tmp_path / "missing")
    with pytest.raises(DataError, match="meta.json"):
        TokenDataset(tmp_path)


def test_reader_names_missing_column(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    import shutil

    out, meta = dataset
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = meta["splits"]["train"]["shards"][0]["file"]
    pq.write_table(pq.read_table(copy / shard).rename_columns(["ids", "doc", "chunk"]), copy / shard)
    with pytest.raises(DataError, match=rf"{shard}.*'input_ids'"):
        TokenDataset(copy, "train")


def test_text_and_parquet_sources(tmp_path: Path, tok_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first document\n")
    (tmp_path / "b.txt").write_text("second\n")
    pq.write_table(pa.table({"text": ["row zero", "", "row two"]}), tmp_path / "c.parquet")
    docs = load_documents(f"{tmp_path}/*.txt,{tmp_path / 'c.parquet'}")
    assert [d.text for d in docs] == ["first document\n", "second\n", "row zero", "row two"]
    assert docs[3].name.endswith("c.parquet#2")
    meta = prepare(str(tmp_path), tok_path, tmp_path / "ds", validation_fraction=0.0)
    assert meta["splits"]["train"]["docs"] == 4 and meta["splits"]["validation"]["shards"] == []
    meta2 = prepare(str(tmp_path / "a.txt"), tok_path, tmp_path / "ds", validation_fraction=0.0)  # replaces
    assert meta2["splits"]["train"]["docs"] == 1 and json.loads((tmp_path / "ds" / "meta.json").read_text()) == meta2


def test_shakespeare_play_parsing() -> None:
    md = ("# Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter HAMLET and\nHORATIO_\n\n**HAMLET**  \n"
          "_\\[Aside]_  \nTo be, or not to be:  \nthat is \\--the question. __\\[Sings]_\n\n*Exit.*\n\n"
          "**HORATIO**  \n[Within]_  \nMy lord!\n")
    assert parse_play(md) == [["To be, or not to be:", "that is --the question."], ["My lord!"]]
    plays = load_documents("shakespeare")
    assert len(plays) >= 36 and all(d.name.startswith("shakespeare/") for d in plays)
    text = "".join(d.text for d in plays)
    assert "To be, or not to be" in text and not any(c in text for c in "_*#[]\\")
    held_in, held_out = verse_lines(split="train"), verse_lines(split="validation")
    assert len(held_in) > len(held_out) > 1000 and held_in == verse_lines(split="train")  # deterministic
    assert len(held_in) + len(held_out) == len(verse_lines(split="all"))
    assert all(len(ln.split()) >= 4 and "\n" not in ln for ln in held_in)


def test_jobs_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jobs import prepare as prepare_job
    from jobs import tokenizer as tokenizer_job

    tok = tmp_path / "tok" / "tokenizer.json"
    assert tokenizer_job.main(["--set", "corpus=pydoc", "--set", "vocab_size=300", "--set", f"out={tok}"]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 300 and Tokenizer.from_file(tok).eos_id == 0
    args = ["--set", "corpus=pydoc", "--set", f"tokenizer={tok}", "--set", f"out={tmp_path / 'ds'}"]
    assert prepare_job.main(args) == 0 and (tmp_path / "ds" / "meta.json").is_file()
    assert prepare_job.main([*args, "--set", "validation_fraction=1.5"]) == 2
    assert prepare_job.main([*args, "--set", f"corpus={tmp_path}/none*.txt"]) == 2
    assert "no file matches" in capsys.readouterr().err
    with pytest.raises(DataError, match="too few"):
        TokenDataset(tmp_path / "ds", "validation", rank=0, world_size=10_000)
