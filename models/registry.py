"""One entry point per architecture for the training loop: build, loss, save, load.

    arch "gpt"  GPTConfig    models.gpt.GPT           next-token LM loss (models.losses.lm_loss)
    arch "t5"   T5Config     models.t5.T5             span-corruption / text-to-text seq2seq loss
    arch "elmo" ElmoConfig   models.elmo.ELMo         biLM loss (mean of forward and backward NLL)

`build_model(cfg, tokenizer)` (ELMo needs the tokenizer: its byte-CNN reads each token's bytes),
`save_model(model, path, tokenizer)` and `load_model(path)` dispatch on the config class / config.json's
model_type ("gpt2" | "openai-gpt" | "t5" | "raygpt-elmo"). ELMo has no transformers class: its directory is our
own config.json (model_type "raygpt-elmo", ElmoConfig fields) + model.safetensors (+ tokenizer.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_config_json,
    read_weights,
    save_checkpoint,
    write_checkpoint_dir,
)
from models.config import ElmoConfig, GPTConfig, ModelConfigError, T5Config, arch_of
from models.elmo import ELMo, byte_table, tokenizer_bytes
from models.gpt import GPT
from models.t5 import T5
from models.t5_checkpoint import load_t5, save_t5

ELMO_MODEL_TYPE = "raygpt-elmo"


def build_model(cfg: Any, tokenizer: Any = None) -> nn.Module:
    """A freshly initialised model for `cfg` (GPTConfig | T5Config | ElmoConfig)."""
    if isinstance(cfg, GPTConfig):
        return GPT(cfg)
    if isinstance(cfg, T5Config):
        return T5(cfg)
    if isinstance(cfg, ElmoConfig):
        if tokenizer is None:
            raise ModelConfigError("tokenizer: ELMo's byte-CNN needs the tokenizer to know each token's bytes")
        return ELMo(cfg, byte_table(tokenizer_bytes(tokenizer, cfg.vocab_size), cfg.max_bytes))
    raise ModelConfigError(f"arch: no model for config type {type(cfg).__name__}")


def save_model(model: nn.Module, path: str | Path, tokenizer: Any = None) -> Path:
    """Write any of our language models as its checkpoint directory (atomically)."""
    arch = arch_of(model.config)
    if arch == "t5":
        return save_t5(model, path, tokenizer)  # type: ignore[arg-type]
    if arch == "elmo":
        config = {"model_type": ELMO_MODEL_TYPE, "architectures": ["ELMo"], **model.config.to_dict(),
                  "raygpt": {"arch": "elmo"}}
        tensors = {n: t.detach().cpu().contiguous().clone() for n, t in model.state_dict().items()}
        return write_checkpoint_dir(path, config, tensors, tokenizer)
    return save_checkpoint(model, path, tokenizer=tokenizer)


def load_model(path: str | Path, map_location: str = "cpu") -> nn.Module:
    """Load a checkpoint directory written by `save_model` (or transformers, for GPT-2 / GPT-1 / T5)."""
    data = read_config_json(path)
    model_type = data.get("model_type", "gpt2")
    if model_type == "t5":
        return load_t5(path, map_location)
    if model_type == ELMO_MODEL_TYPE:
        where = str(Path(path) / "config.json")
        fields = {k: v for k, v in data.items() if k in ElmoConfig.__dataclass_fields__}
        try:
            cfg = ElmoConfig(**fields)
        except (ModelConfigError, TypeError) as e:
            raise CheckpointError(f"{where}: {e}") from None
        sd = read_weights(path, map_location)
        if "token_bytes" not in sd:
            raise CheckpointError(f"{Path(path) / 'model.safetensors'}: missing tensor 'token_bytes'")
        model = ELMo(cfg, sd["token_bytes"])
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise CheckpointError(f"{Path(path) / 'model.safetensors'}: does not match config.json ({e})") from None
        return model
    return load_checkpoint(path, map_location=map_location)
