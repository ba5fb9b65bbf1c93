"""Checkpoint directory = a Hugging Face GPT-2 directory (DESIGN.md "Checkpoint directory"):

    config.json         GPT2Config keys (+ a "raygpt" block with what GPT2Config cannot express)
    model.safetensors   GPT-2 parameter names, Conv1D layout (weights stored (in, out))
    tokenizer.json      byte-level BPE (when a tokenizer is given)

A language model loads in `transformers` as `GPT2LMHeadModel`; a reward or value model (kind "reward"/"value")
as `GPT2ForSequenceClassification` with num_labels=1 and its head named `score`. Weights are never pickled.
Writes go to a temporary sibling directory that is renamed into place, so a crash never leaves a half-written
checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from models.config import GPTConfig, ModelConfigError
from models.gpt import GPT
from models.heads import RewardModel, ValueModel

Kind = Literal["lm", "reward", "value"]
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"

# Linear layers that HF stores as Conv1D, i.e. transposed.
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class CheckpointError(ValueError):
    """A checkpoint directory is missing, corrupt or inconsistent; the message names the file."""


def hf_config(cfg: GPTConfig, kind: Kind) -> dict[str, Any]:
    """GPT2Config-compatible dict for `cfg`."""
    out: dict[str, Any] = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"] if kind == "lm" else ["GPT2ForSequenceClassification"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_ctx,
        "n_ctx": cfg.n_ctx,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.n_inner,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.resid_pdrop,
        "embd_pdrop": cfg.embd_pdrop,
        "attn_pdrop": cfg.attn_pdrop,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.eos_token_id,
        "tie_word_embeddings": cfg.tie_embeddings,
        "scale_attn_weights": True,
        "torch_dtype": "float32",
        "raygpt": {"kind": kind, "attention": cfg.attention, "local_window": cfg.local_window},
    }
    if kind != "lm":
        out["num_labels"] = 1
        out["id2label"] = {"0": "LABEL_0"}
        out["label2id"] = {"LABEL_0": 0}
    return out


def config_from_hf(data: dict[str, Any], where: str = CONFIG_FILE) -> tuple[GPTConfig, Kind]:
    """GPTConfig + kind from a GPT2Config dict (ours or one written by transformers)."""
    if data.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{where}: model_type {data.get('model_type')!r} is not 'gpt2'")
    extra = data.get("raygpt", {})
    archs = data.get("architectures") or ["GPT2LMHeadModel"]
    kind: Kind = extra.get("kind") or ("lm" if "GPT2LMHeadModel" in archs else "reward")
    if data.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{where}: activation_function {data['activation_function']!r} is not supported")
    try:
        cfg = GPTConfig(
            vocab_size=data["vocab_size"], n_ctx=data.get("n_positions", data.get("n_ctx")),
            n_layer=data["n_layer"], n_head=data["n_head"], n_embd=data["n_embd"], n_inner=data.get("n_inner"),
            embd_pdrop=data.get("embd_pdrop", 0.1), attn_pdrop=data.get("attn_pdrop", 0.1),
            resid_pdrop=data.get("resid_pdrop", 0.1), layer_norm_epsilon=data.get("layer_norm_epsilon", 1e-5),
            initializer_range=data.get("initializer_range", 0.02),
            attention=extra.get("attention", "dense"), local_window=extra.get("local_window", 256),
            tie_embeddings=data.get("tie_word_embeddings", True),
            bos_token_id=data.get("bos_token_id", 50256) or 0, eos_token_id=data.get("eos_token_id", 50256) or 0,
        )
    except KeyError as e:
        raise CheckpointError(f"{where}: missing key {e.args[0]!r}") from None
    except (ModelConfigError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    return cfg, kind


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict → HF GPT-2 names/layout (tied lm_head omitted: safetensors stores no aliases)."""
    out: dict[str, torch.Tensor] = {}
    tied = getattr(model.config, "tie_embeddings", True)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        t = t.detach().to("cpu")
        if name.endswith(_CONV1D_SUFFIXES):
            t = t.t()
        out[name] = t.contiguous().clone()
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT-2 names/layout → ours. Accepts checkpoints without the `transformer.` prefix (the `gpt2` hub
    layout) and drops HF's non-parameter buffers (`attn.bias`, `attn.masked_bias`)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if not name.startswith(("transformer.", "lm_head.", "score.")):
            name = "transformer." + name
        if name.endswith(_CONV1D_SUFFIXES):
            t = t.t()
        out[name] = t.contiguous()
    return out


def build_model(cfg: GPTConfig, kind: Kind) -> nn.Module:
    return {"lm": GPT, "reward": RewardModel, "value": ValueModel}[kind](cfg)


def save_checkpoint(model: nn.Module, path: str | Path, kind: Kind | None = None, tokenizer: Any = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write `model` as a GPT-2 directory at `path` atomically. `tokenizer` is a models.tokenizer.Tokenizer
    or a path to a tokenizer.json; `extra` is merged into config.json's "raygpt" block."""
    from safetensors.torch import save_file

    kind = kind or ("lm" if isinstance(model, GPT) else getattr(model, "kind", "reward"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        config = hf_config(model.config, kind)
        config["raygpt"].update(extra or {})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        save_file(to_hf_state_dict(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            if isinstance(tokenizer, (str, Path)):
                shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
            else:
                tokenizer.save(tmp / TOKENIZER_FILE)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config(path: str | Path) -> tuple[GPTConfig, Kind, dict[str, Any]]:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (a checkpoint needs config.json and model.safetensors)")
    try:
        data = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg_file}: must hold a JSON object")
    cfg, kind = config_from_hf(data, str(cfg_file))
    return cfg, kind, data


def load_checkpoint(path: str | Path, kind: Kind | None = None, map_location: str = "cpu") -> nn.Module:
    """Load a checkpoint directory into GPT / RewardModel / ValueModel (kind defaults to the saved one).

    Loading an LM checkpoint as "reward"/"value" keeps the transformer and starts a fresh scalar head
    (InstructGPT: the RM starts from SFT with the unembedding removed); reward → value keeps the head too.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg, saved_kind, _ = read_config(path)
    kind = kind or saved_kind
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    try:
        sd = from_hf_state_dict(load_file(str(weights), device=map_location))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{weights}: corrupt or unreadable safetensors file ({e})") from None
    model = build_model(cfg, kind)
    own = model.state_dict()
    if kind == "lm":
        sd = {k: v for k, v in sd.items() if not k.startswith("score.")}
        if cfg.tie_embeddings:
            sd["lm_head.weight"] = sd.get("transformer.wte.weight", torch.empty(0))
    else:
        sd = {k: v for k, v in sd.items() if not k.startswith("lm_head.")}
        if "score.weight" not in sd:
            sd["score.weight"] = own["score.weight"]
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{weights}: missing tensors {missing[:5]} / unexpected tensors {unexpected[:5]}")
    for name, t in sd.items():
        if t.shape != own[name].shape:
            raise CheckpointError(
                f"{weights}: tensor {name} has shape {tuple(t.shape)}, config.json implies {tuple(own[name].shape)}"
            )
    model.load_state_dict(sd)
    return model


def tokenizer_path(path: str | Path) -> Path:
    p = Path(path) / TOKENIZER_FILE
    if not p.is_file():
        raise CheckpointError(f"{p}: missing (the checkpoint has no tokenizer)")
    return p
