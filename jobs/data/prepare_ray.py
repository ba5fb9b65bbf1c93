"""`raygpt prepare` on Ray Data: the corpus read by tasks, tokenised by a pool of actors, written in order.

Pipeline (docs/DATA.md, "Pipeline"):
1. Names pass (Ray tasks, one per input file): each file's documents are read (streamed) and only the 8-byte
   key of SHA-256(name) of each is returned. The driver turns the n keys into the held-out threshold
   (`corpus.HoldOut`: the same documents as `split_documents` would hold out, without ranking names globally).
2. Read stage (Ray tasks, one per input file): documents are streamed out in blocks of ≤ `block_bytes` of text,
   each tagged with its split (the threshold) and its corpus position (file index, ordinal in the file).
3. Tokenise stage (`map_batches` with a class: an actor pool of `workers`, each loading the tokenizer once):
   a block of documents → rows (ids + EOS cut at row_tokens), an Arrow table of about 5 bytes per token.
4. The driver iterates the output with `preserve_order` (blocks come back in corpus order whatever the number of
   workers) and hands it to the one `DatasetWriter`, which decides every row group and shard boundary from the
   row stream alone, so the files are byte-identical for any number of workers (and to the in-process engine).

Memory: a read task holds one block of text plus `MAX_DOC_CHARS` (or one Parquet record batch); an actor one
block of text and its tokens; the driver one Ray block and one row group per split; blocks in flight are capped
by Ray Data's object-store budget (max(128 MiB, 4 · workers · block)); at most ⌈workers / 16⌉ read tasks run at
once (each Ray worker process costs ~150 MB of RSS before it reads a byte). None of it grows with the corpus;
the driver also holds the n name keys (8 bytes per document) during the names pass.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.data.corpus import DataError, Document, HoldOut, load_documents, name_key
from jobs.data.shards import order_key, tokenize_table
from jobs.data.sources import InputFile, list_inputs, read_documents
import ray.data
import ray
from ray.data import ActorPoolStrategy
from ray.data import TaskPoolStrategy
from tokenizers import Tokenizer as HFTokenizer
from models.tokenizer import Tokenizer

READ_CPUS = 0.25  # per read task: reading and hashing are light next to tokenising
# Concurrent read tasks: one reader (≥ 100 MB/s of decoding and hashing) feeds ~16 tokeniser actors (~1 MB/s each).
# Capping them keeps the number of Ray worker processes — ~150 MB of RSS each — from growing with free CPUs.
ACTORS_PER_READER = 16


def _files_of(batch: dict[str, np.ndarray]) -> Iterator[tuple[int, InputFile]]:
    for i, name, path, kind, size in zip(batch["index"], batch["name"], batch["path"], batch["kind"], batch["size"]):
        yield int(i), InputFile(str(name), str(path), str(kind), int(size))


def _keys_of_files(batch: dict[str, np.ndarray], text_field: str) -> dict[str, np.ndarray]:
    keys = [name_key(d.name) for _, f in _files_of(batch) for d in read_documents(f, text_field)]
    return {"key": np.array(keys, dtype=np.uint64)}


def _names_with_keys(batch: dict[str, np.ndarray], text_field: str, keys: set[int]) -> dict[str, np.ndarray]:
    names = [d.name for _, f in _files_of(batch) for d in read_documents(f, text_field) if name_key(d.name) in keys]
    return {"name": np.array(names, dtype=object)}


def _doc_block(docs: list[tuple[Document, int]], rule: HoldOut) -> dict[str, Any]:
    return {"name": [d.name for d, _ in docs], "text": [d.text for d, _ in docs],
            "held_out": np.array([rule.held_out(d.name) for d, _ in docs], dtype=bool),
            "order": np.array([o for _, o in docs], dtype=np.int64)}


def _read_files(batch: dict[str, np.ndarray], text_field: str, rule: HoldOut, block_bytes: int
                ) -> Iterator[dict[str, Any]]:
    """Documents of the batch's files as blocks of ≤ block_bytes of text (a bigger document is a block alone)."""
    for index, f in _files_of(batch):
        block: list[tuple[Document, int]] = []
        size = 0
        for ordinal, d in enumerate(read_documents(f, text_field)):
            if block and size + len(d.text) > block_bytes:
                yield _doc_block(block, rule)
                block, size = [], 0
            block.append((d, order_key(index, ordinal)))
            size += len(d.text)
        if block:
            yield _doc_block(block, rule)


class Tokenize:
    """Actor UDF: loads the tokenizer once (from its JSON, so no node needs the file) and turns document blocks
    into row tables."""

    def __init__(self, tokenizer_json: str, sha256: str, row_tokens: int) -> None:


        self.tok = Tokenizer(HFTokenizer.from_str(tokenizer_json), source="<prepare>")
        if self.tok.sha256() != sha256:  # the JSON round trip must not change the vocabulary
            raise DataError(f"tokenizer: sha256 {self.tok.sha256()} in the actor differs from the driver's {sha256}")
        self.row_tokens = row_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        return tokenize_table(self.tok, batch, self.row_tokens)


