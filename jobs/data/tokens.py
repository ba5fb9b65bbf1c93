"""`prepare`: a corpus → a token dataset (`raygpt-tokens/1`), in-process or on Ray Data; and the reader's names.

Dataset layout written by `prepare(…, out)` (see docs/DATA.md and jobs/data/shards.py):

    out/meta.json                 {"format", "tokenizer": {"path", "sha256"}, "vocab_size", "eos_id", "corpus",
                                   "validation_fraction", "row_tokens", "group_tokens",
                                   "splits": {"train"|"validation": {"docs", "rows", "tokens",
                                              "shards": [{"file", "rows", "tokens", "group_rows", "group_tokens"}]}}}
    out/train-00000.parquet …     one row per document chunk:
    out/validation-00000.parquet    input_ids: list<int32>  token ids; EOS appended to the document's last chunk
                                    doc: string             document name
                                    chunk: int32            chunk index within the document (0, 1, …)

Concatenating a document's chunks in order and decoding gives its text + `<|endoftext|>`. Rows are in
document order within a split, so the concatenation of all rows of a split is the token stream.

Engines: "local" tokenises in this process (two streaming passes over the files: names, then documents);
"ray" runs jobs/data/prepare_ray.py's Ray Data pipeline; "auto" picks ray for inputs of ≥ `AUTO_RAY_BYTES`.
Both produce byte-identical datasets. The reader (`TokenDataset`, `read_meta`, `check_dataset`) lives in
jobs/data/reader.py and is re-exported here.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from jobs.data.corpus import (
    DEFAULT_VALIDATION_FRACTION,
    DataError,
    Document,
    HoldOut,
    load_documents,
    name_key,
)
from jobs.data.reader import TokenDataset, check_dataset, read_meta
from jobs.data.shards import FORMAT, SCHEMA, DatasetWriter, check_out_dir, order_key, replace_dir, tokenize_table
from jobs.data.sources import list_inputs, read_documents
from models.tokenizer import Tokenizer, TokenizerError
import ray
from cluster.runtime import init_ray
from jobs.data.prepare_ray import ray_row_tables
from cluster.runtime import shutdown_ray

__all__ = ["FORMAT", "SCHEMA", "TokenDataset", "check_dataset", "prepare", "read_meta"]

BUILTIN = ("shakespeare", "pydoc")
ENGINES = ("auto", "local", "ray")
AUTO_RAY_BYTES = 64 << 20  # below this, starting Ray costs more than tokenising on one core
GROUP_TOKENS = 65_536  # tokens per Parquet row group: 256 KiB of int32, the reader's unit of IO and memory
BLOCK_BYTES = 8 << 20  # text per Ray Data block


class Progress:
    """One status line per update (at most every `every_s` seconds): documents, tokens, and their rates."""

    def __init__(self, label: str, emit: Callable[[str], None] | None, every_s: float = 5.0) -> None:
        self.label, self.emit, self.every_s = label, emit, every_s
        self.t0 = self.last = time.perf_counter()

    def update(self, docs: int, tokens: int, final: bool = False) -> None:
        now = time.perf_counter()
        if self.emit is None or (not final and now - self.last < self.every_s):
            return
        self.last = now
        el = max(now - self.t0, 1e-9)
        self.emit(f"prepare [{self.label}]: {docs:,} docs, {tokens / 1e6:,.2f}M tokens in {el:,.0f} s "
                  f"({docs / el:,.0f} docs/s, {tokens / el / 1e6:,.3f}M tokens/s){' — done' if final else ''}")


def stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def input_bytes(source: str) -> int:
    return 0 if source in BUILTIN else sum(f.size for f in list_inputs(source))


def prepare(source: str, tokenizer_path: str | os.PathLike[str], out: str | os.PathLike[str],
            validation_fraction: float = DEFAULT_VALIDATION_FRACTION, row_tokens: int = 2048,
            shard_rows: int = 100_000, shard_tokens: int = 50_000_000, group_tokens: int = GROUP_TOKENS,
            text_field: str = "text", engine: str = "auto", workers: int = 0, cpus_per_worker: float = 1.0,
            block_bytes: int = BLOCK_BYTES, address: str | None = None,
            progress: Callable[[str], None] | None = None) -> dict:
    """Tokenise `source` with `tokenizer_path` into Parquet shards under `out`; returns the meta dict.

    Documents are cut into rows of at most `row_tokens` tokens (EOS appended to each document); a shard is closed
    when it reaches `shard_rows` rows or `shard_tokens` tokens, a row group at `group_tokens` tokens. Everything
    is written into a temporary sibling directory that replaces `out` only when complete, so `out` is never
    half-written. An existing `out` is replaced only if it is a dataset (has meta.json) or empty.
    `engine="ray"` runs on the Ray cluster at `address` (embedded if None) with `workers` tokeniser actors
    (0: one per cluster CPU but one); `progress` receives one status line per update."""
    for name, v in (("row_tokens", row_tokens), ("block_bytes", block_bytes)):
        if v < 1:
            raise DataError(f"{name}: must be ≥ 1, got {v}")
    if engine not in ENGINES:
        raise DataError(f"engine: must be one of {list(ENGINES)}, got {engine!r}")
    if not 0.0 <= validation_fraction < 1.0:
        raise DataError(f"validation_fraction: must be in [0, 1), got {validation_fraction}")
    out = Path(out)
    check_out_dir(out)
    try:
        tok = Tokenizer.from_file(tokenizer_path)
    except TokenizerError as e:
        raise DataError(str(e)) from None
    if engine == "auto":
        engine = "ray" if input_bytes(source) >= AUTO_RAY_BYTES else "local"

    started_ray = False
    if engine == "ray":


        started_ray = not ray.is_initialized()
        # An embedded cluster gets enough logical CPUs for the requested actors plus the read tasks.
        want = math.ceil(workers * cpus_per_worker + 1) if workers else None
        resources = init_ray(address=address, num_cpus=max(os.cpu_count() or 1, want or 0))
        workers = workers or max(1, int(resources.get("CPU", 2)) - 1)

        tables: Iterator[pa.Table] = ray_row_tables(source, tok, validation_fraction, row_tokens, text_field,
                                                    workers, cpus_per_worker, block_bytes, progress or (lambda _: None))
        label = f"ray, {workers} worker{'s' * (workers != 1)}"
    else:
        tables = local_row_tables(source, tok, validation_fraction, row_tokens, text_field, block_bytes)
        label = "local"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # (not mkdtemp: that would make the final directory mode 0700)
    try:
        writer = DatasetWriter(tmp, shard_rows, shard_tokens, group_tokens)
        bar = Progress(label, progress)
        for table in tables:
            writer.add(table)
            bar.update(writer.docs, writer.tokens)
        bar.update(writer.docs, writer.tokens, final=True)
        meta = {"format": FORMAT, "tokenizer": {"path": str(tokenizer_path), "sha256": tok.sha256()},
                "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "corpus": source,
                "validation_fraction": validation_fraction, "row_tokens": row_tokens, "group_tokens": group_tokens,
                "splits": writer.finish()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if started_ray:

            shutdown_ray()
    return meta


# --- the in-process engine ---------------------------------------------------------------------------------------
def local_row_tables(source: str, tok: Tokenizer, validation_fraction: float, row_tokens: int, text_field: str,
                     block_bytes: int) -> Iterator[pa.Table]:
    """Ordered row tables of `source`, tokenised in this process: the same documents, order and split as the Ray
    engine (files are streamed twice — names, then documents — so memory stays O(block_bytes))."""
    if source in BUILTIN:
        docs = load_documents(source)
        stream: Callable[[], Iterator[tuple[Document, int]]] = lambda: (  # noqa: E731
            (d, order_key(0, i)) for i, d in enumerate(docs))
    else:
        files = list_inputs(source)

        def stream() -> Iterator[tuple[Document, int]]:
            for index, f in enumerate(files):
                for ordinal, d in enumerate(read_documents(f, text_field)):
                    yield d, order_key(index, ordinal)

    keys = np.fromiter((name_key(d.name) for d, _ in stream()), dtype=np.uint64)
    if not keys.size:
        raise DataError(f"corpus {source!r}: empty (no non-empty documents)")
    try:
        rule = HoldOut.from_keys(keys, validation_fraction,
                                 lambda ks: [d.name for d, _ in stream() if name_key(d.name) in ks])
    except DataError as e:
        raise DataError(f"corpus {source!r}: {e}") from None
    block: list[tuple[Document, int]] = []
    size = 0
    for d, order in stream():
        if block and size + len(d.text) > block_bytes:
            yield _tokenized(tok, block, rule, row_tokens)
            block, size = [], 0
        block.append((d, order))
        size += len(d.text)
    if block:
        yield _tokenized(tok, block, rule, row_tokens)


def _tokenized(tok: Tokenizer, block: list[tuple[Document, int]], rule: HoldOut, row_tokens: int) -> pa.Table:
    table = pa.table({"name": [d.name for d, _ in block], "text": [d.text for d, _ in block],
                      "held_out": [rule.held_out(d.name) for d, _ in block],
                      "order": pa.array([o for _, o in block], pa.int64())})
    return tokenize_table(tok, table, row_tokens)

