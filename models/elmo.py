"""ELMo's bidirectional language model and its contextual features (Peters et al. 2018, "Deep contextualized word
representations", §3).

- Token representation x_k (§3.4, after Jozefowicz et al. 2016 / Kim et al. 2016): a character CNN over the
  *bytes* of each token — our tokens are byte-level BPE pieces, so a token's characters are its UTF-8 bytes
  (`byte_table` holds them, begin/end-of-token markers included). Byte embeddings → 1-D convolutions of several
  widths → max-pool over the bytes → ReLU → highway layers → linear projection to d_model. Context-independent,
  open-vocabulary: a rare token is represented by its spelling.
- biLM (§3.1): L layers of forward LSTMs over x_1..x_N and L layers of backward LSTMs over x_N..x_1, each with a
  projection back to d_model (LSTMP), a residual connection between LSTM layers (§3.4) and dropout. Token
  representation and softmax are shared by both directions ("we tie the parameters for both the token
  representation (Θx) and Softmax layer (Θs) in the forward and backward direction"); the LSTMs are separate.
- Objective: the forward model predicts token k+1 from h→_k, the backward model token k−1 from h←_k;
  `bilm_loss` is the mean of the two directions' token-mean NLLs (eq. 1 maximises their sum).
- ELMo (§3.2, eq. 1): R_k = {x_k; x_k} ∪ {[h→_kj; h←_kj] : j = 1..L} (`ELMo.layers`, layer 0 duplicated to the
  biLSTM width as the paper does), and ELMo_k = γ · Σ_j softmax(s)_j · h_kj (`ScalarMix`), with s and γ learned
  by the downstream task while the biLM stays frozen. `models/elmo_probe.py` trains such a task model.

Padding: right padding only (each row's real tokens first); the backward LSTM reads each row's real tokens
reversed, so padding never reaches a real position in either direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ElmoConfig
from models.losses import Metrics, lm_loss

PAD_BYTE, BOW, EOW = 0, 1, 2  # byte ids: 0 padding, 1/2 begin/end of token, byte b → b + 3
N_BYTE_IDS = 256 + 3


def byte_table(token_bytes: Sequence[bytes], max_bytes: int) -> Tensor:
    """(V, max_bytes) long: row i = [BOW, bytes of token i (cut to max_bytes − 2), EOW, 0, ...]."""
    if max_bytes < 3:
        raise ValueError(f"max_bytes: must be >= 3 (begin, one byte, end), got {max_bytes}")
    table = torch.zeros(len(token_bytes), max_bytes, dtype=torch.long)
    for i, b in enumerate(token_bytes):
        row = [BOW, *(x + 3 for x in b[:max_bytes - 2]), EOW]
        table[i, :len(row)] = torch.tensor(row)
    return table


def tokenizer_bytes(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """Bytes of every id < vocab_size from a models.tokenizer.Tokenizer (ids it lacks get b"")."""
    return [tokenizer.decode_bytes(i) if i < tokenizer.vocab_size else b"" for i in range(vocab_size)]


class Highway(nn.Module):
    """y = g ⊙ x + (1 − g) ⊙ relu(W_h x), g = σ(W_g x) (Srivastava et al. 2015), one Linear for both."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * dim)
        nn.init.constant_(self.proj.bias[dim:], 1.0)  # start near the identity (carry gate open)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        g = torch.sigmoid(gate)
        return g * x + (1 - g) * F.relu(h)


