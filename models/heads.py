"""Heads that attach to the transformer's hidden states: a scalar reward on the last real token, and a
per-token value. Parameter names match Hugging Face's `GPT2ForSequenceClassification` (`transformer.*`,
`score.weight`, no bias), so a reward or value checkpoint loads there with num_labels=1.

InstructGPT §3.5: the reward model starts from the SFT model "with the final unembedding layer removed" and
outputs a scalar; the value function of PPO is initialised from the reward model (§3.5, "RL").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.config import GPTConfig
from models.gpt import GPTModel, init_weights


def last_token_index(attention_mask: Tensor) -> Tensor:
    """(B,) index of the rightmost real token of each row; works for left and right padding."""
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


class ScalarHeadModel(nn.Module):
    """GPTModel + `score` = Linear(n_embd, 1, bias=False). Subclasses choose which tokens are read."""

    kind = "scalar"

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = GPTModel(cfg)
        self.score = nn.Linear(cfg.n_embd, 1, bias=False)
        init_weights(self, cfg)
        # A small head keeps initial rewards/values near 0 (as a fresh head should).
        nn.init.normal_(self.score.weight, std=1.0 / (cfg.n_embd + 1))

    def token_scores(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T) scalar for every position."""
        return self.score(self.transformer(input_ids, attention_mask)).squeeze(-1)


class RewardModel(ScalarHeadModel):
    """r(x, y): the score at the last non-padding token of prompt+response."""

    kind = "reward"

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B,) rewards."""
        scores = self.token_scores(input_ids, attention_mask)
        if attention_mask is None:
            return scores[:, -1]
        return scores.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)


class ValueModel(ScalarHeadModel):
    """V(s_t) for every token position (the PPO critic)."""

    kind = "value"

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T) values."""
        return self.token_scores(input_ids, attention_mask)
