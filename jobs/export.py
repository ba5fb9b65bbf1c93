"""`raygpt export CKPT OUT`: write a checkpoint as a self-contained Hugging Face GPT-2 directory.

A raygpt checkpoint already uses GPT-2's names and layout; export re-validates it (loads every tensor),
optionally casts the weights, and adds what `transformers.AutoTokenizer` needs next to `tokenizer.json`
(`tokenizer_config.json` with the chat template, `special_tokens_map.json`) plus a `generation_config.json`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from jobs.cli import Arg, JobSpec
from jobs.config import ConfigError, field
from models.chat import write_tokenizer_config
from models.checkpoint import (
    CheckpointError,
    check_exportable,
    load_checkpoint,
    read_config,
    save_checkpoint,
    tokenizer_path,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(src: str | Path, dst: str | Path, dtype: str = "float32") -> Path:
    cfg, kind, _ = read_config(src)
    check_exportable(cfg)  # e.g. GPT-3 banded layers: transformers would silently run them dense
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype: must be one of {sorted(DTYPES)}, got {dtype!r}")
    model = load_checkpoint(src, kind=kind).to(DTYPES[dtype])
    tok = tokenizer_path(src)
    out = save_checkpoint(model, dst, kind=kind, tokenizer=tok)
    data = json.loads((out / "config.json").read_text())
    data["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(data, indent=2))
    write_tokenizer_config(out, cfg.n_ctx)  # special tokens + the chat template (models/chat.py)
    if kind == "lm":
        (out / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.eos_token_id},
            indent=2))
    return out


@dataclass
class ExportConfig:
    """Write a checkpoint as a self-contained Hugging Face directory (positional: CHECKPOINT OUT)."""

    checkpoint: str = field("", help="raygpt checkpoint directory")
    out: str = field("", help="output directory (written atomically)")
    dtype: str = field("float32", help=f"weight dtype: {', '.join(DTYPES)}")

    def validate(self) -> None:
        if not self.checkpoint or not self.out:
            raise ConfigError("checkpoint/out: give both (raygpt export CHECKPOINT OUT)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: must be one of {sorted(DTYPES)}, got {self.dtype!r}")


def run(cfg: ExportConfig) -> Path:
    try:
        out = export(cfg.checkpoint, cfg.out, cfg.dtype)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    print(f"exported {cfg.checkpoint} -> {out}")
    return out


JOB = JobSpec(ExportConfig, run, "raygpt export", args=(
    Arg(("checkpoint",), "checkpoint", "raygpt checkpoint directory"),
    Arg(("out",), "out", "output directory (written atomically)"),
    Arg(("--dtype",), "dtype", f"weight dtype: {', '.join(DTYPES)}")))
main = JOB.main


if __name__ == "__main__":
    sys.exit(main())
