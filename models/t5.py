"""T5: the text-to-text encoder-decoder transformer (Raffel et al. 2020, "Exploring the Limits of Transfer Learning
with a Unified Text-to-Text Transformer", §2.1).

§2.1 departs from the original Transformer (Vaswani et al. 2017) in three ways, all here:
- layer normalisation "only rescales the activations and no additive bias is applied" — `T5LayerNorm` divides by
  the root mean square (no mean subtraction, no bias) — and it sits at the input of each sub-block (pre-LN), with
  a final one after each stack;
- no absolute position embeddings: a scalar bias per head is added to every attention logit, looked up by the
  bucketed key−query offset (`relative_position_bucket`: 32 buckets, exact for small offsets, logarithmic up to
  128, bidirectional in the encoder, causal in the decoder). It is computed in the first layer of each stack and
  shared by all that stack's layers ("we share the position embedding parameters across all layers");
- attention logits are not scaled by 1/√d_k (the initialisation absorbs it).
T5 v1.0 shares one embedding matrix between encoder input, decoder input and the LM head (the head reads
decoder outputs rescaled by d_model**-0.5); T5 v1.1 uses a GEGLU feed-forward and an untied head (T5Config).

Parameter names equal transformers' `T5ForConditionalGeneration`, so `models/t5_checkpoint.py` reads and writes
its directories directly. Generation (greedy / sampled, encoder-decoder KV cache) is `models/t5_generation.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import T5Config


class T5LayerNorm(nn.Module):
    """y = w · x / √(mean(x²) + ε): RMS normalisation, no mean subtraction, no bias (§2.1). Accumulates in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        y = x.float() * torch.rsqrt(variance + self.eps)
        return self.weight * y.to(self.weight.dtype)


def relative_position_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Tensor:
    """Bucket of each key−query offset (§2.1; Mesh TensorFlow's `_relative_position_bucket`). Long tensor of any
    shape → same shape, values in [0, num_buckets).

    Bidirectional: half the buckets for keys after the query, half for keys before. Within a direction, half of
    the buckets are exact offsets 0..n/2−1, the rest cover n/2..max_distance logarithmically; farther offsets
    share the last bucket. Causal (decoder): only offsets ≤ 0 occur; positive ones map to bucket 0.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # float division by max_exact, then log-spaced between max_exact and max_distance (truncated toward zero)
    large = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


def additive_bias(position_bias: Tensor | None, allowed: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Attention logit bias: position bias (1, H, T, S), replaced by the dtype's minimum where `allowed`
    (B|1, 1, T|1, S) is False → (B|1, H|1, T|1, S). A masked logit is set to the minimum, not decremented by it,
    so two masks cannot overflow to −inf (a row with one real key stays finite)."""
    if allowed is None:
        return position_bias
    if position_bias is None:
        position_bias = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, position_bias, torch.finfo(dtype).min)


class T5Attention(nn.Module):
    """Multi-head attention without 1/√d scaling; q, k, v, o have no biases. Layer 0 of a stack also owns the
    relative position bias table (num_buckets, num_heads)."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, bidirectional: bool) -> None:
        super().__init__()
        self.n_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.k = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.o = nn.Linear(cfg.inner_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout_rate
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def compute_bias(self, q_len: int, k_len: int, past: int, device: torch.device) -> Tensor:
        """(1, H, q_len, k_len) bias for queries at positions past..past+q_len−1 and keys 0..k_len−1."""
        q_pos = torch.arange(past, past + q_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(k_pos - q_pos, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def project_kv(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """states (B, S, d_model) → k, v each (B, H, S, d_kv)."""
        B, S, _ = states.shape
        k = self.k(states).view(B, S, self.n_heads, self.d_kv).transpose(1, 2)
        v = self.v(states).view(B, S, self.n_heads, self.d_kv).transpose(1, 2)
        return k, v

    def attend(self, x: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """Queries x (B, T, d_model) over k, v (B, H, S, d_kv), additive bias (B|1, H|1, T|1, S) → (B, T, d_model)."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.d_kv).transpose(1, 2)
        if bias is not None:
            bias = bias.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0,
                                           scale=1.0)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.d_kv))


