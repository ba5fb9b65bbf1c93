"""Checkpoint directory = a Hugging Face GPT-2 directory (docs/CHECKPOINTS.md):

    config.json         GPT2Config keys (+ a "raygpt" block with what GPT2Config cannot express)
    model.safetensors   GPT-2 parameter names, Conv1D layout (weights stored (in, out))
    tokenizer.json      byte-level BPE (when a tokenizer is given), with tokenizer_config.json +
                        special_tokens_map.json: special tokens and the chat template (models/chat.py)

A language model loads in `transformers` as `GPT2LMHeadModel`; a reward or value model (kind "reward"/"value")
as `GPT2ForSequenceClassification` with num_labels=1 and its head named `score`. Weights are never pickled.
A GPT-1 (post-LN, no final LayerNorm) is written as an `OpenAIGPTLMHeadModel` directory instead: config.json
model_type "openai-gpt", `tokens_embed`/`positions_embed` for our `wte`/`wpe`, the same block names.
`check_exportable` refuses what no transformers class computes the same way (GPT-3's banded layers).
Writes go to a temporary sibling directory that is renamed into place, so a crash never leaves a half-written
checkpoint under the final name.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from models.chat import write_tokenizer_config
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


# Our GPT names ↔ OpenAIGPTModel's (the blocks' names are the same as GPT-2's).
_OPENAI_NAMES = {"transformer.wte.": "transformer.tokens_embed.", "transformer.wpe.": "transformer.positions_embed."}


def is_gpt1(cfg: GPTConfig) -> bool:
    """GPT-1's layout (post-LN blocks, no final LayerNorm) → the "openai-gpt" format."""
    return cfg.ln_placement == "post"


def check_exportable(cfg: GPTConfig) -> None:
    """Raise CheckpointError unless a plain transformers class computes exactly what `cfg` computes.

    transformers' GPT2/OpenAIGPT models have no locally banded attention: a GPT-3 alternating model exported
    there would silently run dense, with different numbers. Mixed layouts (post-LN with a final LayerNorm, or
    pre-LN without one) match neither GPT2LMHeadModel nor OpenAIGPTLMHeadModel."""
    if cfg.attention != "dense":
        raise CheckpointError(
            f"config.json: attention={cfg.attention!r} (GPT-3 banded layers, local_window={cfg.local_window}) cannot "
            "be exported to the Hugging Face GPT-2 format: transformers would run every layer dense and compute "
            "different logits. Keep the raygpt checkpoint (load_checkpoint honours the pattern) or train with "
            "attention=dense to export.")
    if (cfg.ln_placement == "post") == cfg.final_ln:
        raise CheckpointError(
            f"config.json: ln_placement={cfg.ln_placement!r} with final_ln={cfg.final_ln} is neither GPT-2 (pre, "
            "final LayerNorm) nor GPT-1 (post, none); no transformers class computes it")
    if is_gpt1(cfg) and (cfg.inner_dim != 4 * cfg.n_embd or not cfg.tie_embeddings):
        raise CheckpointError("config.json: OpenAIGPT has a 4·n_embd MLP and a tied LM head; this GPT-1 has "
                              f"n_inner={cfg.n_inner}, tie_embeddings={cfg.tie_embeddings}")


def _openai_gpt_config(cfg: GPTConfig, kind: Kind) -> dict[str, Any]:
    """OpenAIGPTConfig-compatible dict. afn "gelu" is HF's `gelu_new` (tanh approximation), like our MLP."""
    return {
        "model_type": "openai-gpt",
        "architectures": ["OpenAIGPTLMHeadModel"] if kind == "lm" else ["OpenAIGPTForSequenceClassification"],
        "vocab_size": cfg.vocab_size, "n_positions": cfg.n_ctx, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "afn": "gelu", "resid_pdrop": cfg.resid_pdrop, "embd_pdrop": cfg.embd_pdrop,
        "attn_pdrop": cfg.attn_pdrop, "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "initializer_range": cfg.initializer_range, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.eos_token_id,
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
    }


