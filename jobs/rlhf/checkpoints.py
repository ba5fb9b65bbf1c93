"""Reading checkpoints for the human-feedback jobs: checks that name the config field, and loading a language model
with its tokenizer.

Which architectures a job takes: `raygpt sft` fine-tunes a GPT (next-token loss on the response) or a T5
(text-to-text, T5 §2.4); the reward model, DPO, PPO and comparison sampling need a decoder-only GPT (their scalar
head, sequence log-probs and rollouts are the GPT's), so a T5 or ELMo checkpoint there is a ConfigError naming the
field, before any worker starts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.checkpoint import CheckpointError, load_checkpoint, read_config, read_config_json, tokenizer_path
from models.config import ConfigError
from models.t5_checkpoint import t5_config_from_hf
from models.tokenizer import Tokenizer

# config.json model_type → architecture (anything else is a GPT-2 / GPT-1 directory, checked by read_config)
_ARCH_OF_MODEL_TYPE = {"t5": "t5", "raygpt-elmo": "elmo"}
_ARCH_NAMES = {"gpt": "GPT (decoder-only)", "t5": "T5 (encoder-decoder)", "elmo": "ELMo (biLSTM feature extractor)"}


def checkpoint_arch(path: str | Path, field_name: str) -> str:
    """'gpt' | 't5' | 'elmo' of a readable checkpoint directory with a tokenizer; ConfigError naming `field_name`
    otherwise."""
    try:
        data = read_config_json(path)
        tokenizer_path(path)
    except CheckpointError as e:
        raise ConfigError(f"{field_name}: {e}") from None
    return _ARCH_OF_MODEL_TYPE.get(str(data.get("model_type", "gpt2")), "gpt")


def require_arch(path: str | Path, field_name: str, arches: Sequence[str] = ("gpt",)) -> str:
    """The checkpoint's architecture if it is one of `arches`; else a ConfigError naming the field and saying
    what the job takes."""
    arch = checkpoint_arch(path, field_name)
    if arch not in arches:
        wanted = " or ".join(_ARCH_NAMES[a] for a in arches)
        hint = " (a T5 fine-tunes text-to-text with `raygpt sft`)" if arch == "t5" else ""
        raise ConfigError(f"{field_name}: {path} is a {_ARCH_NAMES[arch]} checkpoint; this job takes a {wanted} "
                          f"language model{hint}")
    return arch


def check_policy(policy: str, field_name: str = "policy") -> None:
    """`policy` is a readable GPT checkpoint with a tokenizer; ConfigError naming `field_name` otherwise."""
    require_arch(policy, field_name)
    try:
        read_config(policy)
    except CheckpointError as e:
        raise ConfigError(f"{field_name}: {e}") from None


def load_lm(path: str | Path) -> tuple[Any, Any]:

    return load_checkpoint(path, kind="lm"), Tokenizer.from_file(tokenizer_path(path))


def finetune_start(init_from: str, parallel: Any, max_tokens: int, field_name: str = "data.max_tokens",
                   arches: Sequence[str] = ("gpt",)) -> tuple[Any, Path, Tokenizer]:
    """What SFT, the reward model and DPO check before anything starts on the checkpoint they fine-tune:
    readable with a tokenizer, an architecture the job takes (`arches`), a layout that fits the model
    (`parallel`: a cluster.train ParallelConfig; T5 is data parallel + ZeRO only), and sequences of `max_tokens`
    within its context. Returns (model config: GPTConfig | T5Config, tokenizer file, tokenizer)."""
    arch = require_arch(init_from, "init_from", arches)
    try:
        mcfg = t5_config_from_hf(read_config_json(init_from), str(Path(init_from) / "config.json")) \
            if arch == "t5" else read_config(init_from)[0]
    except CheckpointError as e:
        raise ConfigError(f"init_from: {e}") from None
    parallel.validate()
    parallel.check_model(mcfg)
    if max_tokens > mcfg.n_ctx:
        raise ConfigError(f"{field_name}: {max_tokens} tokens exceed the model's n_ctx={mcfg.n_ctx}")
    tok_file = tokenizer_path(init_from)
    return mcfg, tok_file, Tokenizer.from_file(tok_file)
