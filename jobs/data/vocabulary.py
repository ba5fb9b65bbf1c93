"""Training the byte-level BPE tokenizer (GPT-2 §2.2, models/tokenizer.py) on a corpus: what `raygpt tokenizer`
runs, and what `raygpt pretrain --set data.prepare=true` runs when the tokenizer is missing."""

from __future__ import annotations

import time
from typing import Any

from jobs.data.corpus import DEFAULT_VALIDATION_FRACTION, load_documents, split_documents
from models.tokenizer import Tokenizer


def train_tokenizer(corpus: str, vocab_size: int, out: str, min_frequency: int = 2, held_in_only: bool = False,
                    validation_fraction: float = DEFAULT_VALIDATION_FRACTION, text_field: str = "text"
                    ) -> dict[str, Any]:
    """Learn merges on `corpus` (held-in documents only if `held_in_only`), save `out`; returns statistics.
    `text_field`: the field of .jsonl lines / column of .parquet files holding the text."""
    docs = load_documents(corpus, text_field)
    if held_in_only:
        docs = split_documents(docs, validation_fraction)["train"]
    t0 = time.perf_counter()
    tok = Tokenizer.train((d.text for d in docs), vocab_size=vocab_size, min_frequency=min_frequency)
    seconds = time.perf_counter() - t0
    path = tok.save(out)
    n_tokens = sum(len(ids) for ids in tok.encode_batch([d.text for d in docs]))
    n_bytes = sum(len(d.text.encode()) for d in docs)
    return {"tokenizer": str(path), "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "docs": len(docs),
            "bytes": n_bytes, "tokens": n_tokens, "bytes_per_token": round(n_bytes / max(n_tokens, 1), 3),
            "train_seconds": round(seconds, 2)}