def hf_config(cfg: GPTConfig, kind: Kind) -> dict[str, Any]:
    """GPT2Config-compatible dict for `cfg` (OpenAIGPTConfig-compatible for a GPT-1 layout)."""
    if is_gpt1(cfg):
        out = _openai_gpt_config(cfg, kind)
    else:
        out = _gpt2_config(cfg, kind)
    out["raygpt"] = {"kind": kind, "attention": cfg.attention, "local_window": cfg.local_window,
                     "ln_placement": cfg.ln_placement, "final_ln": cfg.final_ln, "n_inner": cfg.n_inner}
    if kind != "lm":
        out["num_labels"] = 1
        out["id2label"] = {"0": "LABEL_0"}
        out["label2id"] = {"LABEL_0": 0}
    return out


def _gpt2_config(cfg: GPTConfig, kind: Kind) -> dict[str, Any]:
    return {
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
    }


def config_from_hf(data: dict[str, Any], where: str = CONFIG_FILE) -> tuple[GPTConfig, Kind]:
    """GPTConfig + kind from a GPT2Config or OpenAIGPTConfig dict (ours or one written by transformers)."""
    model_type = data.get("model_type", "gpt2")
    if model_type not in ("gpt2", "openai-gpt"):
        raise CheckpointError(f"{where}: model_type {model_type!r} is not 'gpt2' or 'openai-gpt'")
    extra = data.get("raygpt", {})
    gpt1 = model_type == "openai-gpt"
    lm_arch = "OpenAIGPTLMHeadModel" if gpt1 else "GPT2LMHeadModel"
    archs = data.get("architectures") or [lm_arch]
    kind: Kind = extra.get("kind") or ("lm" if lm_arch in archs else "reward")
    if gpt1:
        if data.get("afn", "gelu") != "gelu":
            raise CheckpointError(f"{where}: afn {data['afn']!r} is not supported (GPT-1 uses 'gelu')")
        data = {**data, "bos_token_id": data.get("bos_token_id") or 0, "eos_token_id": data.get("eos_token_id") or 0}
    elif data.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{where}: activation_function {data['activation_function']!r} is not supported")
    try:
        cfg = GPTConfig(
            vocab_size=data["vocab_size"], n_ctx=data.get("n_positions", data.get("n_ctx")),
            n_layer=data["n_layer"], n_head=data["n_head"], n_embd=data["n_embd"],
            n_inner=data.get("n_inner", extra.get("n_inner")),
            embd_pdrop=data.get("embd_pdrop", 0.1), attn_pdrop=data.get("attn_pdrop", 0.1),
            resid_pdrop=data.get("resid_pdrop", 0.1), layer_norm_epsilon=data.get("layer_norm_epsilon", 1e-5),
            initializer_range=data.get("initializer_range", 0.02),
            attention=extra.get("attention", "dense"), local_window=extra.get("local_window", 256),
            tie_embeddings=data.get("tie_word_embeddings", True),
            bos_token_id=data.get("bos_token_id", 50256) or 0, eos_token_id=data.get("eos_token_id", 50256) or 0,
            ln_placement=extra.get("ln_placement", "post" if gpt1 else "pre"),
            final_ln=extra.get("final_ln", not gpt1),
        )
    except KeyError as e:
        raise CheckpointError(f"{where}: missing key {e.args[0]!r}") from None
    except (ModelConfigError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    return cfg, kind


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict → HF GPT-2 names/layout, or OpenAIGPT's for a GPT-1 (tied lm_head omitted: safetensors
    stores no aliases)."""
    out: dict[str, torch.Tensor] = {}
    tied = getattr(model.config, "tie_embeddings", True)
    gpt1 = is_gpt1(model.config)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        t = t.detach().to("cpu")
        if name.endswith(_CONV1D_SUFFIXES):
            t = t.t()
        if gpt1:
            for ours, theirs in _OPENAI_NAMES.items():
                if name.startswith(ours):
                    name = theirs + name[len(ours):]
        out[name] = t.contiguous().clone()
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT-2 or OpenAIGPT names/layout → ours. Accepts checkpoints without the `transformer.` prefix (the
    `gpt2`/`openai-gpt` hub layout) and drops HF's non-parameter buffers (`attn.bias`, `attn.masked_bias`,
    `position_ids`)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.endswith((".attn.bias", ".attn.masked_bias", "position_ids")):
            continue
        if not name.startswith(("transformer.", "lm_head.", "score.")):
            name = "transformer." + name
        for ours, theirs in _OPENAI_NAMES.items():
            if name.startswith(theirs):
                name = ours + name[len(theirs):]
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
    kind = kind or ("lm" if isinstance(model, GPT) else getattr(model, "kind", "reward"))
    config = hf_config(model.config, kind)
    config["raygpt"].update(extra or {})
    return write_checkpoint_dir(path, config, to_hf_state_dict(model), tokenizer)


def write_checkpoint_dir(path: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                         tokenizer: Any = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer.json) to a temporary sibling directory, flush it to disk,
    then rename it to `path` (replacing an existing one), so a crash — SIGKILL included — never leaves a
    half-written checkpoint under that name: `path` is the previous complete checkpoint or the new complete one.

    Replacing takes two renames (`path` → `.<name>.old-<pid>`, temp → `path`); a kill between them leaves no
    `path` but the previous checkpoint intact under the `.old-` name, which the next write or load puts back
    (`recover_checkpoint_dir`). A directory that cannot be written (read-only, full disk) raises CheckpointError
    naming it; the previous checkpoint is untouched and no partial file is left under `path`."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        recover_checkpoint_dir(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            if isinstance(tokenizer, (str, Path)):
                shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
            else:
                tokenizer.save(tmp / TOKENIZER_FILE)
            # transformers' tokenizer files: special tokens and the one chat template raygpt trains and serves with
            write_tokenizer_config(tmp, config.get("n_positions"))
        _fsync_tree(tmp)  # the data is on disk before the name points at it (a power cut, not only a kill)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
        _fsync_dir(path.parent)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(path, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_error(path: Path, e: Exception) -> CheckpointError:
    code = getattr(e, "errno", None)
    if code is None and "os error " in str(e):  # safetensors' Rust I/O errors carry the errno in their text
        tail = str(e).rpartition("os error ")[2].rstrip(")")
        code = int(tail) if tail.isdigit() else None
    why = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
           errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}.get(code or 0, str(e))
    return CheckpointError(f"{path}: cannot write the checkpoint ({why}); nothing was written under this name and "
                           "the previous checkpoint there, if any, is unchanged")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for f in directory.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(directory)


def recover_checkpoint_dir(path: str | Path) -> bool:
    """Undo a replace that was killed between its two renames: when `path` is missing and a complete previous
    checkpoint waits under `.<name>.old-<pid>` whose writer process is gone, rename it back. A live writer's
    `.old-` directory is left alone (it is between its two renames right now). True when something was recovered."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return False
    for old in sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True):
        pid = old.name.rpartition("-")[2]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if (old / CONFIG_FILE).is_file() and (old / WEIGHTS_FILE).is_file():
            old.rename(path)
            return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def read_config(path: str | Path) -> tuple[GPTConfig, Kind, dict[str, Any]]:
    data = read_config_json(path)
    cfg, kind = config_from_hf(data, str(Path(path) / CONFIG_FILE))
    return cfg, kind, data


def read_config_json(path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint directory as a dict; CheckpointError naming the file otherwise."""
    path = Path(path)
    if not path.is_dir():
        try:
            recover_checkpoint_dir(path)
        except OSError:
            pass  # a read-only parent: report the missing directory below
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
    return data


def read_weights(path: str | Path, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """model.safetensors of a checkpoint directory; CheckpointError naming the file if missing or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    try:
        return load_file(str(weights), device=map_location)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{weights}: corrupt or unreadable safetensors file ({e})") from None


def load_checkpoint(path: str | Path, kind: Kind | None = None, map_location: str = "cpu") -> nn.Module:
    """Load a checkpoint directory into GPT / RewardModel / ValueModel (kind defaults to the saved one).

    Loading an LM checkpoint as "reward"/"value" keeps the transformer and starts a fresh scalar head
    (InstructGPT: the RM starts from SFT with the unembedding removed); reward → value keeps the head too.
    """
    path = Path(path)
    cfg, saved_kind, _ = read_config(path)
    kind = kind or saved_kind
    weights = path / WEIGHTS_FILE
    sd = from_hf_state_dict(read_weights(path, map_location))
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