class T5Cache:
    """Decoder cache for incremental decoding: self-attention keys/values pre-allocated to `max_len` steps
    (`self_k[layer]`: (B, H, max_len, d_kv)), and each layer's cross-attention keys/values over the encoder
    output, projected once on the first step (`cross[layer]`: (k, v) each (B, H, S, d_kv))."""

    def __init__(self, n_layer: int, batch: int, n_heads: int, max_len: int, d_kv: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (batch, n_heads, max_len, d_kv)
        self.self_k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.self_v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.cross: list[tuple[Tensor, Tensor] | None] = [None] * n_layer
        self.max_len = max_len
        self.length = 0


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool, bidirectional: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_bias, bidirectional)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: Tensor, bias: Tensor | None, cache: T5Cache | None, layer: int) -> Tensor:
        h = self.layer_norm(x)
        k, v = self.SelfAttention.project_kv(h)
        if cache is not None:
            start, T = cache.length, x.shape[1]
            if start + T > cache.max_len:
                raise ValueError(f"decoder cache: {start + T} steps exceed max_len={cache.max_len}")
            cache.self_k[layer][:, :, start:start + T] = k
            cache.self_v[layer][:, :, start:start + T] = v
            k, v = cache.self_k[layer][:, :, :start + T], cache.self_v[layer][:, :, :start + T]
        return x + self.dropout(self.SelfAttention.attend(h, k, v, bias))


class T5LayerCrossAttention(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.EncDecAttention = T5Attention(cfg, False, True)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: Tensor, enc: Tensor, bias: Tensor | None, cache: T5Cache | None, layer: int) -> Tensor:
        if cache is not None and cache.cross[layer] is not None:
            k, v = cache.cross[layer]  # type: ignore[misc]
        else:
            k, v = self.EncDecAttention.project_kv(enc)
            if cache is not None:
                cache.cross[layer] = (k, v)
        return x + self.dropout(self.EncDecAttention.attend(self.layer_norm(x), k, v, bias))


class T5DenseActDense(nn.Module):
    """v1.0 feed-forward: wo(dropout(relu(wi x)))."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(self.dropout(F.relu(self.wi(x))))


class T5DenseGatedActDense(nn.Module):
    """v1.1 feed-forward (GEGLU, Shazeer 2020): wo(dropout(gelu_tanh(wi_0 x) ⊙ wi_1 x))."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(self.dropout(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        gated = cfg.feed_forward_proj == "gated-gelu"
        self.DenseReluDense: nn.Module = T5DenseGatedActDense(cfg) if gated else T5DenseActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class T5Block(nn.Module):
    """Encoder block: [self-attention, FF]; decoder block: [causal self-attention, cross-attention, FF]."""

    def __init__(self, cfg: T5Config, decoder: bool, has_bias: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [T5LayerSelfAttention(cfg, has_bias, bidirectional=not decoder)]
        if decoder:
            layers.append(T5LayerCrossAttention(cfg))
        layers.append(T5LayerFF(cfg))
        self.layer = nn.ModuleList(layers)

    def forward(self, x: Tensor, self_bias: Tensor | None, enc: Tensor | None, cross_bias: Tensor | None,
                cache: T5Cache | None, index: int) -> Tensor:
        x = self.layer[0](x, self_bias, cache, index)
        if enc is not None:
            x = self.layer[1](x, enc, cross_bias, cache, index)
        return self.layer[-1](x)


class T5Stack(nn.Module):
    """Embedding (shared module) → dropout → blocks → final T5LayerNorm → dropout."""

    def __init__(self, cfg: T5Config, embed_tokens: nn.Embedding, decoder: bool) -> None:
        super().__init__()
        self.is_decoder = decoder
        self.embed_tokens = embed_tokens
        n = cfg.n_decoder_layers if decoder else cfg.num_layers
        self.block = nn.ModuleList(T5Block(cfg, decoder, has_bias=i == 0) for i in range(n))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, enc: Tensor | None = None,
                enc_mask: Tensor | None = None, cache: T5Cache | None = None) -> Tensor:
        """input_ids (B, T); attention_mask (B, past+T) 1 = real (None = all real); enc (B, S, d) and enc_mask
        (B, S) for the decoder's cross-attention. → hidden (B, T, d_model)."""
        B, T = input_ids.shape
        x = self.dropout(self.embed_tokens(input_ids))
        past = cache.length if cache is not None else 0
        device = x.device
        # relative position bias from layer 0's table, shared by every layer of this stack (§2.1)
        position_bias = self.block[0].layer[0].SelfAttention.compute_bias(T, past + T, past, device)
        allowed = None
        if self.is_decoder:
            q_pos = torch.arange(past, past + T, device=device)[:, None]
            allowed = (torch.arange(past + T, device=device)[None, :] <= q_pos)[None, None]  # (1, 1, T, past+T)
        if attention_mask is not None:
            keys = attention_mask[:, None, None, :past + T].bool()
            allowed = keys if allowed is None else allowed & keys
        self_bias = additive_bias(position_bias, allowed, x.dtype)
        cross_bias = None
        if enc is not None and enc_mask is not None:
            cross_bias = additive_bias(None, enc_mask[:, None, None, :].bool(), x.dtype)
        for i, block in enumerate(self.block):
            x = block(x, self_bias, enc, cross_bias, cache, i)
        if cache is not None:
            cache.length += T
        return self.dropout(self.final_layer_norm(x))


