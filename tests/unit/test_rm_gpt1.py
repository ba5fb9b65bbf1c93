"""A GPT-1 reward model (post-LN blocks, no final LayerNorm): the reward normalisation folds into the last
block's ln_2 bias — the LayerNorm that produces the head's input — and shifts every score by exactly −offset;
a layout whose head input does not end in a LayerNorm is refused by name."""

from __future__ import annotations

import pytest
import torch

from actors.reward import score_sequences
from jobs.rlhf.reward_model import fold_reward_offset, offset_norm_name
from models.config import GPTConfig
from models.heads import RewardModel

GPT1 = GPTConfig.from_name("gpt1", n_layer=3, n_embd=32, n_head=4, n_ctx=32, vocab_size=97)
SEQS = [[1, 2, 3, 0], [4, 5, 0], [6, 7, 8, 9, 10, 0]]


def test_gpt1_offset_folds_into_the_last_ln_2() -> None:
    torch.manual_seed(2)
    rm = RewardModel(GPT1).eval()
    assert offset_norm_name(GPT1) == "transformer.h.2.ln_2"
    before = score_sequences(rm, SEQS, eos_id=0)
    other = {k: v.clone() for k, v in rm.state_dict().items()}
    offset = float(before.mean()) + 0.7
    fold_reward_offset(rm, offset)
    torch.testing.assert_close(score_sequences(rm, SEQS, eos_id=0), before - offset, rtol=0, atol=1e-5)
    changed = [k for k, v in rm.state_dict().items() if not torch.equal(v, other[k])]
    assert changed == ["transformer.h.2.ln_2.bias"]


def test_gpt2_keeps_ln_f_and_bad_layouts_are_refused() -> None:
    assert offset_norm_name(GPTConfig.from_name("nano")) == "transformer.ln_f"
    with pytest.raises(ValueError, match="^init_from:"):
        offset_norm_name(GPTConfig.from_name("nano", final_ln=False))