class ByteCNN(nn.Module):
    """Token bytes (..., max_bytes) → context-independent token representation (..., d_model)."""

    def __init__(self, cfg: ElmoConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(N_BYTE_IDS, cfg.byte_dim, padding_idx=PAD_BYTE)
        self.convs = nn.ModuleList(nn.Conv1d(cfg.byte_dim, n, w) for w, n in cfg.filters)
        self.highways = nn.ModuleList(Highway(cfg.n_filters) for _ in range(cfg.n_highway))
        self.proj = nn.Linear(cfg.n_filters, cfg.d_model)

    def forward(self, byte_ids: Tensor) -> Tensor:
        shape = byte_ids.shape[:-1]
        e = self.embed(byte_ids.reshape(-1, byte_ids.shape[-1])).transpose(1, 2)  # (N, byte_dim, max_bytes)
        h = torch.cat([F.relu(conv(e).max(dim=-1).values) for conv in self.convs], dim=-1)  # (N, n_filters)
        for hw in self.highways:
            h = hw(h)
        return self.proj(h).view(*shape, -1)


def reverse_padded(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse the first lengths[b] positions of every row of x (B, T, ...), padding stays in place. Its own
    inverse."""
    T = x.shape[1]
    t = torch.arange(T, device=x.device)[None, :]
    idx = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)  # (B, T)
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x))


def lengths_of(attention_mask: Tensor | None, batch: int, T: int, device: torch.device) -> Tensor:
    """(B,) lengths of right-padded rows; ValueError if a row has padding before a real token."""
    if attention_mask is None:
        return torch.full((batch,), T, dtype=torch.long, device=device)
    lengths = attention_mask.long().sum(1)
    if not torch.equal(attention_mask.long(), (torch.arange(T, device=device)[None, :] < lengths[:, None]).long()):
        raise ValueError("attention_mask: ELMo expects right padding (every row's real tokens first)")
    return lengths


class ELMo(nn.Module):
    """The biLM. `forward` → (forward logits, backward logits), each (B, T, vocab); `layers` → ELMo's L+1
    representations for the features API."""

    def __init__(self, cfg: ElmoConfig, token_bytes: Tensor | None = None) -> None:
        super().__init__()
        self.config = cfg
        if token_bytes is None:
            raise ValueError("token_bytes: ELMo's byte-CNN needs each token's bytes (models.elmo.byte_table of "
                             "the tokenizer: tokenizer_bytes(tok, vocab_size))")
        if tuple(token_bytes.shape) != (cfg.vocab_size, cfg.max_bytes):
            raise ValueError(f"token_bytes: shape {tuple(token_bytes.shape)}, config implies "
                             f"({cfg.vocab_size}, {cfg.max_bytes})")
        self.register_buffer("token_bytes", token_bytes.long().clone())
        self.token_encoder = ByteCNN(cfg)
        lstm = dict(input_size=cfg.d_model, hidden_size=cfg.lstm_dim, proj_size=cfg.d_model, batch_first=True)
        self.forward_lstms = nn.ModuleList(nn.LSTM(**lstm) for _ in range(cfg.n_layer))  # type: ignore[arg-type]
        self.backward_lstms = nn.ModuleList(nn.LSTM(**lstm) for _ in range(cfg.n_layer))  # type: ignore[arg-type]
        self.dropout = nn.Dropout(cfg.dropout)
        self.softmax = nn.Linear(cfg.d_model, cfg.vocab_size)  # Θs, shared by both directions

    def token_representation(self, input_ids: Tensor) -> Tensor:
        """x_k: (B, T) → (B, T, d_model), context-independent."""
        return self.token_encoder(self.token_bytes[input_ids])

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None
                      ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """(x (B, T, d), [h→_j (B, T, d)]_{j=1..L}, [h←_j (B, T, d)]_{j=1..L}); h←_j[k] has read tokens k..N."""
        B, T = input_ids.shape
        lengths = lengths_of(attention_mask, B, T, input_ids.device)
        x = self.token_representation(input_ids)
        fwd = self._stack(self.forward_lstms, x)
        bwd = [reverse_padded(h, lengths) for h in self._stack(self.backward_lstms, reverse_padded(x, lengths))]
        return x, fwd, bwd

    def _stack(self, lstms: nn.ModuleList, x: Tensor) -> list[Tensor]:
        outs, h = [], self.dropout(x)
        for j, lstm in enumerate(lstms):
            y = lstm(h)[0]
            h = self.dropout(y + h if j > 0 else y)  # residual between LSTM layers (§3.4)
            outs.append(h)
        return outs

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(forward logits, backward logits), each (B, T, vocab): position k of the forward logits predicts token
        k+1, of the backward logits token k−1 (see `bilm_loss`)."""
        _, fwd, bwd = self.hidden_states(input_ids, attention_mask)
        return self.softmax(fwd[-1]), self.softmax(bwd[-1])

    def layers(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """ELMo's representations R_k (§3.2): (L+1, B, T, 2·d_model), layer 0 = [x; x], layer j = [h→_j; h←_j]."""
        x, fwd, bwd = self.hidden_states(input_ids, attention_mask)
        return torch.stack([torch.cat([x, x], -1)] + [torch.cat([f, b], -1) for f, b in zip(fwd, bwd)])


class ScalarMix(nn.Module):
    """ELMo_k = γ · Σ_j softmax(s)_j · h_kj (Peters et al. 2018 eq. 1): s (J,) and γ learned by the task."""

    def __init__(self, n_layers: int) -> None:
        super().__init__()
        self.scalar_parameters = nn.Parameter(torch.zeros(n_layers))
        self.gamma = nn.Parameter(torch.ones(()))

    @property
    def weights(self) -> Tensor:
        """softmax(s): (J,), sums to 1."""
        return self.scalar_parameters.softmax(0)

    def forward(self, layers: Tensor) -> Tensor:
        """layers (J, ...) → (...)."""
        if layers.shape[0] != self.scalar_parameters.numel():
            raise ValueError(f"layers: {layers.shape[0]} layers, the mix has {self.scalar_parameters.numel()}")
        w = self.weights.view(-1, *([1] * (layers.dim() - 1)))
        return self.gamma * (w * layers).sum(0)


def bilm_loss(fwd_logits: Tensor, bwd_logits: Tensor, input_ids: Tensor,
              attention_mask: Tensor | None = None) -> tuple[Tensor, Metrics]:
    """Mean of the forward and backward LMs' token-mean NLLs (§3.1).

    fwd_logits, bwd_logits (B, T, V); input_ids (B, T); attention_mask (B, T) right padding, 1 = real.
    Forward: position k predicts input_ids[k+1], counted when k+1 is real (with right padding k is then real);
    backward: position k predicts input_ids[k−1], counted when k is real (then k−1 is). Both use mask[:, 1:].
    → (loss, {"fwd_nll", "bwd_nll"}).
    """
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    fwd = lm_loss(fwd_logits[:, :-1], input_ids[:, 1:], mask[:, 1:])
    bwd = lm_loss(bwd_logits[:, 1:], input_ids[:, :-1], mask[:, 1:])
    return 0.5 * (fwd + bwd), {"fwd_nll": fwd.detach(), "bwd_nll": bwd.detach()}
