"""Shared pieces of the GPU tests (tests/gpu/, skipped without CUDA; run together by tests/gpu/run_all.sh)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def requires_gpus(n: int) -> pytest.MarkDecorator:
    return pytest.mark.skipif(GPUS < n, reason=f"needs {n} CUDA device(s), this machine has {GPUS} "
                                                "(run tests/gpu/run_all.sh on a GPU machine)")


def record(name: str, **values: Any) -> None:
    """Append one result row to $RAYGPT_GPU_RESULTS (run_all.sh collects them for docs/BENCHMARKS.md) and print it."""
    row = {"test": name, "device": torch.cuda.get_device_name(0) if GPUS else "cpu", **values}
    print(json.dumps(row), flush=True)
    path = os.environ.get("RAYGPT_GPU_RESULTS")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def pydoc_dataset(root: Path, vocab_size: int = 512) -> Path:
    """A BPE tokenizer and the pydoc corpus prepared as 256-token rows under root (seconds, no hub)."""
    from jobs.data.corpus import load_texts
    from jobs.data.tokens import prepare
    from models.tokenizer import Tokenizer

    tok = Tokenizer.train(load_texts("pydoc"), vocab_size=vocab_size, min_frequency=2)
    tok.save(root / "tokenizer.json")
    prepare("pydoc", root / "tokenizer.json", root / "pydoc", row_tokens=256)
    return root / "pydoc"
