"""The model is numerically GPT-2: parity with Hugging Face's GPT2LMHeadModel (an implementation nobody here
wrote), KV-cache decoding equals recomputation, GPT-3's banded attention masks, checkpoint interop."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from models.checkpoint import CheckpointError, from_hf_state_dict, load_checkpoint, save_checkpoint
from models.config import GPTConfig, ModelConfigError
from models.generation import SamplingParams, generate
from models.gpt import GPT, attention_mask_4d
from models.heads import RewardModel

CFG = GPTConfig.from_name("nano", vocab_size=101, n_ctx=48, eos_token_id=100, bos_token_id=100)


def hf_model(cfg: GPTConfig, seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
    )
    return transformers.GPT2LMHeadModel(hf_cfg).eval()


def ours_from_hf(hf: transformers.GPT2LMHeadModel, cfg: GPTConfig) -> GPT:
    model = GPT(cfg).eval()
    sd = from_hf_state_dict(hf.state_dict())
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    model.load_state_dict(sd)
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_logits_match_hf_gpt2(seed: int) -> None:
    hf = hf_model(CFG, seed)
    ours = ours_from_hf(hf, CFG)
    ids = torch.randint(0, CFG.vocab_size, (3, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_hf() -> None:
    hf = hf_model(CFG)
    ours = ours_from_hf(hf, CFG)
    prompt = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    mine = generate(ours, prompt, SamplingParams(max_new_tokens=16, temperature=0))
    assert mine.sequences.tolist() == theirs.tolist()


def test_checkpoint_loads_in_transformers(tmp_path) -> None:
    torch.manual_seed(0)
    ours = GPT(CFG).eval()
    save_checkpoint(ours, tmp_path / "ckpt")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ckpt").eval()
    ids = torch.randint(0, CFG.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
    again = load_checkpoint(tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids))


def test_reward_checkpoint_loads_as_sequence_classifier(tmp_path) -> None:
    torch.manual_seed(0)
    rm = RewardModel(CFG).eval()
    save_checkpoint(rm, tmp_path / "rm")
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    ids = torch.randint(0, 99, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding: HF finds the last non-pad token by pad_token_id
    ids[1, 8:] = CFG.eos_token_id
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits.squeeze(-1), rm(ids, mask), atol=1e-5, rtol=1e-5)


def test_kv_cache_equals_full_recomputation() -> None:
    torch.manual_seed(0)
    for attention in ("dense", "alternating"):
        model = GPT(CFG.replace(attention=attention, local_window=5)).eval()
        ids = torch.randint(0, CFG.vocab_size, (2, 30))
        with torch.no_grad():
            full = model(ids)
            cache = model.new_cache(2, 30)
            parts = [model(ids[:, :11], cache=cache)]
            for t in range(11, 30):
                parts.append(model(ids[:, t:t + 1], cache=cache))
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padding_matches_unpadded() -> None:
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    a = [5, 6, 7, 8, 9, 10]
    b = [11, 12]
    batched = generate(model, [a, b], SamplingParams(max_new_tokens=8, temperature=0.9), seeds=[1, 2])
    alone_b = generate(model, [b], SamplingParams(max_new_tokens=8, temperature=0.9), seeds=[2])
    assert batched.response_ids[1].tolist() == alone_b.response_ids[0].tolist()
    torch.testing.assert_close(batched.logprobs[1], alone_b.logprobs[0], atol=1e-5, rtol=1e-5)


def test_sampled_logprobs_equal_recomputed() -> None:
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    out = generate(model, [[1, 2, 3], [4]], SamplingParams(max_new_tokens=10, temperature=0.7), seeds=0)
    with torch.no_grad():
        logits = model(out.sequences, out.attention_mask)[:, out.prompt_len - 1:-1] / 0.7
    ref = torch.log_softmax(logits, -1).gather(-1, out.response_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs, ref * out.response_mask, atol=1e-5, rtol=1e-5)


def eos_at_position(trigger: int) -> GPT:
    """A model that emits EOS exactly when decoding from absolute position `trigger` and never elsewhere: residual
    features 0 and 1 are zero everywhere (embeddings and every block's output projections write nothing there)
    except a large feature 0 in the position embedding of `trigger`; feature 1 after the final LayerNorm is its
    bias, 1. The EOS row of the (tied) unembedding reads +5·f0 − 10·f1, so the EOS logit is ≈ +30 at `trigger`
    and ≈ −10 at every other position."""
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    with torch.no_grad():
        for emb in (model.transformer.wte.weight, model.transformer.wpe.weight):
            emb[:, :2] = 0.0
        for block in model.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight[:2] = 0.0
                proj.bias[:2] = 0.0
        model.transformer.wpe.weight[trigger, 0] = 50.0
        model.transformer.ln_f.bias[1] = 1.0
        model.lm_head.weight[CFG.eos_token_id] = 0.0
        model.lm_head.weight[CFG.eos_token_id, :2] = torch.tensor([5.0, -10.0])
    return model


@pytest.mark.parametrize("temperature,top_k", [(0.0, 0), (1.0, 0), (0.7, 5)])
def test_eos_stops_rows_and_masks_the_rest(temperature: float, top_k: int) -> None:
    # Prompts of lengths 1..4: position p predicts response token p − L + 1, so the hidden state at the trigger
    # position 6 makes EOS response token 7 − L: rows stop at different steps, 6, 5, 4, 3.
    model = eos_at_position(6)
    prompts = [[1], [2, 3], [4, 5, 6], [7, 8, 9, 10]]
    out = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=temperature, top_k=top_k),
                   eos_id=CFG.eos_token_id, seeds=0)
    ends = [7 - len(p) for p in prompts]
    assert out.response_ids.shape == (4, max(ends) + 1)  # decoding stopped once the last row ended
    for row, mask, end in zip(out.response_ids.tolist(), out.response_mask.tolist(), ends):
        assert row.index(CFG.eos_token_id) == end and CFG.eos_token_id not in row[:end]
        assert mask == [1] * (end + 1) + [0] * (len(row) - end - 1)  # EOS itself counts, the tail is masked
    # the same model without the trigger inside the window never stops: the EOS above is the trigger's doing
    late = generate(eos_at_position(40), prompts, SamplingParams(max_new_tokens=12, temperature=temperature,
                                                                 top_k=top_k), eos_id=CFG.eos_token_id, seeds=0)
    assert late.response_ids.shape == (4, 12) and bool(late.response_mask.all())


def test_same_seed_same_sample_different_seed_differs() -> None:
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9)
    a, b = generate(model, [[1, 2, 3]], p, seeds=7), generate(model, [[1, 2, 3]], p, seeds=7)
    c = generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=12), seeds=8)
    assert a.response_ids.tolist() == b.response_ids.tolist() != c.response_ids.tolist()


def test_banded_mask_is_gpt3_local_attention() -> None:
    mask = attention_mask_4d(None, 6, 0, 3, torch.device("cpu"), 1)[0, 0]
    for i in range(6):
        for j in range(6):
            assert bool(mask[i, j]) == (j <= i and i - j < 3)
    cfg = CFG.replace(attention="alternating", n_layer=4)
    assert [cfg.is_sparse_layer(i) for i in range(4)] == [False, True, False, True]


def test_residual_projection_init_is_scaled() -> None:
    torch.manual_seed(0)
    cfg = GPTConfig.from_name("tiny", n_layer=8)
    model = GPT(cfg)
    std_proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / (2 * 8) ** 0.5) < 0.001


def test_bad_configs_name_the_field() -> None:
    with pytest.raises(ModelConfigError, match="n_embd"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ModelConfigError, match="preset"):
        GPTConfig.from_name("gpt5")
    with pytest.raises(ModelConfigError, match="attn_pdrop"):
        GPTConfig(attn_pdrop=1.5)


def test_prompt_longer_than_context_is_rejected() -> None:
    model = GPT(CFG).eval()
    with pytest.raises(ValueError, match="n_ctx"):
        generate(model, [list(range(60))], SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1, 2]], SamplingParams(max_new_tokens=47))


def test_corrupt_or_missing_checkpoint_files(tmp_path) -> None:
    model = GPT(CFG)
    ckpt = save_checkpoint(model, tmp_path / "c")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(ckpt)
    ckpt2 = save_checkpoint(model, tmp_path / "d")
    data = json.loads((ckpt2 / "config.json").read_text())
    data["n_embd"] = 64
    (ckpt2 / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(ckpt2)
    (ckpt2 / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(ckpt2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "d"]  # no temporary leftovers


@pytest.mark.parametrize("name", ["gpt1", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt3-125m", "gpt3-175b"])
def test_presets_have_published_sizes(name: str) -> None:
    expected = {"gpt1": 117e6, "gpt2": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "gpt2-xl": 1558e6,
                "gpt3-125m": 125e6, "gpt3-175b": 175e9}[name]
    n = GPTConfig.from_name(name).num_params()
    assert abs(n - expected) / expected < 0.05, n
