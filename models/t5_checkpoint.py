"""T5 checkpoint directory = a Hugging Face `T5ForConditionalGeneration` directory:

    config.json         transformers' T5Config keys, model_type "t5" (+ a "raygpt" block: n_ctx)
    model.safetensors   HF T5 parameter names (ours are the same); the embedding aliases `encoder.embed_tokens`
                        / `decoder.embed_tokens` and a tied `lm_head` are stored once, as `shared.weight`
    tokenizer.json      when a tokenizer is given

v1.0 (tied) writes tie_word_embeddings true and no lm_head; v1.1 (untied) writes tie_word_embeddings false and
its own lm_head.weight, which transformers ≥ 5 keeps untied (and then does not rescale the decoder output).
Loading also accepts transformers-5-written configs, where `tie_word_embeddings` is always true and
`scale_decoder_outputs` says whether the head was tied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.checkpoint import CheckpointError, read_config_json, read_weights, write_checkpoint_dir
from models.config import ModelConfigError, T5Config
from models.t5 import T5

_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def t5_hf_config(cfg: T5Config) -> dict[str, Any]:
    data = {k: v for k, v in cfg.to_dict().items() if k != "n_ctx"}
    data["num_decoder_layers"] = cfg.n_decoder_layers
    return {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True,
            **data, "torch_dtype": "float32", "raygpt": {"arch": "t5", "n_ctx": cfg.n_ctx}}


def t5_config_from_hf(data: dict[str, Any], where: str) -> T5Config:
    if data.get("model_type") != "t5":
        raise CheckpointError(f"{where}: model_type {data.get('model_type')!r} is not 't5'")
    names = {f for f in T5Config.__dataclass_fields__ if f != "n_ctx"}
    fields = {k: v for k, v in data.items() if k in names}
    if "scale_decoder_outputs" in data:  # written by transformers >= 5: the head is tied iff outputs are rescaled
        fields["tie_word_embeddings"] = bool(data["scale_decoder_outputs"])
    fields["n_ctx"] = data.get("raygpt", {}).get("n_ctx", 512)
    try:
        return T5Config(**fields)
    except (ModelConfigError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def save_t5(model: T5, path: str | Path, tokenizer: Any = None) -> Path:
    """Write `model` as a T5ForConditionalGeneration directory at `path`, atomically."""
    tied = model.config.tie_word_embeddings
    tensors = {n: t.detach().cpu().contiguous().clone() for n, t in model.state_dict().items()
               if n not in _ALIASES and not (tied and n == "lm_head.weight")}
    return write_checkpoint_dir(path, t5_hf_config(model.config), tensors, tokenizer)


def load_t5(path: str | Path, map_location: str = "cpu") -> T5:
    """A T5 from one of our directories or one written by transformers' save_pretrained."""
    where = str(Path(path) / "config.json")
    cfg = t5_config_from_hf(read_config_json(path), where)
    sd = read_weights(path, map_location)
    model = T5(cfg)
    own = model.state_dict()
    if "shared.weight" not in sd:
        raise CheckpointError(f"{Path(path) / 'model.safetensors'}: missing tensor 'shared.weight'")
    for alias in _ALIASES:
        sd[alias] = sd["shared.weight"]
    if cfg.tie_word_embeddings or "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["shared.weight"].clone() if not cfg.tie_word_embeddings else sd["shared.weight"]
    # transformers keeps a relative-bias table only in layer 0; nothing else may be missing or extra
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{Path(path) / 'model.safetensors'}: missing tensors {missing[:5]} / "
                              f"unexpected tensors {unexpected[:5]}")
    for name, t in sd.items():
        if t.shape != own[name].shape:
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(t.shape)}, config.json implies "
                                  f"{tuple(own[name].shape)}")
    model.load_state_dict(sd)
    return model
