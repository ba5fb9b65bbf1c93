"""Parquet token shards (`prepare`) and the pretraining reader (`TokenDataset`).

Dataset layout written by `prepare(…, out)` (schema version `raygpt-tokens/1`, see docs/DATA.md):

    out/meta.json                 {"format", "tokenizer": {"path", "sha256"}, "vocab_size", "eos_id", "corpus",
                                   "validation_fraction", "row_tokens",
                                   "splits": {"train"|"validation": {"docs", "rows", "tokens",
                                              "shards": [{"file", "rows", "tokens"}]}}}
    out/train-00000.parquet …     one row per document chunk:
    out/validation-00000.parquet    input_ids: list<int32>  token ids; EOS appended to the document's last chunk
                                    doc: string             document name
                                    chunk: int32            chunk index within the document (0, 1, …)

Concatenating a document's chunks in order and decoding gives its text + `<|endoftext|>`. Rows are in
document order within a split, so the concatenation of all rows of a split is the token stream.

`TokenDataset(dir, split, rank, world_size)` reads only the shards that overlap the rank's contiguous row range
and serves fixed-length blocks of `block_size + 1` tokens (inputs + shifted targets) addressed by
(seed, epoch, position), so a run resumes exactly at a data position; see its docstring.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.data.corpus import DEFAULT_VALIDATION_FRACTION, SPLITS, DataError, load_documents, split_documents
from models.tokenizer import Tokenizer, TokenizerError

FORMAT = "raygpt-tokens/1"
SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("doc", pa.string()), ("chunk", pa.int32())])


# --- prepare: documents → Parquet shards ----------------------------------------------------------------------
def prepare(source: str, tokenizer_path: str | os.PathLike[str], out: str | os.PathLike[str],
            validation_fraction: float = DEFAULT_VALIDATION_FRACTION, row_tokens: int = 2048,
            shard_rows: int = 100_000, shard_tokens: int = 50_000_000) -> dict:
    """Tokenise `source` with `tokenizer_path` into Parquet shards under `out`; returns the meta dict.

    Documents are cut into rows of at most `row_tokens` tokens (EOS appended to each document); a shard is closed
    when it reaches `shard_rows` rows or `shard_tokens` tokens. Everything is written into a temporary sibling
    directory that replaces `out` only when complete, so `out` is never half-written. An existing `out` is
    replaced only if it is a dataset (has meta.json) or empty."""

    for name, v in (("row_tokens", row_tokens), ("shard_rows", shard_rows), ("shard_tokens", shard_tokens)):
        if v < 1:
            raise DataError(f"{name}: must be ≥ 1, got {v}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "meta.json").is_file())):
        raise DataError(f"{out}: exists and is not a raygpt dataset; refusing to overwrite it")
    try:
        tok = Tokenizer.from_file(tokenizer_path)
    except TokenizerError as e:
        raise DataError(str(e)) from None
    splits = split_documents(load_documents(source), validation_fraction)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # (not mkdtemp: that would make the final directory mode 0700)
    try:
        meta_splits = {}
        for split in SPLITS:
            docs = splits[split]
            shards: list[dict] = []
            rows: list[tuple[np.ndarray, str, int]] = []
            pending = n_tokens = 0
            for doc, ids in zip(docs, tok.encode_batch([d.text for d in docs])):
                arr = np.asarray([*ids, tok.eos_id], dtype=np.int32)
                for c, start in enumerate(range(0, len(arr), row_tokens)):
                    rows.append((arr[start:start + row_tokens], doc.name, c))
                    pending += len(rows[-1][0])
                    if len(rows) >= shard_rows or pending >= shard_tokens:
                        shards.append(_write_shard(tmp / f"{split}-{len(shards):05d}.parquet", rows))
                        n_tokens += pending
                        rows, pending = [], 0
            if rows:
                shards.append(_write_shard(tmp / f"{split}-{len(shards):05d}.parquet", rows))
                n_tokens += pending
            meta_splits[split] = {"docs": len(docs), "rows": sum(s["rows"] for s in shards), "tokens": n_tokens,
                                  "shards": shards}
        meta = {"format": FORMAT, "tokenizer": {"path": str(tokenizer_path), "sha256": tok.sha256()},
                "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "corpus": source,
                "validation_fraction": validation_fraction, "row_tokens": row_tokens, "splits": meta_splits}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _write_shard(path: Path, rows: list[tuple[np.ndarray, str, int]]) -> dict:
    offsets = np.cumsum([0] + [len(r[0]) for r in rows]).astype(np.int32)
    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate([r[0] for r in rows])))
    table = pa.Table.from_arrays(
        [ids, pa.array([r[1] for r in rows], pa.string()), pa.array([r[2] for r in rows], pa.int32())],
        schema=SCHEMA)
    pq.write_table(table, path)
    return {"file": path.name, "rows": len(rows), "tokens": int(offsets[-1])}


def _replace_dir(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` is moved aside first and removed after the swap."""
    if not out.exists():
        new.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    new.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# --- reading: shards → training blocks ---------------------------------------------------------------------
