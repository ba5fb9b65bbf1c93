"""`raygpt prepare`: tokenise a corpus into Parquet shards (train/validation) for pretraining.

In this process for small inputs, on Ray Data (a pool of tokeniser actors) for large ones; both write the same
bytes. Pipeline, layout and memory bounds: jobs/data/ and docs/DATA.md.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from jobs.cli import JobSpec
from jobs.config import ConfigError, field
from jobs.data.corpus import DEFAULT_VALIDATION_FRACTION
from jobs.data.tokens import AUTO_RAY_BYTES, BLOCK_BYTES, ENGINES, GROUP_TOKENS, prepare, stderr_line


@dataclass
class PrepareJobConfig:
    """Tokenise a corpus into Parquet shards: DIR/{train,validation}-NNNNN.parquet + DIR/meta.json."""

    corpus: str = field("shakespeare", help="'shakespeare', 'pydoc', or paths/globs/URIs of .txt/.jsonl/.parquet "
                        "(comma-separated)")
    text_field: str = field("text", help="the text field of .jsonl lines / column of .parquet files")
    tokenizer: str = field("runs/tokenizer/tokenizer.json", help="tokenizer.json (from `raygpt tokenizer`)")
    out: str = field("data/shakespeare", help="output dataset directory (replaced atomically)")
    validation_fraction: float = field(DEFAULT_VALIDATION_FRACTION,
                                       help="share of documents held out (whole documents, by name hash)")
    row_tokens: int = field(2048, help="max tokens per Parquet row (documents are cut into chunks)")
    shard_rows: int = field(100_000, help="max rows per shard")
    shard_tokens: int = field(50_000_000, help="max tokens per shard")
    group_tokens: int = field(GROUP_TOKENS, help="tokens per Parquet row group (the reader's unit of IO and memory)")
    engine: str = field("auto", help=f"local (this process), ray (Ray Data actor pool), or auto: ray from "
                        f"{AUTO_RAY_BYTES >> 20} MiB of input files")
    workers: int = field(0, help="tokeniser actors for engine=ray (0: one per cluster CPU but one)")
    cpus_per_worker: float = field(1.0, help="CPUs reserved per tokeniser actor")
    block_mb: float = field(BLOCK_BYTES / 2**20, help="MiB of text per Ray Data block (bounds each worker's memory)")
    address: str | None = field(None, help="Ray cluster address for engine=ray (default: $RAY_ADDRESS, else embedded)")
    progress: bool = field(True, help="print a status line (docs, tokens, rates) to stderr every few seconds")

    def validate(self) -> None:
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"validation_fraction: must be in [0, 1), got {self.validation_fraction}")
        for name in ("row_tokens", "shard_rows", "shard_tokens", "group_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be ≥ 1, got {getattr(self, name)}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine: must be one of {list(ENGINES)}, got {self.engine!r}")
        if self.workers < 0 or self.cpus_per_worker <= 0 or self.block_mb <= 0:
            raise ConfigError("workers must be ≥ 0, cpus_per_worker and block_mb > 0")


def run(cfg: PrepareJobConfig) -> dict:
    meta = prepare(cfg.corpus, cfg.tokenizer, cfg.out, validation_fraction=cfg.validation_fraction,
                   row_tokens=cfg.row_tokens, shard_rows=cfg.shard_rows, shard_tokens=cfg.shard_tokens,
                   group_tokens=cfg.group_tokens, text_field=cfg.text_field, engine=cfg.engine, workers=cfg.workers,
                   cpus_per_worker=cfg.cpus_per_worker, block_bytes=int(cfg.block_mb * 2**20), address=cfg.address,
                   progress=stderr_line if cfg.progress else None)
    print(json.dumps({"out": cfg.out, **{s: {k: v for k, v in info.items() if k != "shards"}
                                         for s, info in meta["splits"].items()}}))
    return meta


JOB = JobSpec(PrepareJobConfig, run, "raygpt prepare")
main = JOB.main


if __name__ == "__main__":
    sys.exit(main())
