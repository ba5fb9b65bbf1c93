"""`raygpt tokenizer`: train a byte-level BPE tokenizer (GPT-2 style, see models/tokenizer.py) on a corpus and
write it as `tokenizer.json`.

The vocabulary is learned on the held-in (train) documents only when `held_in_only` is set, so validation text
stays unseen; by default on the whole corpus like GPT-2 (tokenizer statistics leak almost nothing).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from jobs.cli import JobSpec
from jobs.config import ConfigError, field
from jobs.data.corpus import DEFAULT_VALIDATION_FRACTION, load_documents, split_documents


@dataclass
class TokenizerJobConfig:
    """Train a byte-level BPE tokenizer on a corpus and save it as tokenizer.json."""

    corpus: str = field("shakespeare", help="'shakespeare', 'pydoc', or paths/globs of .txt/.parquet (comma-separated)")
    vocab_size: int = field(4096, help="vocabulary size incl. <|endoftext|> (id 0) and the 256 byte tokens")
    min_frequency: int = field(2, help="a pair must occur at least this often to be merged")
    held_in_only: bool = field(False, help="learn merges from the held-in (train) documents only")
    validation_fraction: float = field(DEFAULT_VALIDATION_FRACTION,
                                       help="held-out share of documents (used with held_in_only)")
    out: str = field("runs/tokenizer/tokenizer.json", help="where to write tokenizer.json")

    def validate(self) -> None:
        if self.vocab_size < 257:
            raise ConfigError(f"vocab_size: must be ≥ 257 (1 special + 256 bytes), got {self.vocab_size}")
        if self.min_frequency < 1:
            raise ConfigError(f"min_frequency: must be ≥ 1, got {self.min_frequency}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"validation_fraction: must be in [0, 1), got {self.validation_fraction}")


def run(cfg: TokenizerJobConfig) -> dict:
    from models.tokenizer import Tokenizer

    docs = load_documents(cfg.corpus)
    if cfg.held_in_only:
        docs = split_documents(docs, cfg.validation_fraction)["train"]
    t0 = time.perf_counter()
    tok = Tokenizer.train((d.text for d in docs), vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency)
    seconds = time.perf_counter() - t0
    path = tok.save(cfg.out)
    n_tokens = sum(len(ids) for ids in tok.encode_batch([d.text for d in docs]))
    n_bytes = sum(len(d.text.encode()) for d in docs)
    stats = {"tokenizer": str(path), "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "docs": len(docs),
             "bytes": n_bytes, "tokens": n_tokens, "bytes_per_token": round(n_bytes / max(n_tokens, 1), 3),
             "train_seconds": round(seconds, 2)}
    print(json.dumps(stats))
    return stats


JOB = JobSpec(TokenizerJobConfig, run, "raygpt tokenizer")
main = JOB.main


if __name__ == "__main__":
    sys.exit(main())
