"""One entry point per architecture for the training loop: build, loss, save, load.

    arch "gpt"  GPTConfig    models.gpt.GPT           next-token LM loss (models.losses.lm_loss)
    arch "t5"   T5Config     models.t5.T5             span-corruption / text-to-text seq2seq loss
    arch "elmo" ElmoConfig   models.elmo.ELMo         biLM loss (mean of forward and backward NLL)

`build_model(cfg, tokenizer)` (ELMo needs the tokenizer: its byte-CNN reads each token's bytes),
`save_model(model, path, tokenizer)` and `load_model(path)` dispatch on the config class / config.json's
model_type ("gpt2" | "openai-gpt" | "t5" | "raygpt-elmo"). ELMo has no transformers class: its directory is our
own config.json (model_type "raygpt-elmo", ElmoConfig fields) + model.safetensors (+ tokenizer.json).

`pretrain_loss(model, tokens, seed)` is the pre-training objective of each architecture on a batch of packed
token windows (B, T) — the batches the GPT pre-training data path already yields — and `check_parallel` says
which parallel layouts an architecture supports, so a job can refuse a bad combination before any worker starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_config_json,
    read_weights,
    save_checkpoint,
    write_checkpoint_dir,
)
from models.config import ElmoConfig, GPTConfig, ModelConfigError, T5Config, arch_of
from models.elmo import ELMo, bilm_loss, byte_table, tokenizer_bytes
from models.gpt import GPT
from models.losses import Metrics, lm_loss
from models.span_corruption import sentinel_ids, seq2seq_loss, span_corruption_batch
from models.t5 import T5
from models.t5_checkpoint import load_t5, save_t5

ELMO_MODEL_TYPE = "raygpt-elmo"
T5_SENTINELS = 100  # T5's <extra_id_0..99>: the top 100 ids of a T5 vocabulary are reserved as sentinels


def model_vocab_size(arch: str, tokenizer_vocab_size: int) -> int:
    """The model vocabulary for a tokenizer: T5 appends its sentinel ids after the tokenizer's."""
    return tokenizer_vocab_size + T5_SENTINELS if arch == "t5" else tokenizer_vocab_size


def check_parallel(arch: str, tensor: int, pipeline: int) -> None:
    """ModelConfigError naming the field unless `arch` supports this layout. GPT: data parallel/ZeRO, tensor
    (Megatron) and pipeline parallel. T5 and ELMo: data parallel and ZeRO (any stage) only — models/parallel.py
    and models/pipeline.py shard the GPT's layers, not an encoder-decoder or an LSTM."""
    if arch == "gpt":
        return
    if tensor != 1:
        raise ModelConfigError(f"parallel.tensor: {arch} supports data parallelism and ZeRO only, got tensor={tensor}")
    if pipeline != 1:
        raise ModelConfigError(f"parallel.pipeline: {arch} supports data parallelism and ZeRO only, "
                               f"got pipeline={pipeline}")


def pretrain_loss(model: nn.Module, tokens: Tensor, seed: int, attention_mask: Tensor | None = None
                  ) -> tuple[Tensor, Metrics]:
    """The pre-training loss of `model` on token windows (B, T) → (scalar loss, metrics).

    GPT: next-token cross-entropy (GPT §3.1). T5: span corruption of every row (§3.1.4; row i seeded with
    seed + i, so pass e.g. a hash of (epoch, step, data rank) for exact resume) then the seq2seq loss; sentinels
    are the top `T5_SENTINELS` ids. ELMo: the biLM loss (§3.1). attention_mask (B, T): right padding, GPT and
    ELMo only (T5 windows are whole rows)."""
    arch = arch_of(model.config)
    if arch == "t5":
        cfg = model.config
        rows = tokens if attention_mask is None else [r[m.bool()] for r, m in zip(tokens, attention_mask)]
        b = span_corruption_batch([r.cpu() for r in rows], sentinel_ids(cfg.vocab_size, T5_SENTINELS),
                                  cfg.eos_token_id, cfg.pad_token_id, cfg.decoder_start_token_id, seed)
        dev = tokens.device
        logits = model(b.input_ids.to(dev), b.attention_mask.to(dev), b.decoder_input_ids.to(dev))
        loss = seq2seq_loss(logits, b.labels.to(dev), b.labels_mask.to(dev))
        return loss, {"target_tokens": b.labels_mask.sum().to(torch.float32)}
    if arch == "elmo":
        return bilm_loss(*model(tokens, attention_mask), tokens, attention_mask)
    logits = model(tokens, attention_mask)
    mask = attention_mask[:, 1:] if attention_mask is not None else None
    return lm_loss(logits[:, :-1], tokens[:, 1:], mask), {}


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
