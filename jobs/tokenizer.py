"""`raygpt tokenizer`: train a byte-level BPE tokenizer (GPT-2 style, see models/tokenizer.py) on a corpus and
write it as `tokenizer.json`.

The vocabulary is learned on the held-in (train) documents only when `held_in_only` is set, so validation text
stays unseen; by default on the whole corpus like GPT-2 (tokenizer statistics leak almost nothing).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from jobs.cli import JobSpec
from jobs.config import ConfigError, field
from jobs.data.corpus import DEFAULT_VALIDATION_FRACTION
from jobs.data.vocabulary import train_tokenizer


@dataclass
class TokenizerJobConfig:
    """Train a byte-level BPE tokenizer on a corpus and save it as tokenizer.json."""

    corpus: str = field("shakespeare", help="'shakespeare', 'pydoc', or paths/globs/URIs of .txt/.jsonl/.parquet "
                        "(comma-separated)")
    text_field: str = field("text", help="the text field of .jsonl lines / column of .parquet files")
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
    stats = train_tokenizer(cfg.corpus, cfg.vocab_size, cfg.out, cfg.min_frequency, cfg.held_in_only,
                            cfg.validation_fraction, cfg.text_field)
    print(json.dumps(stats))
    return stats


JOB = JobSpec(TokenizerJobConfig, run, "raygpt tokenizer")
main = JOB.main


if __name__ == "__main__":
    sys.exit(main())
