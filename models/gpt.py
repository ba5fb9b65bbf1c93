"""GPT-2-style decoder-only transformer (Radford et al. 2018, 2019; GPT-3 sparse option from Brown et al. 2020).

Parameter names equal Hugging Face's `GPT2LMHeadModel` (`transformer.h.0.attn.c_attn.weight`, ...) so a
checkpoint is a GPT-2 directory; the one difference is that we use `nn.Linear` (weight `(out, in)`) where HF
uses `Conv1D` (weight `(in, out)`), and `models/checkpoint.py` transposes at the boundary.

GPT-2 §2.3 modifications over GPT: LayerNorm moved to the input of each sub-block, an extra LayerNorm after
the final block, residual projections initialised with std / √N (N = number of residual layers = 2·n_layer).
GPT-1 itself (`ln_placement="post"`, `final_ln=False`, the `gpt1` preset) keeps the original post-LN block and
has no final LayerNorm; `models/checkpoint.py` reads/writes it in HF's `OpenAIGPTLMHeadModel` names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import GPTConfig


class KVCache:
    """Pre-allocated key/value cache for incremental decoding.

    `k[layer]`, `v[layer]`: (B, n_head_local, max_len, head_dim); `length` = positions already written.
    `attention_mask` (B, max_len) marks real (1) vs padding (0) key positions; it is extended as tokens arrive.
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, n_head, max_len, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0

    def select(self, rows: Tensor) -> None:
        """Keep only the given batch rows (e.g. drop finished sequences)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]


def attention_mask_4d(key_mask: Tensor | None, q_len: int, past: int, window: int | None, device: torch.device,
                      batch: int) -> Tensor | None:
    """Boolean (B, 1, q_len, past+q_len) mask: True = may attend; None = plain causal (SDPA's `is_causal`).

    Query i sits at absolute position past+i and sees key j iff j <= past+i (causal), the key is not padding,
    and, for GPT-3's locally banded layers, past+i - j < window. The diagonal is always allowed so that a
    padding query still has one finite score (its output is ignored; without it softmax gives NaN rows).
    """
    if key_mask is None and window is None and past == 0:
        return None
    total = past + q_len
    q_pos = torch.arange(past, total, device=device).unsqueeze(1)
    k_pos = torch.arange(total, device=device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    allowed = allowed.unsqueeze(0).unsqueeze(0).expand(batch, 1, q_len, total)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :total].bool()
    return allowed | (k_pos == q_pos).unsqueeze(0).unsqueeze(0)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_pdrop = cfg.attn_pdrop
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)
        self.window = cfg.local_window if cfg.is_sparse_layer(layer) else None
        self.layer = layer

    def forward(self, x: Tensor, mask: Tensor | None, cache: KVCache | None) -> Tensor:
        B, T, _ = x.shape
        qkv = self.c_attn(x)  # (B, T, 3·C_local); under tensor parallelism C_local = C / tp
        n_local = qkv.size(-1) // (3 * self.head_dim)
        q, k, v = qkv.view(B, T, 3, n_local, self.head_dim).permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
        if cache is not None:
            start = cache.length
            cache.k[self.layer][:, :, start:start + T] = k
            cache.v[self.layer][:, :, start:start + T] = v
            k = cache.k[self.layer][:, :, :start + T]
            v = cache.v[self.layer][:, :, :start + T]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_pdrop if self.training else 0.0, is_causal=mask is None
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, n_local * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.inner_dim)
        self.c_proj = nn.Linear(cfg.inner_dim, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        # GPT-2 uses the tanh approximation of GELU ("gelu_new" in HF).
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN transformer block (GPT-2 §2.3): x + attn(ln_1(x)), then x + mlp(ln_2(x)); or, for GPT-1
    (`ln_placement="post"`, GPT §3.1 / Vaswani et al. 2017 §3.1): ln_1(x + attn(x)), then ln_2(x + mlp(x))."""

    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        self.post_ln = cfg.ln_placement == "post"
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, mask: Tensor | None, cache: KVCache | None = None) -> Tensor:
        if self.post_ln:
            x = self.ln_1(x + self.attn(x, mask, cache))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


def position_ids_from_mask(attention_mask: Tensor, past: int, q_len: int) -> Tensor:
    """(B, q_len) positions that skip left padding: the first real token of every row gets position 0."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos[:, past:past + q_len].clamp(min=0)


class GPTModel(nn.Module):
    """The transformer body: token + learned position embeddings, blocks, final LayerNorm → hidden states.
    Without a final LayerNorm (GPT-1) `ln_f` is an identity with no parameters."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.n_embd)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f: nn.Module = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon) if cfg.final_ln else nn.Identity()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        """input_ids (B, T); attention_mask (B, past+T) with 1 = real token, covering cached positions too.

        Returns hidden states (B, T, n_embd) after the final LayerNorm (after the last block for GPT-1).
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.n_ctx:
            raise ValueError(f"sequence length {past + T} exceeds n_ctx={self.config.n_ctx}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = position_ids_from_mask(attention_mask, past, T)
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).unsqueeze(0)
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        masks: dict[int | None, Tensor | None] = {}
        for block in self.h:
            window = block.attn.window
            if window not in masks:
                masks[window] = attention_mask_4d(attention_mask, T, past, window, input_ids.device, B)
            x = block(x, masks[window], cache)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)


class GPT(nn.Module):
    """Language model: GPTModel + LM head tied to the token embedding (GPT §3.1, GPT-2)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = GPTModel(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        init_weights(self, cfg)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        """Logits (B, T, vocab)."""
        return self.lm_head(self.transformer(input_ids, attention_mask, position_ids, cache))

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        cfg = self.config
        p = self.lm_head.weight
        return KVCache(cfg.n_layer, batch, cfg.n_head, max_len, cfg.head_dim, p.dtype, p.device)


def init_weights(model: nn.Module, cfg: GPTConfig) -> None:
    """N(0, 0.02) weights, zero biases; residual projections (attn.c_proj, mlp.c_proj) get std 0.02/√(2·n_layer)
    — GPT-2 §2.3: "scale the weights of residual layers at initialization by 1/√N"."""
    std = cfg.initializer_range
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            scale = 1 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj") else 1.0
            nn.init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
