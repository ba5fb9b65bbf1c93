"""T5 text-to-text fine-tuning (`raygpt sft` with a T5 `init_from`, Raffel et al. 2020 §2.4), without Ray:

- the demonstrations' text-to-text batch by hand, and its loss (`seq2seq_loss_fn`, the engine's) equal to
  transformers' own T5ForConditionalGeneration loss with `labels` (padding as −100) on the same weights;
- the evaluator's T5 engine: greedy responses equal transformers' `generate` on prefix + prompt + EOS, the
  Generation has the layout every engine returns (left-padded prompt, then the response), a row's sample does
  not depend on its batch-mates;
- which jobs take a T5: sft does, rm / dpo / ppo refuse it naming the field, and sft refuses a T5 with tensor
  or pipeline parallelism, before any worker starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from actors.base import rollout_from_generation
from actors.engines.t5 import TextToTextEngine
from cluster.train.engine import seq2seq_loss_fn
from jobs.config import ConfigError, from_dict
from jobs.data.examples import ChatExample, text_to_text_sft_batch
from models.config import T5Config
from models.generation import SamplingParams
from models.t5 import T5
from models.t5_checkpoint import save_t5
from models.tokenizer import Tokenizer

EOS, PAD, START = 3, 3, 3
CFG = T5Config.from_name("t5-nano", vocab_size=97, eos_token_id=EOS, pad_token_id=PAD, decoder_start_token_id=START)


def model(seed: int = 0) -> T5:
    torch.manual_seed(seed)
    return T5(CFG).eval()


def hf_twin(ours: T5, tmp_path: Path) -> transformers.T5ForConditionalGeneration:
    save_t5(ours, tmp_path / "ckpt")
    return transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "ckpt").eval()


def test_text_to_text_batch_of_demonstrations_by_hand() -> None:
    examples = [([10, 11], [20, 21, EOS]), ([12], [22, EOS])]  # (prompt, response + EOS) as encode_example gives
    b = text_to_text_sft_batch(examples, [7, 8], EOS, PAD, START)
    assert b["input_ids"].tolist() == [[7, 8, 10, 11, EOS], [7, 8, 12, EOS, PAD]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert b["labels"].tolist() == [[20, 21, EOS], [22, EOS, PAD]]
    assert b["labels_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["decoder_input_ids"].tolist() == [[START, 20, 21], [START, 22, EOS]]
    with pytest.raises(ValueError, match=r"examples\[1\]: a conversation"):
        text_to_text_sft_batch([examples[0], ChatExample([1, 2, 3], [0, 1, 1])], [7], EOS, PAD, START)
    with pytest.raises(ValueError, match=r"examples\[0\]: .*ending with EOS"):
        text_to_text_sft_batch([([10], [20, 21])], [7], EOS, PAD, START)


def test_sft_loss_equals_transformers_loss(tmp_path: Path) -> None:
    ours = model(1)
    hf = hf_twin(ours, tmp_path)
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(4, 97, (n,), generator=g).tolist(),
                 torch.randint(4, 97, (m,), generator=g).tolist() + [EOS]) for n, m in ((5, 3), (2, 7), (9, 1))]
    b = text_to_text_sft_batch(examples, [40, 41, 42], EOS, PAD, START)
    labels = b["labels"].masked_fill(b["labels_mask"] == 0, -100)
    with torch.no_grad():
        theirs = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss
        loss, _ = seq2seq_loss_fn(ours, b)
    torch.testing.assert_close(loss, theirs, atol=1e-5, rtol=0)


def test_engine_greedy_equals_transformers_generate_with_the_prefix(tmp_path: Path) -> None:
    ours = model(2)
    hf = hf_twin(ours, tmp_path)
    prefix, prompts = [50, 51], [[60, 61, 62, 63], [64], [65, 66]]
    engine = TextToTextEngine(ours, prefix)
    gen = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.0), eos_id=EOS, seeds=[0, 1, 2])
    for i, p in enumerate(prompts):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prefix + p + [EOS]]), max_new_tokens=6, do_sample=False,
                              eos_token_id=EOS, pad_token_id=PAD, decoder_start_token_id=START)[0, 1:]
        n = int(gen.response_mask[i].sum())
        assert gen.response_ids[i, :n].tolist() == out[:n].tolist(), i
        # the prompt (without the prefix) is left-padded before the response, as every engine returns it
        assert gen.sequences[i, :gen.prompt_len][gen.attention_mask[i, :gen.prompt_len].bool()].tolist() == p
    rollout = rollout_from_generation(gen, [0, 1, 2], 0, "", engine.name, engine.exact_logprobs)
    assert rollout.prompt_ids.shape == (3, 4) and rollout.response_ids.shape[1] == gen.response_ids.shape[1]


def test_engine_samples_do_not_depend_on_batch_mates() -> None:
    engine = TextToTextEngine(model(3), [50])
    params = SamplingParams(max_new_tokens=5, temperature=1.0)
    both = engine.generate([[60, 61], [62, 63, 64]], params, eos_id=EOS, seeds=[11, 12])
    alone = engine.generate([[62, 63, 64]], params, eos_id=EOS, seeds=[12])
    n = int(alone.response_mask[0].sum())
    assert both.response_ids[1, :n].tolist() == alone.response_ids[0, :n].tolist()
    torch.testing.assert_close(both.logprobs[1, :n], alone.logprobs[0, :n])


@pytest.fixture(scope="module")
def t5_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny T5 checkpoint on a tiny tokenizer, in the layout `raygpt pretrain --set model.arch=t5` exports."""
    tok = Tokenizer.train(["my heart is full of love and joy", "the night is dark and cold"] * 20, vocab_size=280)
    eos = tok.eos_id
    cfg = T5Config.from_name("t5-nano", vocab_size=tok.vocab_size + 100, eos_token_id=eos, pad_token_id=eos,
                             decoder_start_token_id=eos)
    return save_t5(T5(cfg), tmp_path_factory.mktemp("t5") / "checkpoint", tok)


def test_rm_dpo_and_ppo_refuse_a_t5_naming_the_field(t5_checkpoint: Path, tmp_path: Path) -> None:
    from jobs import dpo, rm
    from jobs.rl.config import PPOJobConfig
    from jobs.rl.inputs import check_checkpoints

    for job, config in ((rm, rm.RMConfig), (dpo, dpo.DPOConfig)):
        cfg = from_dict(config, {"init_from": str(t5_checkpoint), "runs_root": str(tmp_path)})
        with pytest.raises(ConfigError, match=r"^init_from: .* is a T5 \(encoder-decoder\) checkpoint.*raygpt sft"):
            job.run(cfg)
    with pytest.raises(ConfigError, match=r"^policy: .*model_type 't5'"):
        check_checkpoints(from_dict(PPOJobConfig, {"policy": str(t5_checkpoint)}))
    assert not any(tmp_path.iterdir())  # refused before a run directory (or a worker) exists


@pytest.mark.parametrize("layout", [{"tensor": 2, "num_workers": 2}, {"pipeline": 2, "num_workers": 2}])
def test_sft_takes_a_t5_on_data_parallel_layouts_only(t5_checkpoint: Path, tmp_path: Path, layout: dict) -> None:
    from jobs import sft

    cfg = from_dict(sft.SFTConfig, {"init_from": str(t5_checkpoint), "runs_root": str(tmp_path), "parallel": layout})
    with pytest.raises(ConfigError, match=f"parallel.{next(iter(layout))}: t5 supports data parallelism and ZeRO"):
        sft.run(cfg)
    assert not any(tmp_path.iterdir())
