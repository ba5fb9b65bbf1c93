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
from typing import Any, ClassVar, Literal

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

    arch: ClassVar[str] = "gpt"  # not a field: GPT config dicts stay as they were
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


# --- other architectures of the source document ------------------------------------------------------------------
Arch = Literal["gpt", "t5", "elmo"]
FeedForward = Literal["relu", "gated-gelu"]


class _ConfigMixin:
    """replace/to_dict/from_dict/from_name shared by the T5 and ELMo configs (PRESETS named per class)."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ModelConfigError(f"{unknown[0]}: unknown {cls.__name__} field (valid: {', '.join(sorted(names))})")
        return cls(**data)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Any:
        if name not in cls.presets:
            raise ModelConfigError(f"preset: unknown {cls.__name__} preset {name!r} (known: {', '.join(cls.presets)})")
        return cls(**{**cls.presets[name], **overrides})


def _positive_ints(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelConfigError(f"{name}: must be a positive integer, got {value!r}")


def _probability(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ModelConfigError(f"{name}: must be in [0, 1), got {value!r}")


@dataclass(frozen=True)
class T5Config(_ConfigMixin):
    """Encoder-decoder text-to-text transformer (Raffel et al. 2020, §2.1 and §3.1). Field names are those of
    transformers' T5Config, so a checkpoint's config.json loads there.

    T5 v1.0 (`feed_forward_proj="relu"`, `tie_word_embeddings=True`): one embedding matrix shared by encoder,
    decoder and LM head, decoder output rescaled by d_model**-0.5 before the tied head. T5 v1.1
    (`"gated-gelu"`, untied head, no rescale; Shazeer 2020's GEGLU). `n_ctx` is the input length used to
    pack pre-training examples (§3.1.2: 512); relative positions put no hard limit on it.
    """

    arch: ClassVar[str] = "t5"
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None = num_layers (resolved on construction)
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: FeedForward = "relu"
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    n_ctx: int = 512

    def __post_init__(self) -> None:
        _positive_ints(self, "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                       "relative_attention_num_buckets", "relative_attention_max_distance", "n_ctx")
        if self.num_decoder_layers is None:  # symmetric by default, resolved now so configs compare equal
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        _positive_ints(self, "num_decoder_layers")
        _probability(self, "dropout_rate")
        if self.feed_forward_proj not in ("relu", "gated-gelu"):
            raise ModelConfigError(f"feed_forward_proj: must be 'relu' (v1.0) or 'gated-gelu' (v1.1), "
                                   f"got {self.feed_forward_proj!r}")
        if self.relative_attention_num_buckets < 4:
            raise ModelConfigError("relative_attention_num_buckets: must be >= 4 (half exact, half log-spaced, "
                                   "per direction)")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ModelConfigError(f"{name}: {value!r} is outside the vocabulary [0, {self.vocab_size})")
        if self.layer_norm_epsilon <= 0 or self.initializer_factor <= 0:
            raise ModelConfigError("layer_norm_epsilon/initializer_factor: must be > 0")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ModelConfigError(f"tie_word_embeddings: must be true or false, got {self.tie_word_embeddings!r}")

    @property
    def n_decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv


def _t5(d_model: int, d_ff: int, layers: int, heads: int, v11: bool = False) -> dict[str, Any]:
    ff: dict[str, Any] = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False) if v11 else {}
    return dict(d_model=d_model, d_ff=d_ff, num_layers=layers, num_heads=heads, d_kv=64, **ff)


T5Config.presets = {
    # T5 v1.0 (Raffel et al. 2020 §3.7, Table 14 sizes): ReLU FF, tied embeddings.
    "t5-small": _t5(512, 2048, 6, 8),
    "t5-base": _t5(768, 3072, 12, 12),
    "t5-large": _t5(1024, 4096, 24, 16),
    # T5 v1.1: GEGLU FF, untied LM head, no dropout in pre-training.
    "t5-v1_1-small": dict(_t5(512, 1024, 8, 6), dropout_rate=0.0),
    "t5-v1_1-base": dict(_t5(768, 2048, 12, 12), dropout_rate=0.0),
    # CPU presets for tests and the demo corpus; vocab_size is normally replaced by the trained tokenizer's.
    "t5-tiny": dict(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_heads=4, vocab_size=4096, dropout_rate=0.0,
                    n_ctx=128),
    "t5-nano": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=512, dropout_rate=0.0,
                    relative_attention_num_buckets=8, relative_attention_max_distance=16, n_ctx=64),
}


@dataclass(frozen=True)
class ElmoConfig(_ConfigMixin):
    """ELMo's biLM (Peters et al. 2018, §3.1 and §3.4): a character-CNN token encoder over each token's bytes
    (n-gram filters, max-pooling, highway layers, projection to `d_model`), `n_layer` LSTM layers per direction
    (hidden `lstm_dim`, projected back to `d_model`, residual between layers) and one softmax over the token
    vocabulary shared by both directions. The paper: 2048 filters, 2 highway layers, 2 layers of 4096 units with
    512-d projections (§3.4); `elmo-tiny`/`elmo-nano` are the CPU shapes."""

    arch: ClassVar[str] = "elmo"
    vocab_size: int = 4096
    max_bytes: int = 16  # bytes of a token seen by the char-CNN (longer tokens are cut)
    byte_dim: int = 16
    filters: tuple[tuple[int, int], ...] = ((1, 32), (2, 32), (3, 64), (4, 128), (5, 256), (6, 512), (7, 1024))
    n_highway: int = 2
    d_model: int = 512
    lstm_dim: int = 4096
    n_layer: int = 2
    dropout: float = 0.1
    n_ctx: int = 128
    eos_token_id: int = 0

    def __post_init__(self) -> None:
        _positive_ints(self, "vocab_size", "max_bytes", "byte_dim", "d_model", "lstm_dim", "n_layer", "n_ctx")
        _probability(self, "dropout")
        if isinstance(self.n_highway, bool) or not isinstance(self.n_highway, int) or self.n_highway < 0:
            raise ModelConfigError(f"n_highway: must be a non-negative integer, got {self.n_highway!r}")
        filters = tuple(tuple(f) for f in self.filters)
        if not filters or any(len(f) != 2 or not all(isinstance(v, int) and v > 0 for v in f) for f in filters):
            raise ModelConfigError(f"filters: must be a non-empty list of [width, count] positive pairs, "
                                   f"got {self.filters!r}")
        if max(w for w, _ in filters) > self.max_bytes:
            raise ModelConfigError(f"filters: widest filter {max(w for w, _ in filters)} exceeds "
                                   f"max_bytes={self.max_bytes}")
        object.__setattr__(self, "filters", filters)  # JSON gives lists; keep the config hashable
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ModelConfigError(
                f"eos_token_id: {self.eos_token_id} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def n_filters(self) -> int:
        return sum(n for _, n in self.filters)


ElmoConfig.presets = {
    "elmo": dict(vocab_size=50257, max_bytes=50, eos_token_id=50256),  # §3.4 sizes over a BPE vocabulary
    "elmo-tiny": dict(max_bytes=12, byte_dim=16, filters=((1, 32), (2, 32), (3, 64), (4, 64)), n_highway=2,
                      d_model=128, lstm_dim=256, n_layer=2, dropout=0.0),
    "elmo-nano": dict(vocab_size=512, max_bytes=8, byte_dim=8, filters=((1, 8), (2, 8), (3, 16)), n_highway=1,
                      d_model=32, lstm_dim=48, n_layer=2, dropout=0.0, n_ctx=64),
}

CONFIG_CLASSES: dict[str, type] = {"gpt": GPTConfig, "t5": T5Config, "elmo": ElmoConfig}


def config_class(arch: str) -> type:
    """The config class of an architecture name ("gpt" | "t5" | "elmo"); ModelConfigError naming `arch`."""
    if arch not in CONFIG_CLASSES:
        raise ModelConfigError(f"arch: unknown architecture {arch!r} (known: {', '.join(CONFIG_CLASSES)})")
    return CONFIG_CLASSES[arch]


def arch_of(cfg: Any) -> str:
    """"gpt" | "t5" | "elmo" for a config instance."""
    return getattr(type(cfg), "arch", "gpt")