class T5(nn.Module):
    """T5ForConditionalGeneration: `forward` gives decoder logits (B, T, vocab) for teacher forcing."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, self.shared, decoder=False)
        self.decoder = T5Stack(cfg, self.shared, decoder=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight
        init_t5_weights(self, cfg)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids (B, S), attention_mask (B, S) → encoder states (B, S, d_model)."""
        return self.encoder(input_ids, attention_mask)

    def decode(self, decoder_input_ids: Tensor, enc: Tensor, enc_mask: Tensor | None,
               decoder_attention_mask: Tensor | None = None, cache: T5Cache | None = None) -> Tensor:
        """Decoder logits (B, T, vocab). With a cache, decoder_input_ids are the new steps only."""
        h = self.decoder(decoder_input_ids, decoder_attention_mask, enc, enc_mask, cache)
        if self.config.tie_word_embeddings:
            h = h * self.config.d_model ** -0.5  # v1.0: rescale before the tied (shared) embedding matrix
        return self.lm_head(h)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, decoder_input_ids: Tensor,
                decoder_attention_mask: Tensor | None = None) -> Tensor:
        """input_ids/attention_mask (B, S) → encoder; decoder_input_ids (B, T) (targets shifted right, see
        `models.span_corruption.shift_right`) → logits (B, T, vocab)."""
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask,
                           decoder_attention_mask)

    def new_cache(self, batch: int, max_len: int) -> T5Cache:
        cfg, p = self.config, self.lm_head.weight
        return T5Cache(cfg.n_decoder_layers, batch, cfg.num_heads, max_len, cfg.d_kv, p.dtype, p.device)


def init_t5_weights(model: nn.Module, cfg: T5Config) -> None:
    """Mesh TensorFlow's initialisation (as in transformers): embeddings N(0, f); q N(0, f·(d·d_kv)^−½); k, v, wi
    N(0, f·d^−½); o N(0, f·(H·d_kv)^−½); wo N(0, f·d_ff^−½); relative bias N(0, f·d^−½); norms 1."""
    f, d = cfg.initializer_factor, cfg.d_model
    std = {"q": f * (d * cfg.d_kv) ** -0.5, "k": f * d ** -0.5, "v": f * d ** -0.5, "wi": f * d ** -0.5,
           "wi_0": f * d ** -0.5, "wi_1": f * d ** -0.5, "o": f * cfg.inner_dim ** -0.5, "wo": f * cfg.d_ff ** -0.5,
           "relative_attention_bias": f * d ** -0.5, "shared": f, "lm_head": f}
    with torch.no_grad():
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, T5LayerNorm):
                module.weight.fill_(f)
            elif isinstance(module, (nn.Linear, nn.Embedding)) and leaf in std:
                if leaf == "lm_head" and cfg.tie_word_embeddings:
                    continue
                module.weight.normal_(0.0, std[leaf])
