"""T5 (Raffel et al. 2020 §2.1) against transformers' T5ForConditionalGeneration (an implementation nobody here
wrote) on the same random weights: logits with padding, greedy generations, checkpoints both ways; the
encoder-decoder cache against recomputation; sampling against a naive no-cache loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from models.config import ModelConfigError, T5Config
from models.generation import SamplingParams, row_seeds, sample_next
from models.t5 import T5, T5LayerNorm, relative_position_bucket
from models.t5_checkpoint import load_t5, save_t5
from models.t5_generation import t5_generate

V10 = T5Config.from_name("t5-nano", vocab_size=97)
V11 = T5Config.from_name("t5-nano", vocab_size=97, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                         num_decoder_layers=3)


def hf_t5(cfg: T5Config, seed: int) -> transformers.T5ForConditionalGeneration:
    torch.manual_seed(seed)
    fields = {k: v for k, v in cfg.to_dict().items() if k != "n_ctx"}
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**fields)).eval()
    with torch.no_grad():  # norms start at 1: perturb them so a misplaced norm shows
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 97, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    dec = torch.randint(2, 97, (3, 8), generator=g)
    dec_mask = torch.ones_like(dec)
    dec_mask[2, 6:] = 0
    return ids, mask, dec, dec_mask


def test_relative_position_buckets_match_transformers() -> None:
    rel = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for buckets, dist in ((32, 128), (8, 16)):
            theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=dist)
            assert torch.equal(relative_position_bucket(rel, bidirectional, buckets, dist), theirs)
    # hand-worked: 32 bidirectional buckets → 16 per direction, offsets 0..7 exact, ≥ 128 in the last bucket
    assert relative_position_bucket(torch.tensor([0, 3, -3, 500, -500]), True, 32, 128).tolist() == [0, 19, 3, 31, 15]


def test_layer_norm_is_rms_without_bias_or_mean() -> None:
    ln = T5LayerNorm(4, eps=0.0)
    assert [n for n, _ in ln.named_parameters()] == ["weight"]
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    torch.testing.assert_close(ln(x), x / (30 / 4) ** 0.5)
    assert (ln(x + 1) - ln(x)).abs().max() > 0.01  # no mean subtraction: a shift changes the output


@pytest.mark.parametrize("seed", [0, 1])
def test_v10_logits_match_transformers(seed: int) -> None:
    hf = hf_t5(V10, seed)
    ours = T5(V10).eval()
    ours.load_state_dict(hf.state_dict())
    assert ours.lm_head.weight is ours.shared.weight is ours.encoder.embed_tokens.weight
    ids, mask, dec, dec_mask = batch(seed)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
        torch.testing.assert_close(ours(ids, mask, dec, dec_mask), theirs, atol=1e-5, rtol=1e-5)


def test_relative_bias_lives_in_the_first_layer_of_each_stack() -> None:
    names = [n for n, _ in T5(V11).named_parameters() if "relative_attention_bias" in n]
    assert names == ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                     "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]


@pytest.mark.parametrize("cfg", [V10, V11], ids=["v1.0", "v1.1"])
def test_checkpoint_loads_in_transformers_with_equal_logits_and_greedy_generations(cfg: T5Config,
                                                                                  tmp_path: Path) -> None:
    torch.manual_seed(3)
    ours = T5(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith((".o.weight", ".wo.weight")):  # at init a decoder echoes its input token; mix more
                p.mul_(8.0)
    save_t5(ours, tmp_path / "t5")
    data = json.loads((tmp_path / "t5" / "config.json").read_text())
    assert data["model_type"] == "t5" and data["tie_word_embeddings"] == cfg.tie_word_embeddings
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "t5").eval()
    assert (hf.lm_head.weight is hf.shared.weight) == cfg.tie_word_embeddings
    ids, mask, dec, dec_mask = batch(4)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
        torch.testing.assert_close(ours(ids, mask, dec, dec_mask), theirs, atol=1e-5, rtol=1e-5)
        hf_gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                             use_cache=False)  # transformers' cache assumes num_decoder_layers == num_layers
    mine = t5_generate(ours, ids, mask, SamplingParams(max_new_tokens=12, temperature=0))
    assert mine.sequences.tolist() == hf_gen.tolist()
    assert len(set(mine.sequences[:, 1:].flatten().tolist())) >= 4  # not a degenerate constant output
    # and back: our loader reads what we (and transformers) wrote
    hf.save_pretrained(tmp_path / "hf")
    for d in ("t5", "hf"):
        back = load_t5(tmp_path / d).eval()
        assert back.config.tie_word_embeddings == cfg.tie_word_embeddings
        with torch.no_grad():
            torch.testing.assert_close(back(ids, mask, dec, dec_mask), ours(ids, mask, dec, dec_mask), atol=0, rtol=0)


def test_cached_decoding_equals_recomputation() -> None:
    torch.manual_seed(5)
    model = T5(V11).eval()
    ids, mask, dec, _ = batch(5)
    with torch.no_grad():
        full = model(ids, mask, dec)
        enc = model.encode(ids, mask)
        cache = model.new_cache(3, dec.shape[1])
        steps = [model.decode(dec[:, t:t + 1], enc, mask, cache=cache) for t in range(dec.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_sampling_equals_a_naive_loop_and_rows_are_independent() -> None:
    torch.manual_seed(6)
    model = T5(V10).eval()
    ids, mask, _, _ = batch(6)
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.95)
    out = t5_generate(model, ids, mask, params, seeds=[11, 12, 13], eos_id=-1)  # -1: never stop early
    # naive: no cache, the full decoder over the whole prefix at every step, one row at a time
    for row, seed in enumerate((11, 12, 13)):
        seq = [V10.decoder_start_token_id]
        with torch.no_grad():
            for t in range(10):
                logits = model(ids[row:row + 1], mask[row:row + 1], torch.tensor([seq]))[:, -1]
                seq.append(int(sample_next(logits, params, row_seeds([seed], 1), t)[0][0]))
        assert out.sequences[row].tolist() == seq
    alone = t5_generate(model, ids[1:2], mask[1:2], params, seeds=[12], eos_id=-1)
    assert alone.sequences[0].tolist() == out.sequences[1].tolist()
    assert (out.logprobs < 0).all() and out.response_mask.all()


def test_bad_config_names_the_field() -> None:
    with pytest.raises(ModelConfigError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="swish")
    with pytest.raises(ModelConfigError, match="eos_token_id"):
        T5Config(vocab_size=10, eos_token_id=10)
