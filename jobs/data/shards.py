"""Writing a token dataset (`raygpt-tokens/1`): tokenised documents → rows → Parquet shards + meta.json.

Both `raygpt prepare` engines (in-process and Ray Data) turn documents into the same row tables with
`rows_table` and feed them, in document order, to one `DatasetWriter`; every boundary — rows, row groups, shards —
is a function of that ordered row stream alone, never of how the stream was batched, so the files are
byte-identical whichever engine and however many workers produced them.

Rows: a document's ids + EOS cut into chunks of at most `row_tokens`. Row groups: a group closes once it holds
≥ `group_tokens` tokens (or its shard closes); it is the streaming reader's unit of IO and memory. Shards: a shard
closes once it holds ≥ `shard_rows` rows or ≥ `shard_tokens` tokens. Per shard, meta.json lists the rows and
tokens of every row group (`group_rows`, `group_tokens`): the index that lets `TokenDataset` find the row group
holding any token without opening other files.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.data.corpus import SPLITS, DataError

FORMAT = "raygpt-tokens/1"
SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("doc", pa.string()), ("chunk", pa.int32())])
# Row tables between the tokeniser and the writer carry two more columns: the split and the document's position
# in the corpus (file index · 2^40 + document ordinal in the file), which the writer checks is non-decreasing.
ROW_SCHEMA = pa.schema([*SCHEMA, ("held_out", pa.bool_()), ("order", pa.int64())])
ORDER_FILE_SHIFT = 40
TOKENIZE_BATCH_BYTES = 1 << 20  # text per encode_batch call (bounds the Python lists of ids it returns)


def order_key(file_index: int, ordinal: int) -> int:
    return (file_index << ORDER_FILE_SHIFT) | ordinal


def rows_table(names: Sequence[str], held_out: Sequence[bool], orders: Sequence[int],
               ids: Sequence[Sequence[int]], eos_id: int, row_tokens: int) -> pa.Table:
    """One row per chunk of ≤ row_tokens tokens of each document's `ids + [eos_id]`, documents in the given order."""
    lens = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lens.sum()), dtype=np.int32)
    ends = np.cumsum(lens)
    starts = ends - lens
    for s, e, x in zip(starts, ends, ids):
        flat[s:e - 1] = x
        flat[e - 1] = eos_id
    nrows = (lens + row_tokens - 1) // row_tokens
    doc = np.repeat(np.arange(len(ids)), nrows)
    chunk = np.arange(int(nrows.sum())) - np.repeat(np.cumsum(nrows) - nrows, nrows)
    offsets = np.append(np.repeat(starts, nrows) + chunk * row_tokens, flat.size).astype(np.int32)
    names_arr = pa.array(list(names), pa.string()).take(pa.array(doc))
    return pa.Table.from_arrays([
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)), names_arr, pa.array(chunk.astype(np.int32)),
        pa.array(np.asarray(held_out, dtype=bool)[doc]), pa.array(np.asarray(orders, dtype=np.int64)[doc]),
    ], schema=ROW_SCHEMA)


def tokenize_table(tok: Any, batch: pa.Table, row_tokens: int) -> pa.Table:
    """Document table (name, text, held_out, order) → row table (shards.ROW_SCHEMA); `encode_batch` on ≤ 1 MiB of
    text at a time."""
    names = batch.column("name").to_pylist()
    texts = batch.column("text").to_pylist()
    ids: list[np.ndarray] = []
    lo = 0
    while lo < len(texts):
        hi, size = lo, 0
        while hi < len(texts) and (hi == lo or size + len(texts[hi]) <= TOKENIZE_BATCH_BYTES):
            size += len(texts[hi])
            hi += 1
        ids.extend(np.asarray(x, dtype=np.int32) for x in tok.encode_batch(texts[lo:hi]))
        lo = hi
    held = batch.column("held_out").to_numpy(zero_copy_only=False)
    return rows_table(names, held, batch.column("order").to_numpy(), ids, tok.eos_id, row_tokens)


