"""GPT-1 (Radford et al. 2018 §3.1): post-LN blocks, no final LayerNorm, learned positions — against Hugging
Face's OpenAIGPTLMHeadModel (an implementation nobody here wrote) on the same weights, and its checkpoint format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from jobs import export as export_job
from jobs import import_hf as import_job
from models.checkpoint import CheckpointError, check_exportable, from_hf_state_dict, load_checkpoint, save_checkpoint
from models.config import GPTConfig, ModelConfigError
from models.generation import SamplingParams, generate
from models.gpt import GPT
from models.tokenizer import Tokenizer

CFG = GPTConfig.from_name("gpt1", n_layer=2, n_embd=32, n_head=4, n_ctx=40, vocab_size=97,
                          embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


def hf_gpt1(cfg: GPTConfig, seed: int) -> transformers.OpenAIGPTLMHeadModel:
    torch.manual_seed(seed)
    hf_cfg = transformers.OpenAIGPTConfig(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.OpenAIGPTLMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # HF initialises LayerNorms to (1, 0); perturb them so their placement matters
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def ours_from_hf(hf: transformers.OpenAIGPTLMHeadModel, cfg: GPTConfig) -> GPT:
    model = GPT(cfg).eval()
    sd = from_hf_state_dict(hf.state_dict())
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    model.load_state_dict(sd)
    return model


def test_gpt1_preset_is_post_ln_without_final_ln() -> None:
    cfg = GPTConfig.from_name("gpt1")
    assert (cfg.ln_placement, cfg.final_ln, cfg.n_ctx, cfg.vocab_size) == ("post", False, 512, 40478)
    model = GPT(CFG)
    assert not any(n.startswith("transformer.ln_f") for n in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == CFG.num_params()
    # the preset's shape is GPT-1's 117M parameters (Radford et al. 2018 §4.1; 116.5M with tied embeddings)
    assert 116e6 < cfg.num_params() < 118e6
    with pytest.raises(ModelConfigError, match="ln_placement"):
        GPTConfig(ln_placement="middle")


@pytest.mark.parametrize("seed", [0, 1])
def test_logits_match_hf_openai_gpt(seed: int) -> None:
    hf = hf_gpt1(CFG, seed)
    ours = ours_from_hf(hf, CFG)
    ids = torch.randint(0, CFG.vocab_size, (3, 17), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
        # the GPT-2 layout on the same weights is a different function: the LN placement is what is being tested
        pre = GPT(CFG.replace(ln_placement="pre", final_ln=True)).eval()
        pre.load_state_dict({**ours.state_dict(), **{k: v for k, v in pre.state_dict().items() if "ln_f" in k}})
        assert (pre(ids) - ours(ids)).abs().max() > 1e-2


def test_greedy_generation_matches_hf() -> None:
    hf = hf_gpt1(CFG, 2)
    ours = ours_from_hf(hf, CFG)
    prompt = torch.randint(0, CFG.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=14, do_sample=False, eos_token_id=None, pad_token_id=0,
                             use_cache=False)
    mine = generate(ours, prompt, SamplingParams(max_new_tokens=14, temperature=0))
    assert mine.sequences.tolist() == theirs.tolist()


def test_checkpoint_is_an_openai_gpt_directory(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ours = GPT(CFG).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    save_checkpoint(ours, tmp_path / "c")
    data = json.loads((tmp_path / "c" / "config.json").read_text())
    assert data["model_type"] == "openai-gpt" and data["architectures"] == ["OpenAIGPTLMHeadModel"]
    hf = transformers.OpenAIGPTLMHeadModel.from_pretrained(tmp_path / "c").eval()
    ids = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    back = load_checkpoint(tmp_path / "c").eval()
    assert back.config == CFG
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(back(ids), ours(ids), atol=0, rtol=0)


def test_hf_openai_gpt_directory_imports(tmp_path: Path) -> None:
    hf = hf_gpt1(CFG, 4)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_checkpoint(tmp_path / "hf").eval()
    assert (ours.config.ln_placement, ours.config.final_ln) == ("post", False)
    ids = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_banded_model_export_is_refused(tmp_path: Path) -> None:
    cfg = GPTConfig.from_name("nano", vocab_size=300, attention="alternating", local_window=4)
    tok = Tokenizer.train(["Shall I compare thee to a summer's day?"] * 20, vocab_size=300)
    torch.manual_seed(0)
    ckpt = save_checkpoint(GPT(cfg), tmp_path / "ckpt", tokenizer=tok)
    with pytest.raises(CheckpointError, match="banded.*dense"):
        export_job.export(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert export_job.main([str(ckpt), str(tmp_path / "hf")]) == 2
    # the raygpt checkpoint itself keeps the pattern: loading it gives back the banded model
    assert load_checkpoint(ckpt).config.attention == "alternating"
    with pytest.raises(CheckpointError, match="neither GPT-2"):
        check_exportable(CFG.replace(final_ln=True))
    check_exportable(CFG)
    check_exportable(GPTConfig.from_name("nano"))


def test_import_hf_cli_reads_an_openai_gpt_directory(tmp_path: Path) -> None:
    tok = Tokenizer.train(["Shall I compare thee to a summer's day?"] * 20, vocab_size=300)
    hf = hf_gpt1(CFG.replace(vocab_size=tok.vocab_size), 7)
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf" / "tokenizer.json")
    assert import_job.main([str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    ours = load_checkpoint(tmp_path / "ours").eval()
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "openai-gpt"
    ids = torch.tensor([tok.encode("compare thee to a summer's day")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_export_gpt1_loads_with_auto_classes(tmp_path: Path) -> None:
    tok = Tokenizer.train(["Shall I compare thee to a summer's day?"] * 20, vocab_size=300)
    torch.manual_seed(1)
    ours = GPT(CFG.replace(vocab_size=tok.vocab_size)).eval()
    out = export_job.export(save_checkpoint(ours, tmp_path / "c", tokenizer=tok), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "OpenAIGPTLMHeadModel"
    ids = torch.tensor([transformers.AutoTokenizer.from_pretrained(out)("compare thee to a day")["input_ids"]])
    assert ids.tolist() == [tok.encode("compare thee to a day")]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
