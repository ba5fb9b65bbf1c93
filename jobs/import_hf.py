"""`raygpt import-hf HF_DIR OUT`: turn a Hugging Face GPT-2 directory into a raygpt checkpoint.

Reads `config.json`, weights from `model.safetensors` (or `pytorch_model.bin`, loaded with
`weights_only=True`: no arbitrary unpickling), and the tokenizer from `tokenizer.json` or the official
`vocab.json` + `merges.txt` pair. Nothing is downloaded: HF_DIR must be a local directory.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from jobs.cli import Arg, JobSpec
from jobs.config import ConfigError, field
from models.checkpoint import (
    CheckpointError,
    build_model,
    from_hf_state_dict,
    read_config,
    save_checkpoint,
)
from models.tokenizer import Tokenizer, TokenizerError


def _load_weights(src: Path) -> dict[str, torch.Tensor]:
    st, binf = src / "model.safetensors", src / "pytorch_model.bin"
    if st.is_file():

        try:
            return load_file(str(st))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{st}: unreadable safetensors file ({e})") from None
    if binf.is_file():
        try:
            return torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{binf}: unreadable or not a plain tensor state dict ({e})") from None
    raise CheckpointError(f"{src}: no model.safetensors or pytorch_model.bin")


def _load_tokenizer(src: Path) -> Tokenizer:
    if (src / "tokenizer.json").is_file():
        return Tokenizer.from_file(src / "tokenizer.json")
    if (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        return Tokenizer.from_gpt2_files(src / "vocab.json", src / "merges.txt")
    raise CheckpointError(f"{src}: no tokenizer.json and no vocab.json + merges.txt")


def import_hf(src: str | Path, dst: str | Path) -> Path:
    src = Path(src)
    cfg, kind, _ = read_config(src)  # the same validation as our own checkpoints: names the file
    tok = _load_tokenizer(src)
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"{src}: tokenizer has {tok.vocab_size} tokens but config.json vocab_size={cfg.vocab_size}"
        )
    model = build_model(cfg, kind)
    sd = from_hf_state_dict(_load_weights(src))
    if kind == "lm" and cfg.tie_embeddings:
        sd["lm_head.weight"] = sd.get("transformer.wte.weight", torch.empty(0))
    missing, unexpected = set(model.state_dict()) - set(sd), set(sd) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(f"{src}: missing tensors {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"{src}: weights do not match config.json ({e})") from None
    return save_checkpoint(model.float(), dst, kind=kind, tokenizer=tok)


@dataclass
class ImportConfig:
    """Import a local Hugging Face GPT-2 directory as a raygpt checkpoint (positional: HF_DIR OUT)."""

    hf_dir: str = field("", help="local Hugging Face GPT-2 directory")
    out: str = field("", help="raygpt checkpoint directory to write")

    def validate(self) -> None:
        if not self.hf_dir or not self.out:
            raise ConfigError("hf_dir/out: give both (raygpt import-hf HF_DIR OUT)")


def run(cfg: ImportConfig) -> Path:
    try:
        out = import_hf(cfg.hf_dir, cfg.out)
    except (CheckpointError, TokenizerError) as e:
        raise ConfigError(str(e)) from None
    print(f"imported {cfg.hf_dir} -> {out}")
    return out


JOB = JobSpec(ImportConfig, run, "raygpt import-hf", args=(
    Arg(("hf_dir",), "hf_dir", "local Hugging Face GPT-2 directory"),
    Arg(("out",), "out", "raygpt checkpoint directory to write")))
main = JOB.main


if __name__ == "__main__":
    sys.exit(main())