def _quiet_data_context(block_bytes: int, inflight_bytes: int) -> Any:
    """A copy of the current DataContext without progress bars and per-execution log lines (raygpt prints one
    line per update), order-preserving, with our block size and in-flight budget."""

    ctx = ray.data.DataContext.get_current().copy()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    ctx.verbose_stats_logs = False
    ctx.execution_options.preserve_order = True
    ctx.execution_options.verbose_progress = False
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=inflight_bytes)
    ctx.target_max_block_size = block_bytes
    return ctx


def ray_row_tables(source: str, tokenizer: Any, validation_fraction: float, row_tokens: int, text_field: str,
                   workers: int, cpus_per_worker: float, block_bytes: int,
                   status: Callable[[str], None] = lambda _: None) -> Iterator[pa.Table]:
    """Ordered row tables of `source` (see the module docstring); Ray must be initialised."""

    if workers < 1:
        raise DataError(f"workers: must be ≥ 1, got {workers}")
    cpus = ray.cluster_resources().get("CPU", 0)
    if workers * cpus_per_worker + READ_CPUS > cpus:
        raise DataError(f"workers: {workers} tokeniser actors × {cpus_per_worker} CPU + {READ_CPUS} CPU for reading "
                        f"do not fit the cluster's {cpus:g} CPUs; lower workers or cpus_per_worker")
    ctx = _quiet_data_context(block_bytes, max(128 << 20, 4 * workers * block_bytes))
    log = logging.getLogger("ray.data")
    level = log.level
    log.setLevel(logging.ERROR)  # e.g. "progress bars disabled": a warning per process
    try:
        with ray.data.DataContext.current(ctx):
            yield from _row_tables(source, tokenizer, validation_fraction, row_tokens, text_field, workers,
                                   cpus_per_worker, block_bytes, status)
    finally:
        log.setLevel(level)


def _row_tables(source: str, tokenizer: Any, validation_fraction: float, row_tokens: int, text_field: str,
                workers: int, cpus_per_worker: float, block_bytes: int, status: Callable[[str], None]
                ) -> Iterator[pa.Table]:

    readers = TaskPoolStrategy(size=-(-workers // ACTORS_PER_READER))
    if source in ("shakespeare", "pydoc"):  # built-in corpora are small: read on the driver
        docs = load_documents(source)
        rule = HoldOut.from_keys(np.array([name_key(d.name) for d in docs], dtype=np.uint64), validation_fraction,
                                 lambda ks: [d.name for d in docs if name_key(d.name) in ks])
        blocks, cur, size = [], [], 0
        for i, d in enumerate(docs):
            if cur and size + len(d.text) > block_bytes:
                blocks.append(_doc_block(cur, rule))
                cur, size = [], 0
            cur.append((d, order_key(0, i)))
            size += len(d.text)
        blocks.append(_doc_block(cur, rule))
        ds = ray.data.from_arrow([pa.table(b) for b in blocks])
    else:
        files = list_inputs(source)
        table = pa.table({"index": list(range(len(files))), "name": [f.name for f in files],
                          "path": [f.path for f in files], "kind": [f.kind for f in files],
                          "size": [f.size for f in files]})
        listing = ray.data.from_arrow([table.slice(i, 1) for i in range(len(files))])  # one file per block
        status(f"prepare: names pass over {len(files):,} files ({sum(f.size for f in files) / 1e6:,.1f} MB)")
        keys = [b["key"] for b in listing.map_batches(
            _keys_of_files, batch_size=1, batch_format="numpy", fn_kwargs={"text_field": text_field},
            num_cpus=READ_CPUS, compute=readers).iter_batches(batch_size=None, batch_format="numpy")]
        all_keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        if not all_keys.size:
            raise DataError(f"corpus {source!r}: empty (no non-empty documents)")

        def names_with(ks: set[int]) -> list[str]:
            out = listing.map_batches(_names_with_keys, batch_size=1, batch_format="numpy", num_cpus=READ_CPUS,
                                      compute=readers,
                                      fn_kwargs={"text_field": text_field, "keys": ks})
            return [str(n) for b in out.iter_batches(batch_size=None, batch_format="numpy") for n in b["name"]]

        try:
            rule = HoldOut.from_keys(all_keys, validation_fraction, names_with)
        except DataError as e:
            raise DataError(f"corpus {source!r}: {e}") from None
        status(f"prepare: {all_keys.size:,} documents; tokenising with {workers} actor(s)")
        ds = listing.map_batches(_read_files, batch_size=1, batch_format="numpy", num_cpus=READ_CPUS, compute=readers,
                                 fn_kwargs={"text_field": text_field, "rule": rule, "block_bytes": block_bytes})
    # max_restarts=0: a dead actor fails the run (re-running prepare is deterministic) instead of being restarted
    # from constructor arguments that may have left the object store (ray #53727).
    with warnings.catch_warnings():  # max_restarts goes through **ray_remote_args, deprecated in Ray 2.60
        warnings.simplefilter("ignore", DeprecationWarning)
        out = ds.map_batches(Tokenize, fn_constructor_args=(tokenizer.to_str(), tokenizer.sha256(), row_tokens),
                             batch_size=None, batch_format="pyarrow", compute=ActorPoolStrategy(size=workers),
                             num_cpus=cpus_per_worker, max_restarts=0)
    yield from out.iter_batches(batch_size=None, batch_format="pyarrow")
