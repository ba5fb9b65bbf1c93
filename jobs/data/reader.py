"""The pretraining reader: a rank's share of a prepared split, streamed from Parquet row groups.

`TokenDataset(dir, split, rank, world_size, block_size, seed)` never loads the rank's token array. At open it
builds an index of the row groups overlapping the rank's rows — from meta.json's per-shard `group_rows` /
`group_tokens` (written by `prepare`; datasets prepared before the index existed are indexed from the files, one
row group at a time) — and afterwards decodes a row group only when a block needs it, keeping the last
`cache_groups` decoded groups. Memory: O(cache_groups · group_tokens) for tokens + O(row groups) for the index
+ 8 bytes per block for the current epoch's permutation.

The data order is unchanged by streaming: blocks are addressed by their offset in the rank's token stream, and
the stream position → block map is the same pure function of (seed, epoch, rank) as when the reader held the
whole array in memory (models.seeding.permutation), so resume is exact mid-epoch.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.data.corpus import SPLITS, DataError
from jobs.data.shards import FORMAT
from models.seeding import permutation
from models.tokenizer import Tokenizer
from models.tokenizer import TokenizerError


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


@dataclass(frozen=True)
class _Piece:
    """The part of one row group that belongs to the rank: rows [row_a, row_b) = tokens [tok_a, tok_b) of it."""

    shard: int
    group: int
    row_a: int
    row_b: int
    tok_a: int
    tok_b: int


class TokenDataset:
    """One split of a prepared dataset, as seen by data-parallel rank `rank` of `world_size`.

    Sharding: the split's rows (in shard order) are cut into `world_size` contiguous, near-equal row ranges
    (`row_range`); ranges are disjoint and cover all rows. The rank's token stream is its rows concatenated
    (documents separated by EOS); `read(a, b)` returns tokens [a, b) of it, `len()` its length.

    Blocks (`block_size` given): block b = stream[b·block_size : b·block_size + block_size + 1] for
    b < n_blocks = (len − 1) // block_size — inputs are the first block_size tokens, targets the last
    block_size. The stream of blocks is epoch after epoch, each epoch a permutation of all blocks keyed by
    (seed, epoch, rank) (models.seeding.permutation; identity order if shuffle=False). Global position p is block
    perm_{p // n_blocks}[p % n_blocks]; `batch_at(step, batch_size)` holds positions step·batch_size + [0, batch_size).
    Everything is a pure function of (seed, position): resume a run by calling `batch_at` from the saved step.
    """

    def __init__(self, directory: str | os.PathLike[str], split: str = "train", rank: int = 0, world_size: int = 1,
                 block_size: int | None = None, seed: int = 0, shuffle: bool = True, cache_groups: int = 8) -> None:
        if split not in SPLITS:
            raise ValueError(f"split: must be one of {list(SPLITS)}, got {split!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank/world_size: need 0 ≤ rank < world_size, got rank={rank}, world_size={world_size}")
        if cache_groups < 1:
            raise ValueError(f"cache_groups: must be ≥ 1, got {cache_groups}")
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
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_groups = cache_groups
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._pieces = self._index(lo, hi)
        self._starts = np.cumsum([0] + [p.tok_b - p.tok_a for p in self._pieces]).astype(np.int64)

        self.block_size = block_size
        if block_size is not None:
            if block_size < 1:
                raise ValueError(f"block_size: must be ≥ 1, got {block_size}")
            if len(self) < block_size + 1:
                raise DataError(f"{self.dir}: rank {rank} of {world_size} has {len(self)} tokens of split {split!r}, "
                                f"fewer than one sequence (block_size + 1 = {block_size + 1}); use a shorter "
                                "sequence, fewer data-parallel ranks or a bigger corpus")

    # --- index and row-group reads ---------------------------------------------------------------------------
    def _path(self, shard: int) -> Path:
        return self.dir / self.shards[shard]["file"]

    def _file(self, shard: int) -> pq.ParquetFile:
        """An open shard (the last 8 are kept open: a footer parse per reopen, not per read)."""
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        path = self._path(shard)
        if not path.is_file():
            raise DataError(f"{path}: shard listed in meta.json is missing")
        try:
            pf = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        names = pf.schema_arrow.names
        for col in ("input_ids", "doc"):
            if col not in names:
                raise DataError(f"{path}: missing column {col!r} (columns: {', '.join(names)})")
        self._files[shard] = pf
        if len(self._files) > 8:
            self._files.popitem(last=False)
        return pf

    def _lengths(self, shard: int, group: int) -> np.ndarray:
        ids = self._file(shard).read_row_group(group, columns=["input_ids"]).column(0).combine_chunks()
        return np.diff(ids.offsets.to_numpy()).astype(np.int64)

    def _index(self, lo: int, hi: int) -> list[_Piece]:
        pieces: list[_Piece] = []
        start = 0
        for si, s in enumerate(self.shards):
            if start >= hi:
                break
            if start + s["rows"] > lo:  # this shard overlaps the rank's rows
                md = self._file(si).metadata
                file_rows = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
                rows = s.get("group_rows", file_rows)
                if rows != file_rows or sum(rows) != s["rows"]:
                    raise DataError(f"{self._path(si)}: row groups hold {file_rows} rows, meta.json says "
                                    f"{rows} (total {s['rows']}); the dataset was modified after `prepare`")
                tokens = s.get("group_tokens") or [int(self._lengths(si, g).sum()) for g in range(len(rows))]
                g_start = start
                for g, (n, t) in enumerate(zip(rows, tokens)):
                    a, b = max(lo - g_start, 0), min(hi - g_start, n)
                    if a < b:
                        if (a, b) == (0, n):
                            ta, tb = 0, t
                        else:  # the rank's range starts/ends inside this group
                            cum = np.concatenate([[0], np.cumsum(self._lengths(si, g))])
                            ta, tb = int(cum[a]), int(cum[b])
                        pieces.append(_Piece(si, g, a, b, ta, tb))
                    g_start += n
            start += s["rows"]
        return pieces

    def _piece_tokens(self, i: int) -> np.ndarray:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        p = self._pieces[i]
        ids = self._file(p.shard).read_row_group(p.group, columns=["input_ids"]).column(0).combine_chunks()
        flat = ids.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        expected = self.shards[p.shard].get("group_tokens")
        if expected is not None and flat.size != expected[p.group]:
            raise DataError(f"{self._path(p.shard)}: row group {p.group} holds {flat.size} tokens, meta.json says "
                            f"{expected[p.group]}")
        if flat.size and (flat.min() < 0 or flat.max() >= self.meta["vocab_size"]):
            raise DataError(f"{self._path(p.shard)}: row group {p.group} has token ids outside "
                            f"[0, {self.meta['vocab_size']})")
        out = flat[p.tok_a:p.tok_b].copy() if (p.tok_a, p.tok_b) != (0, flat.size) else flat
        self._cache[i] = out
        if len(self._cache) > self._cache_groups:
            self._cache.popitem(last=False)
        return out

    def read(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of the rank's stream as an int32 array (decodes only the row groups it spans)."""
        if not 0 <= a <= b <= len(self):
            raise IndexError(f"token range [{a}, {b}) outside [0, {len(self)})")
        out = np.empty(b - a, dtype=np.int32)
        i = int(np.searchsorted(self._starts, a, side="right")) - 1
        pos = a
        while pos < b:
            piece = self._piece_tokens(i)
            lo = pos - int(self._starts[i])
            take = min(b - pos, piece.size - lo)
            out[pos - a:pos - a + take] = piece[lo:lo + take]
            pos += take
            i += 1
        return out

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def tokens(self) -> np.ndarray:
        """The rank's whole token stream, materialised (O(len) memory: tests and small data only)."""
        return self.read(0, len(self))

    @property
    def docs(self) -> list[str]:
        """Document name of each of the rank's rows (read from the files; O(rows) memory)."""
        out: list[str] = []
        for p in self._pieces:
            col = self._file(p.shard).read_row_group(p.group, columns=["doc"]).column(0)
            out.extend(col.slice(p.row_a, p.row_b - p.row_a).to_pylist())
        return out

    # --- blocks ------------------------------------------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        """Blocks per epoch."""
        self._need_blocks()
        return (len(self) - 1) // self.block_size  # type: ignore[operator]

    def _need_blocks(self) -> None:
        if self.block_size is None:
            raise ValueError("TokenDataset: block_size was not given")

    def _perm(self, epoch: int) -> np.ndarray:
        if self.shuffle:
            return permutation(self.n_blocks, self.seed, epoch, self.rank)
        return np.arange(self.n_blocks)

    def block_start(self, position: int) -> int:
        """Token offset of the block at global stream position `position` (≥ 0)."""
        n = self.n_blocks
        if position < 0:
            raise ValueError(f"position: must be ≥ 0, got {position}")
        return int(self._perm(position // n)[position % n]) * self.block_size  # type: ignore[operator]

    def block(self, position: int) -> np.ndarray:
        """The (block_size + 1,) int32 block at global stream position `position`: stream[start : start+bs+1]."""
        start = self.block_start(position)
        return self.read(start, start + self.block_size + 1)  # type: ignore[operator]

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


def check_dataset(directory: str | os.PathLike[str], tokenizer: str | os.PathLike[str] | None = None,
                  block_size: int | None = None, world_size: int = 1, splits: Sequence[str] = SPLITS) -> dict:
    """Every check a training job can make before its workers start; returns meta.json. DataError naming the
    file if: meta.json or a shard is missing/unreadable or lacks a column; the tokenizer file's hash differs
    from the one the dataset was prepared with; a rank would get fewer tokens than one sequence
    (`block_size` + 1) of a split. Opens only Parquet footers and the row groups at rank boundaries."""
    meta = read_meta(directory)
    if tokenizer is not None:

        try:
            sha = Tokenizer.from_file(tokenizer).sha256()
        except TokenizerError as e:
            raise DataError(str(e)) from None
        want = meta.get("tokenizer", {}).get("sha256")
        if want is not None and sha != want:
            raise DataError(f"{tokenizer}: tokenizer sha256 {sha[:12]}… differs from the one {directory} was "
                            f"prepared with ({meta['tokenizer'].get('path')}, {want[:12]}… in meta.json); "
                            "re-run `raygpt prepare` with this tokenizer or use that one")
    for split in splits:
        for rank in range(world_size):
            TokenDataset(directory, split, rank, world_size, block_size=block_size)
    return meta
