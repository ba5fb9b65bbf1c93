"""`raygpt prepare`: tokenise a corpus into Parquet shards (train/validation) for pretraining.

Layout and schema: see jobs/data/ and docs/DATA.md.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from jobs.cli import JobSpec
from jobs.config import ConfigError, field
from jobs.data.corpus import DEFAULT_VALIDATION_FRACTION
from jobs.data.tokens import prepare


@dataclass
class PrepareJobConfig:
    """Tokenise a corpus into Parquet shards: DIR/{train,validation}-NNNNN.parquet + DIR/meta.json."""

    corpus: str = field("shakespeare", help="'shakespeare', 'pydoc', or paths/globs of .txt/.parquet (comma-separated)")
    tokenizer: str = field("runs/tokenizer/tokenizer.json", help="tokenizer.json (from `raygpt tokenizer`)")
    out: str = field("data/shakespeare", help="output dataset directory (replaced atomically)")
    validation_fraction: float = field(DEFAULT_VALIDATION_FRACTION,
                                       help="share of documents held out (whole documents, by name hash)")
    row_tokens: int = field(2048, help="max tokens per Parquet row (documents are cut into chunks)")
    shard_rows: int = field(100_000, help="max rows per shard")
    shard_tokens: int = field(50_000_000, help="max tokens per shard")

    def validate(self) -> None:
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"validation_fraction: must be in [0, 1), got {self.validation_fraction}")
        for name in ("row_tokens", "shard_rows", "shard_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be ≥ 1, got {getattr(self, name)}")


def run(cfg: PrepareJobConfig) -> dict:
    meta = prepare(cfg.corpus, cfg.tokenizer, cfg.out, validation_fraction=cfg.validation_fraction,
                   row_tokens=cfg.row_tokens, shard_rows=cfg.shard_rows, shard_tokens=cfg.shard_tokens)
    print(json.dumps({"out": cfg.out, **{s: {k: v for k, v in info.items() if k != "shards"}
                                         for s, info in meta["splits"].items()}}))
    return meta


JOB = JobSpec(PrepareJobConfig, run, "raygpt prepare")
main = JOB.main


if __name__ == "__main__":
    sys.exit(main())
