"""`raygpt pretrain`'s per-architecture objectives (jobs/pretrain.py `Objective`) and its arch × layout errors.

The job's T5 and ELMo batches + losses are checked against `models.registry.pretrain_loss`, the models package's
own statement of each objective on the same windows (T5: the same span-corruption seed), and the T5 transform
is checked to be a pure function of (data seed, step, data rank) — what makes a resumed run exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.config import ConfigError, load_config
from jobs.pretrain import VALIDATION_STEP, Objective, PretrainConfig, _lm_batch, t5_seed
from models.config import ElmoConfig, GPTConfig, T5Config
from models.elmo import ELMo, byte_table
from models.gpt import GPT
from models.registry import pretrain_loss
from models.t5 import T5

V, SEQ, ROWS = 64, 64, 3  # 64 tokens: 10 noise tokens in 3 spans (one span would sit at the end)


def _block(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, V, size=(ROWS, SEQ + 1), dtype=np.int64)


def _t5() -> tuple[T5, T5Config]:
    cfg = T5Config.from_name("t5-nano", vocab_size=V + 100, eos_token_id=0, pad_token_id=0,
                             decoder_start_token_id=0, n_ctx=SEQ)
    torch.manual_seed(0)
    return T5(cfg).eval(), cfg


def test_gpt_batch_is_the_unchanged_lm_batch() -> None:
    block = _block()
    obj = Objective("gpt", GPTConfig.from_name("nano", vocab_size=V), SEQ, 5, 0, 1, ROWS)
    got, want = obj.batch(block, 7), _lm_batch(block)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert obj.tokens == ROWS * SEQ


def test_t5_objective_equals_registry_pretrain_loss() -> None:
    model, cfg = _t5()
    block = _block()
    obj = Objective("t5", cfg, SEQ, data_seed=5, dp_rank=1, dp_size=2, rows=ROWS)
    batch = obj.batch(block, 4)
    loss, _ = obj.loss_fn(model, batch)
    want, _ = pretrain_loss(model, torch.from_numpy(block[:, :SEQ]), t5_seed(5, 4, 1, 2, ROWS))
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    # fixed-length windows corrupt to fixed lengths: no padding anywhere
    assert bool(batch["attention_mask"].all()) and bool(batch["labels_mask"].all())


def test_t5_transform_is_a_function_of_seed_step_and_rank() -> None:
    _, cfg = _t5()
    block = _block()

    def inputs(seed: int, step: int, rank: int) -> torch.Tensor:
        return Objective("t5", cfg, SEQ, seed, rank, 2, ROWS).batch(block, step)["input_ids"]

    assert torch.equal(inputs(5, 3, 0), inputs(5, 3, 0))  # a resumed run redraws the same spans
    others = [inputs(5, 4, 0), inputs(5, 3, 1), inputs(6, 3, 0), inputs(5, VALIDATION_STEP, 0)]
    assert all(not torch.equal(inputs(5, 3, 0), o) for o in others)
    # row seeds of steps / ranks / validation batches never overlap in the 32 bits torch's generator keeps
    steps = [*range(200), *(VALIDATION_STEP - i for i in range(8))]
    seeds = {(t5_seed(5, s, r, 4, ROWS) + i) % 2**32 for s in steps for r in range(4) for i in range(ROWS)}
    assert len(seeds) == len(steps) * 4 * ROWS


def test_elmo_objective_equals_registry_pretrain_loss() -> None:
    cfg = ElmoConfig.from_name("elmo-nano", vocab_size=V)
    torch.manual_seed(0)
    model = ELMo(cfg, byte_table([bytes([65 + i % 26]) * (1 + i % 3) for i in range(V)], cfg.max_bytes))
    block = _block(1)
    obj = Objective("elmo", cfg, SEQ, 0, 0, 1, ROWS)
    loss, metrics = obj.loss_fn(model, obj.batch(block, 0))
    want, _ = pretrain_loss(model, torch.from_numpy(block[:, :SEQ]), 0)
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    torch.testing.assert_close(loss, 0.5 * (metrics["fwd_nll"] + metrics["bwd_nll"]))


def test_gpt_objective_is_next_token_loss() -> None:
    cfg = GPTConfig.from_name("nano", vocab_size=V, n_ctx=SEQ + 1)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    block = _block()
    obj = Objective("gpt", cfg, SEQ, 0, 0, 1, ROWS)
    loss, _ = obj.loss_fn(model, obj.batch(block, 0))
    want, _ = pretrain_loss(model, torch.from_numpy(block), 0)
    torch.testing.assert_close(loss, want, rtol=0, atol=0)


@pytest.mark.parametrize(("arch", "sets", "field"), [
    ("t5", ["parallel.num_workers=2", "parallel.tensor=2"], "parallel.tensor"),
    ("elmo", ["parallel.num_workers=2", "parallel.pipeline=2"], "parallel.pipeline"),
    ("bert", [], "model.arch"),
])
def test_unsupported_arch_layout_is_a_config_error(arch: str, sets: list[str], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        load_config(PretrainConfig, overrides=[f"model.arch={arch}", *sets])


def test_supported_layouts_load() -> None:
    for arch in ("gpt", "t5", "elmo"):
        cfg = load_config(PretrainConfig, overrides=[f"model.arch={arch}", "parallel.num_workers=2",
                                                     "parallel.zero_stage=3"])
        assert cfg.model.arch == arch
    load_config(PretrainConfig, overrides=["parallel.num_workers=2", "parallel.tensor=2"])  # GPT keeps TP/PP