class _SplitWriter:
    """The shards of one split; rows arrive in order through `add`."""

    def __init__(self, directory: Path, split: str, shard_rows: int, shard_tokens: int, group_tokens: int) -> None:
        self.dir, self.split = directory, split
        self.shard_rows, self.shard_tokens, self.group_tokens = shard_rows, shard_tokens, group_tokens
        self.shards: list[dict] = []
        self.docs = 0
        self._writer: pq.ParquetWriter | None = None
        self._rows = self._tokens = 0  # in the open shard
        self._group: list[pa.Table] = []
        self._group_rows = self._group_tokens = 0
        self._sizes: tuple[list[int], list[int]] = ([], [])

    def add(self, table: pa.Table) -> None:
        lengths = pc.list_value_length(table.column("input_ids")).to_numpy().astype(np.int64)
        self.docs += int(np.count_nonzero(table.column("chunk").to_numpy() == 0))
        cum = np.cumsum(lengths)
        pos = 0
        while pos < len(lengths):
            done = cum[pos - 1] if pos else 0
            # first row (index ≥ pos) after which the shard, resp. the group, is full
            shard_end = min(pos + max(self.shard_rows - self._rows, 1) - 1,
                            int(np.searchsorted(cum, self.shard_tokens - self._tokens + done, side="left")))
            group_end = int(np.searchsorted(cum, self.group_tokens - self._group_tokens + done, side="left"))
            end = min(shard_end, group_end, len(lengths) - 1)
            n, t = end + 1 - pos, int(cum[end] - done)
            self._group.append(table.slice(pos, n))
            self._rows, self._tokens = self._rows + n, self._tokens + t
            self._group_rows, self._group_tokens = self._group_rows + n, self._group_tokens + t
            if end == group_end or end == shard_end:
                self._flush_group()
            if end == shard_end:
                self._close_shard()
            pos = end + 1

    def _flush_group(self) -> None:
        if not self._group_rows:
            return
        # One chunk per column: the Parquet bytes then depend on the rows only, not on upstream batching.
        table = pa.concat_tables(self._group).select(SCHEMA.names).combine_chunks()
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.dir / self._file(), SCHEMA)
        self._writer.write_table(table, row_group_size=table.num_rows)
        self._sizes[0].append(self._group_rows)
        self._sizes[1].append(self._group_tokens)
        self._group, self._group_rows, self._group_tokens = [], 0, 0

    def _file(self) -> str:
        return f"{self.split}-{len(self.shards):05d}.parquet"

    def _close_shard(self) -> None:
        self._flush_group()
        if self._writer is None:
            return
        self._writer.close()
        self.shards.append({"file": self._file(), "rows": self._rows, "tokens": self._tokens,
                            "group_rows": self._sizes[0], "group_tokens": self._sizes[1]})
        self._writer, self._rows, self._tokens, self._sizes = None, 0, 0, ([], [])

    def finish(self) -> dict:
        self._close_shard()
        return {"docs": self.docs, "rows": sum(s["rows"] for s in self.shards),
                "tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}


class DatasetWriter:
    """Routes ordered row tables (`rows_table`) to the train / validation shards under `directory`."""

    def __init__(self, directory: Path, shard_rows: int, shard_tokens: int, group_tokens: int) -> None:
        for name, v in (("shard_rows", shard_rows), ("shard_tokens", shard_tokens), ("group_tokens", group_tokens)):
            if v < 1:
                raise DataError(f"{name}: must be ≥ 1, got {v}")
        self.splits = {s: _SplitWriter(directory, s, shard_rows, shard_tokens, group_tokens) for s in SPLITS}
        self._last_order = -1
        self.rows = self.tokens = self.docs = 0

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        order = table.column("order").to_numpy()
        if order[0] < self._last_order or (order.size > 1 and np.any(np.diff(order) < 0)):
            raise RuntimeError("prepare: rows arrived out of document order (engine bug: output would depend on "
                               "scheduling)")
        self._last_order = int(order[-1])
        held = table.column("held_out").to_numpy(zero_copy_only=False)
        for split, mask in (("train", ~held), ("validation", held)):
            if mask.any():
                self.splits[split].add(table.filter(pa.array(mask)))
        self.rows += table.num_rows
        self.tokens += int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py())
        self.docs += int(np.count_nonzero(table.column("chunk").to_numpy() == 0))

    def finish(self) -> dict:
        return {s: w.finish() for s, w in self.splits.items()}


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "meta.json").is_file())):
        raise DataError(f"{out}: exists and is not a raygpt dataset; refusing to overwrite it")


def replace_dir(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` is moved aside first and removed after the swap."""
    if not out.exists():
        new.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    new.rename(out)
    shutil.rmtree(old, ignore_errors=True)
