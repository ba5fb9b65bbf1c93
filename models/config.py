"""Typed configs: the `field` helper and `ConfigError` every config of the project uses (model shapes here, the
cluster's placement and training sections, the jobs' configs), and GPTConfig — the shape of a decoder-only
transformer, validated on construction, with presets by name.

A config is a (nested) dataclass whose fields carry `metadata={"help": ...}` (`field`), checked in `validate()` or
`__post_init__` with errors that start with the field's name; jobs/config.py builds them from YAML and `--set`.
These two live here, the lowest layer, so that cluster/ and actors/ declare their sections without importing
jobs/.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Attention = Literal["dense", "alternating"]
LNPlacement = Literal["pre", "post"]


class ConfigError(ValueError):
    """A config value is missing, of the wrong type, or inconsistent. The message names the field."""


def field(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:  # noqa: A002
    """`dataclasses.field` with a help string; mutable defaults go through `default_factory`."""
    if isinstance(default, (list, dict)) or (dataclasses.is_dataclass(default) and not isinstance(default, type)):
        value = default
        return dataclasses.field(default_factory=lambda: copy.deepcopy(value), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


class ModelConfigError(ConfigError):
    """A model config value is invalid; the message names the field."""


@dataclass(frozen=True)
class GPTConfig:
    """Decoder-only transformer shape (GPT-2 layout by default: pre-LayerNorm blocks + a final LayerNorm).

    `ln_placement="post"` with `final_ln=False` is GPT-1's layout (Radford et al. 2018 §3.1, the Transformer
    decoder of Vaswani et al. 2017): every sub-block is x ← LayerNorm(x + sublayer(x)) and no LayerNorm follows
    the last block. GPT-2 §2.3 moved the LayerNorm to each sub-block's input and added the final one.

    `attention="alternating"` is GPT-3's pattern (Brown et al. 2020, §2.1): layers alternate between dense
    causal attention (even layers) and locally banded sparse attention (odd layers), where a query attends
    only to the `local_window` most recent positions (itself included), as in the Sparse Transformer.
    """

    vocab_size: int = 50257
    n_ctx: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int | None = None  # MLP width; None = 4 * n_embd (GPT §4.1, GPT-2)
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    attention: Attention = "dense"
    local_window: int = 256
    tie_embeddings: bool = True
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    ln_placement: LNPlacement = "pre"
    final_ln: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_ctx", "n_layer", "n_head", "n_embd", "local_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"{name}: must be a positive integer, got {value!r}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise ModelConfigError(f"n_inner: must be a positive integer or null, got {self.n_inner!r}")
        if self.n_embd % self.n_head:
            raise ModelConfigError(
                f"n_embd: {self.n_embd} is not divisible by n_head={self.n_head} (each head gets n_embd/n_head dims)"
            )
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ModelConfigError(f"{name}: must be in [0, 1), got {value!r}")
        if self.attention not in ("dense", "alternating"):
            raise ModelConfigError(f"attention: must be 'dense' or 'alternating', got {self.attention!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ModelConfigError(f"{name}: {value} is outside the vocabulary [0, {self.vocab_size})")
        if self.layer_norm_epsilon <= 0 or self.initializer_range <= 0:
            raise ModelConfigError("layer_norm_epsilon/initializer_range: must be > 0")
        if self.ln_placement not in ("pre", "post"):
            raise ModelConfigError(f"ln_placement: must be 'pre' (GPT-2) or 'post' (GPT-1), got {self.ln_placement!r}")
        if not isinstance(self.final_ln, bool):
            raise ModelConfigError(f"final_ln: must be true or false, got {self.final_ln!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def is_sparse_layer(self, layer: int) -> bool:
        """GPT-3 alternates dense and locally banded layers; odd layers are the banded ones here."""
        return self.attention == "alternating" and layer % 2 == 1

    def replace(self, **changes: Any) -> GPTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ModelConfigError(f"{unknown[0]}: unknown model config field (valid: {', '.join(sorted(names))})")
        return cls(**data)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GPTConfig:
        if name not in PRESETS:
            raise ModelConfigError(f"preset: unknown model preset {name!r} (known: {', '.join(PRESETS)})")
        return cls(**{**PRESETS[name], **overrides})

    def num_params(self, include_embeddings: bool = True) -> int:
        c = self.n_embd
        per_layer = 4 * c + (3 * c * c + 3 * c) + (c * c + c) + 2 * (c * self.inner_dim) + self.inner_dim + c
        n = self.n_layer * per_layer + (2 * c if self.final_ln else 0)
        if include_embeddings:
            n += self.vocab_size * c + self.n_ctx * c
            if not self.tie_embeddings:
                n += self.vocab_size * c
        return n


def _gpt3(n_layer: int, n_embd: int, n_head: int) -> dict[str, Any]:
    # GPT-3 Table 2.1: n_ctx 2048 for every size, alternating dense/sparse attention layers.
    return dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_ctx=2048, attention="alternating")


PRESETS: dict[str, dict[str, Any]] = {
    # GPT (Radford et al. 2018 §4.1): 12 layers, 768 wide, 12 heads, 512 context, 40k BPE vocabulary; post-LN
    # blocks and no final LayerNorm (§3.1, the original Transformer decoder block).
    "gpt1": dict(n_layer=12, n_embd=768, n_head=12, n_ctx=512, vocab_size=40478, bos_token_id=0, eos_token_id=0,
                 ln_placement="post", final_ln=False),
    # GPT-2 (Radford et al. 2019), Table 2.
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
    # GPT-3 (Brown et al. 2020), Table 2.1.
    "gpt3-125m": _gpt3(12, 768, 12),
    "gpt3-350m": _gpt3(24, 1024, 16),
    "gpt3-760m": _gpt3(24, 1536, 16),
    "gpt3-1.3b": _gpt3(24, 2048, 24),
    "gpt3-2.7b": _gpt3(32, 2560, 32),
    "gpt3-6.7b": _gpt3(32, 4096, 32),
    # The paper lists d_model=5140 with 40 heads of 128; 5140 is not divisible by 40, so we use 40*128=5120.
    "gpt3-13b": _gpt3(40, 5120, 40),
    "gpt3-175b": _gpt3(96, 12288, 96),
    # CPU presets for the demo and tests; vocab_size is normally replaced by the trained tokenizer's.
    "tiny": dict(n_layer=4, n_embd=128, n_head=4, n_ctx=128, vocab_size=4096, bos_token_id=0, eos_token_id=0,
                 embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, local_window=32),
    "nano": dict(n_layer=2, n_embd=32, n_head=2, n_ctx=64, vocab_size=512, bos_token_id=0, eos_token_id=0,
                 embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, local_window=16),
}
