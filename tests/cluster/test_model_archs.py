"""Every model of docs/MODELS.md trains through `raygpt pretrain` (Ray Train + DeepSpeed) on the embedded
Shakespeare corpus: GPT-1 (`model.preset=gpt1`), T5 (`model.arch=t5`, span corruption) and ELMo
(`model.arch=elmo`, biLM), each from its configs/pretrain-*-tiny.yaml shortened by --set, in one Ray session.

- each run's held-out loss after a few steps is below its step-0 value, and the export is the architecture's own
  checkpoint format: GPT-1 loads as transformers' OpenAIGPTLMHeadModel and T5 as T5ForConditionalGeneration with
  our logits (within 1e-5), ELMo through models.registry.load_model;
- T5 on 2 data-parallel ZeRO-1 workers resumed from its step-3 checkpoint repeats the uninterrupted run's losses
  and weights (the span-corruption transform is seeded by step and data rank, so the resumed steps corrupt the
  same spans);
- `raygpt sft` fine-tunes that T5 text-to-text (task prefix, T5 §2.4) on the embedded task: held-out loss falls,
  its export loads as T5ForConditionalGeneration with our logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster.metrics import read_metrics
from jobs.pretrain import JOB
from models.registry import load_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_cluster():
    from cluster.runtime import init_ray, shutdown_ray

    init_ray(num_cpus=4)
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    from jobs.data.corpus import load_texts
    from jobs.data.tokens import prepare
    from models.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("data")
    tok = Tokenizer.train(load_texts("shakespeare"), vocab_size=512, min_frequency=2)
    tok.save(root / "tokenizer.json")
    prepare("shakespeare", root / "tokenizer.json", root / "shakespeare", row_tokens=256)
    return root / "shakespeare", root / "tokenizer.json"


def pretrain(config: str, data: tuple[Path, Path], root: Path, name: str, *sets: str) -> Path:
    """`raygpt pretrain --config configs/<config> --set …` (the CLI entry point); returns the run directory."""
    sets = (f"name={name}", f"runs_root={root}", f"data.dir={data[0]}", f"data.tokenizer={data[1]}",
            "data.prepare=false", "data.seq_len=32", "optim.micro_batch_size=4", "optim.warmup_steps=1",
            "optim.lr=3e-3", "log_every=1", "eval.every_n_steps=100", "eval.batches=1", "failure.max_failures=0", *sets)
    argv = ["--config", str(ROOT / "configs" / config), *(a for s in sets for a in ("--set", s))]
    assert JOB.main(argv) == 0
    return root / name


def val_losses(run_dir: Path) -> list[float]:
    return [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.mark.parametrize("config", ["pretrain-gpt1-tiny.yaml", "pretrain-elmo-tiny.yaml"])
def test_tiny_config_trains_and_exports(ray_cluster, dataset, tmp_path, config):
    run_dir = pretrain(config, dataset, tmp_path, "run", "optim.max_steps=8", "parallel.num_workers=1",
                       "checkpoint.every_n_steps=8")
    first, last = val_losses(run_dir)
    assert last < first - 0.1, (first, last)
    model = load_model(run_dir / "checkpoint")
    if "gpt1" in config:
        from transformers import OpenAIGPTLMHeadModel

        assert model.config.ln_placement == "post" and not model.config.final_ln
        hf = OpenAIGPTLMHeadModel.from_pretrained(run_dir / "checkpoint").eval()
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, model.eval()(ids), atol=1e-5, rtol=0)
    else:
        assert type(model).__name__ == "ELMo" and model.config.d_model == 128


@pytest.fixture(scope="module")
def t5_run(ray_cluster, dataset, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("t5")
    return pretrain("pretrain-t5-tiny.yaml", dataset, root, "full", "optim.max_steps=6", "parallel.num_workers=2",
                    "checkpoint.every_n_steps=3", "checkpoint.keep=2", "eval.every_n_steps=6")


def test_t5_trains_and_exports_a_transformers_t5(t5_run):
    from transformers import T5ForConditionalGeneration

    first, *_, last = val_losses(t5_run)
    assert last < first - 0.1, (first, last)
    ours = load_model(t5_run / "checkpoint").eval()
    hf = T5ForConditionalGeneration.from_pretrained(t5_run / "checkpoint").eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ours.config.vocab_size, (2, 20), generator=g)
    dec = torch.randint(0, ours.config.vocab_size, (2, 7), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, decoder_input_ids=dec).logits, ours(ids, None, dec),
                                   atol=1e-5, rtol=0)


def test_t5_resume_repeats_the_uninterrupted_run(t5_run, dataset):
    resumed = pretrain("pretrain-t5-tiny.yaml", dataset, t5_run.parent, "resumed", "optim.max_steps=6",
                       "parallel.num_workers=2", "checkpoint.every_n_steps=3", "eval.every_n_steps=6",
                       f"checkpoint.resume_from={t5_run / 'trainer_state' / 'step-00000003'}")
    full, again = losses(t5_run), losses(resumed)
    assert sorted(again) == [4, 5, 6]
    for step in again:
        assert again[step] == pytest.approx(full[step], abs=1e-6), step
    a, b = load_model(t5_run / "checkpoint").state_dict(), load_model(resumed / "checkpoint").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_t5_text_to_text_sft_through_the_cli(t5_run, tmp_path):
    """`raygpt sft` fine-tunes the T5 pretrained above text-to-text (task prefix + prompt → response + EOS) on the
    embedded task's demonstrations: the held-out demonstrations' loss falls, the held-out prompts' responses are
    scored by the task's labeller for both models, and the export is a transformers T5 with our logits."""
    from transformers import T5ForConditionalGeneration

    from jobs.sft import JOB as SFT

    sets = (f"init_from={t5_run / 'checkpoint'}", f"runs_root={tmp_path}", "name=sft", "parallel.num_workers=1",
            "optim.max_steps=8", "optim.micro_batch_size=8", "optim.lr=3e-3", "optim.warmup_steps=1",
            "data.max_demonstrations=256", "data.val_demonstrations=16", "data.max_response_tokens=48",
            "eval.prompts=8", "eval.every_n_steps=8", "eval.sampling.max_new_tokens=16", "log_every=4",
            "checkpoint.every_n_steps=8", "failure.max_failures=0")
    assert SFT.main([a for s in sets for a in ("--set", s)]) == 0
    run_dir = tmp_path / "sft"
    first, last = val_losses(run_dir)
    assert last < first - 0.1, (first, last)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task_prefix"] == "continue: " and summary["val"] == 16
    assert {"gold_heldout_init", "gold_heldout_sft"} <= summary.keys()
    ours = load_model(run_dir / "checkpoint").eval()
    assert ours.config == load_model(t5_run / "checkpoint").config  # dropout stayed a training-time setting
    hf = T5ForConditionalGeneration.from_pretrained(run_dir / "checkpoint").eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, ours.config.vocab_size, (2, 12), generator=g)
    dec = torch.randint(0, ours.config.vocab_size, (2, 5), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, decoder_input_ids=dec).logits, ours(ids, None, dec),
                                   atol=1e-5, rtol=0)
