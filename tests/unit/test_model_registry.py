"""models/registry.py: one build/save/load path for every architecture, dispatching on config class and
config.json's model_type; models/config.py's arch names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.config import ElmoConfig, GPTConfig, ModelConfigError, T5Config, arch_of, config_class
from models.elmo import ELMo
from models.gpt import GPT
from models.registry import (
    T5_SENTINELS,
    build_model,
    check_parallel,
    load_model,
    model_vocab_size,
    pretrain_loss,
    save_model,
)
from models.t5 import T5
from models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(["Shall I compare thee to a summer's day?"] * 20, vocab_size=300)


@pytest.mark.parametrize("cfg", [
    GPTConfig.from_name("nano", vocab_size=300),
    GPTConfig.from_name("gpt1", n_layer=2, n_embd=32, n_head=2, n_ctx=32, vocab_size=300),
    T5Config.from_name("t5-nano", vocab_size=300),
    T5Config.from_name("t5-nano", vocab_size=300, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    ElmoConfig.from_name("elmo-nano", vocab_size=300),
], ids=["gpt2", "gpt1", "t5-v1.0", "t5-v1.1", "elmo"])
def test_build_save_load_roundtrip(cfg, tok: Tokenizer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(cfg, tok).eval()
    assert isinstance(model, {"gpt": GPT, "t5": T5, "elmo": ELMo}[arch_of(cfg)])
    assert config_class(arch_of(cfg)) is type(cfg)
    back = load_model(save_model(model, tmp_path / "m", tokenizer=tok)).eval()
    assert type(back) is type(model) and back.config == cfg
    ids = torch.tensor([tok.encode("compare thee to a summer")])
    with torch.no_grad():
        if isinstance(model, T5):
            out, out2 = model(ids, None, ids), back(ids, None, ids)
        elif isinstance(model, ELMo):
            out, out2 = model.layers(ids), back.layers(ids)
        else:
            out, out2 = model(ids), back(ids)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)


def test_config_dicts_round_trip_and_unknown_names_are_errors() -> None:
    for cls, preset in ((T5Config, "t5-v1_1-base"), (ElmoConfig, "elmo"), (GPTConfig, "gpt1")):
        cfg = cls.from_name(preset)
        assert cls.from_dict(cfg.to_dict()) == cfg
    assert "arch" not in GPTConfig().to_dict()  # GPT config dicts (and checkpoint fingerprints) are unchanged
    with pytest.raises(ModelConfigError, match="arch"):
        config_class("bert")
    with pytest.raises(ModelConfigError, match="preset"):
        T5Config.from_name("t5-xxl")
    with pytest.raises(ModelConfigError, match="d_kv"):
        T5Config.from_dict({"d_kv": 0})
    with pytest.raises(ModelConfigError, match="filters"):
        ElmoConfig(filters=((9, 4),), max_bytes=8)


@pytest.mark.parametrize("cfg", [
    GPTConfig.from_name("nano", vocab_size=400),
    T5Config.from_name("t5-nano", vocab_size=400),
    ElmoConfig.from_name("elmo-nano", vocab_size=400),
], ids=["gpt", "t5", "elmo"])
def test_pretrain_loss_trains_every_architecture(cfg, tok: Tokenizer) -> None:
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    text = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 3
    ids = torch.tensor(tok.encode(text)[:48]).view(2, 24)
    assert model_vocab_size("t5", tok.vocab_size) == tok.vocab_size + T5_SENTINELS <= 400  # sentinels above text
    losses = []
    for step in range(15):
        loss, _ = pretrain_loss(model, ids, seed=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_unsupported_parallel_layouts_are_named() -> None:
    check_parallel("gpt", tensor=2, pipeline=2)
    check_parallel("t5", tensor=1, pipeline=1)
    with pytest.raises(ModelConfigError, match="parallel.tensor"):
        check_parallel("t5", tensor=2, pipeline=1)
    with pytest.raises(ModelConfigError, match="parallel.pipeline"):
        check_parallel("elmo", tensor=1, pipeline=2)
