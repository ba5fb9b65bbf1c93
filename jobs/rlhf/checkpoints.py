"""Reading checkpoints for the human-feedback jobs: checks that name the config field, and loading a language model
with its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.checkpoint import CheckpointError, load_checkpoint, read_config, tokenizer_path
from models.config import ConfigError
from models.tokenizer import Tokenizer


def check_policy(policy: str, field_name: str = "policy") -> None:
    """`policy` is a readable checkpoint with a tokenizer; ConfigError naming `field_name` otherwise."""
    try:
        read_config(policy)
        tokenizer_path(policy)
    except CheckpointError as e:
        raise ConfigError(f"{field_name}: {e}") from None


def load_lm(path: str | Path) -> tuple[Any, Any]:

    return load_checkpoint(path, kind="lm"), Tokenizer.from_file(tokenizer_path(path))


def finetune_start(init_from: str, parallel: Any, max_tokens: int, field_name: str = "data.max_tokens"
                   ) -> tuple[Any, Path, Tokenizer]:
    """What SFT, the reward model and DPO check before anything starts on the checkpoint they fine-tune:
    readable with a tokenizer, a layout that fits the model (`parallel`: a cluster.train ParallelConfig), and
    sequences of `max_tokens` within its context. Returns (model config, tokenizer file, tokenizer)."""
    check_policy(init_from, "init_from")
    mcfg = read_config(init_from)[0]
    parallel.validate()
    parallel.check_model(mcfg)
    if max_tokens > mcfg.n_ctx:
        raise ConfigError(f"{field_name}: {max_tokens} tokens exceed the model's n_ctx={mcfg.n_ctx}")
    tok_file = tokenizer_path(init_from)
    return mcfg, tok_file, Tokenizer.from_file(tok_file)
