"""`raygpt export CKPT OUT`: write a checkpoint as a self-contained Hugging Face GPT-2 directory.

A raygpt checkpoint already uses GPT-2's names and layout; export re-validates it (loads every tensor),
optionally casts the weights, and adds what `transformers.AutoTokenizer` needs next to `tokenizer.json`
(`tokenizer_config.json` with the chat template, `special_tokens_map.json`) plus a `generation_config.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="raygpt export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="raygpt checkpoint directory")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--dtype", default="float32", help=f"weight dtype: {', '.join(DTYPES)}")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.dtype)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
