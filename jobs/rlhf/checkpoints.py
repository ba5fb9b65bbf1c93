"""Reading checkpoints for the human-feedback jobs: checks that name the config field, and loading a language model
with its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.checkpoint import CheckpointError, load_checkpoint, read_config, tokenizer_path
from models.config import ConfigError
from models.tokenizer import Tokenizer


def check_policy(policy: str, field_name: str = "policy") -> None:

    try:
        read_config(policy)
        tokenizer_path(policy)
    except CheckpointError as e:
        raise ConfigError(f"{field_name}: {e}") from None


def load_lm(path: str | Path) -> tuple[Any, Any]:

    return load_checkpoint(path, kind="lm"), Tokenizer.from_file(tokenizer_path(path))