def read_meta(directory: str | os.PathLike[str]) -> dict:
    """meta.json of a prepared dataset, validated; DataError naming the file otherwise."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"{d}: dataset directory does not exist (run `raygpt prepare`)")
    p = d / "meta.json"
    if not p.is_file():
        raise DataError(f"{p}: missing; {d} is not a prepared dataset (run `raygpt prepare`)")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{p}: format is {meta.get('format') if isinstance(meta, dict) else None!r}, "
                        f"expected {FORMAT!r}")
    for key in ("vocab_size", "eos_id", "splits"):
        if key not in meta:
            raise DataError(f"{p}: missing key {key!r}")
    return meta


class TokenDataset:
    """One split of a prepared dataset, as seen by data-parallel rank `rank` of `world_size`.

    Sharding: the split's rows (in shard order) are cut into `world_size` contiguous, near-equal row ranges;
    rank r reads only the shards overlapping its range and keeps its rows. Ranges are disjoint and cover all rows.

    Tokens: the rank's rows concatenated into one int32 array `tokens` (documents separated by EOS).

    Blocks (`block_size` given): block b = tokens[b·block_size : b·block_size + block_size + 1] for
    b < n_blocks = (len(tokens) − 1) // block_size — inputs are the first block_size tokens, targets the last
    block_size. The stream of blocks is epoch after epoch, each epoch a permutation of all blocks drawn from
    numpy's PCG64 seeded with (seed, epoch, rank) (identity order if shuffle=False). Global position p is block
    perm_{p // n_blocks}[p % n_blocks]; `batch_at(step, batch_size)` holds positions step·batch_size + [0, batch_size).
    Everything is a pure function of (seed, position): resume a run by calling `batch_at` from the saved step.
    """

    def __init__(self, directory: str | os.PathLike[str], split: str = "train", rank: int = 0, world_size: int = 1,
                 block_size: int | None = None, seed: int = 0, shuffle: bool = True) -> None:
        if split not in SPLITS:
            raise ValueError(f"split: must be one of {list(SPLITS)}, got {split!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank/world_size: need 0 ≤ rank < world_size, got rank={rank}, world_size={world_size}")
        self.dir = Path(directory)
        self.meta = read_meta(self.dir)
        self.split, self.rank, self.world_size = split, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        info = self.meta["splits"].get(split)
        if not info or not info.get("shards"):
            raise DataError(f"{self.dir / 'meta.json'}: split {split!r} has no shards")
        self.shards: list[dict] = info["shards"]
        total = sum(s["rows"] for s in self.shards)
        lo, hi = rank * total // world_size, (rank + 1) * total // world_size
        if hi <= lo:
            raise DataError(f"{self.dir}: split {split!r} has {total} rows, too few for {world_size} ranks")
        self.row_range = (lo, hi)

        pieces: list[np.ndarray] = []
        docs: list[str] = []
        start = 0
        for s in self.shards:
            a, b = max(lo, start), min(hi, start + s["rows"])
            if a < b:  # this shard overlaps the rank's rows
                path = self.dir / s["file"]
                if not path.is_file():
                    raise DataError(f"{path}: shard listed in meta.json is missing")
                names = pq.read_schema(path).names
                for col in ("input_ids", "doc"):
                    if col not in names:
                        raise DataError(f"{path}: missing column {col!r} (columns: {', '.join(names)})")
                table = pq.read_table(path, columns=["input_ids", "doc"]).slice(a - start, b - a)
                ids = table.column("input_ids").combine_chunks()
                pieces.append(ids.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False))
                docs.extend(table.column("doc").to_pylist())
            start += s["rows"]
        self.tokens: np.ndarray = np.concatenate(pieces)
        self.docs = docs  # document name of each of this rank's rows
        if self.tokens.size and (self.tokens.min() < 0 or self.tokens.max() >= self.meta["vocab_size"]):
            raise DataError(f"{self.dir}: token ids outside [0, {self.meta['vocab_size']})")

        self.block_size = block_size
        self._perm_cache: dict[int, np.ndarray] = {}
        if block_size is not None:
            if block_size < 1:
                raise ValueError(f"block_size: must be ≥ 1, got {block_size}")
            if len(self.tokens) < block_size + 1:
                raise DataError(f"{self.dir}: rank {rank} of split {split!r} has {len(self.tokens)} tokens, fewer "
                                f"than one block of block_size+1 = {block_size + 1}")

    @property
    def n_blocks(self) -> int:
        """Blocks per epoch."""
        self._need_blocks()
        return (len(self.tokens) - 1) // self.block_size

    def _need_blocks(self) -> None:
        if self.block_size is None:
            raise ValueError("TokenDataset: block_size was not given")

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch, self.rank])))
                perm = rng.permutation(self.n_blocks)
            else:
                perm = np.arange(self.n_blocks)
            self._perm_cache = {epoch: perm}  # only the current epoch is kept
        return self._perm_cache[epoch]

    def block_start(self, position: int) -> int:
        """Token offset of the block at global stream position `position` (≥ 0)."""
        n = self.n_blocks
        if position < 0:
            raise ValueError(f"position: must be ≥ 0, got {position}")
        return int(self._perm(position // n)[position % n]) * self.block_size

    def block(self, position: int) -> np.ndarray:
        """The (block_size + 1,) int32 block at global stream position `position`: tokens[start : start+bs+1]."""
        start = self.block_start(position)
        return self.tokens[start: start + self.block_size + 1]

    def epoch_of(self, position: int) -> int:
        return position // self.n_blocks

    def batch_at(self, step: int, batch_size: int) -> np.ndarray:
        """(batch_size, block_size + 1) int32: the blocks at positions step·batch_size + [0, batch_size)."""
        return np.stack([self.block(step * batch_size + i) for i in range(batch_size)])

    def iter_batches(self, batch_size: int, start_step: int = 0) -> Iterator[np.ndarray]:
        """batch_at(start_step), batch_at(start_step + 1), … (endless; stop by step count)."""
        step = start_step
        while True:
            yield self.batch_at(step, batch_size)
            step += 1

    def __len__(self) -> int:
        return len(self.tokens)
