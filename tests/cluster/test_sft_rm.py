"""The human-feedback stages end to end on the tiny CPU setup, on a local Ray cluster:
pretrained tiny model (built here, single process) → `raygpt sft` → `raygpt rm` (comparisons sampled on Ray
workers, ranked by VADER) → `raygpt eval`.

Claims, seed 0 everywhere:
- SFT raises the gold (VADER) score of samples on held-out prompts over the pretrained model by > 0.1;
- the RM's pairwise accuracy on held-out comparisons (prompts it never trained on) is ≥ 0.6 (chance = 0.5);
- each job writes metrics.jsonl and a checkpoint; the RM loads in transformers as GPT2ForSequenceClassification
  with the normalised reward, the SFT model as GPT2LMHeadModel.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from jobs.config import from_dict

# ≈ 3–4 minutes on an idle 2-core machine (pretraining ≈ 15 s, each Ray Train job ≈ 30 s of start-up); the
# generous timeout is for loaded CI boxes.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

PRETRAIN_STEPS = 250
VOCAB = 2048


def pretrain_tiny(out: Path, steps: int = PRETRAIN_STEPS, seed: int = 0) -> Path:
    """A quick single-process pretraining of the tiny preset on the held-in Shakespeare plays → checkpoint dir."""
    from jobs.data.corpus import load_documents, split_documents
    from models.checkpoint import save_checkpoint
    from models.config import GPTConfig
    from models.gpt import GPT
    from models.losses import lm_loss
    from models.schedules import warmup_cosine
    from models.tokenizer import Tokenizer

    torch.manual_seed(seed)
    docs = split_documents(load_documents("shakespeare"))["train"]
    tok = Tokenizer.train([d.text for d in docs], VOCAB)
    ids = torch.tensor([t for e in tok.encode_batch([d.text for d in docs]) for t in [*e, tok.eos_id]])
    cfg = GPTConfig.from_name("tiny", vocab_size=tok.vocab_size)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    B, T = 16, 64  # prompts + responses are ≤ 48 tokens: a short context is enough here
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(step, 2e-3, 20, steps)
        starts = torch.randint(len(ids) - T - 1, (B,))
        x = torch.stack([ids[s:s + T + 1] for s in starts])
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return save_checkpoint(model, out, tokenizer=tok)


@pytest.fixture(scope="module")
def ray_cluster():
    from cluster.runtime import init_ray, shutdown_ray

    init_ray(num_cpus=4)
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, ray_cluster: None) -> dict:
    from jobs import eval as evaluate
    from jobs import rm, sft

    root = tmp_path_factory.mktemp("runs")
    t0 = time.perf_counter()
    pre = pretrain_tiny(root / "pretrain" / "checkpoint")
    seconds = {"pretrain": time.perf_counter() - t0}
    s = sft.run(from_dict(sft.SFTConfig, {
        "name": "sft", "runs_root": str(root), "init_from": str(pre),
        "optim": {"max_steps": 150, "micro_batch_size": 16, "lr": 5e-4, "warmup_steps": 10},
        "parallel": {"num_workers": 1}, "eval": {"prompts": 128, "every_n_steps": 50}}))
    seconds["sft"] = time.perf_counter() - t0 - sum(seconds.values())
    r = rm.run(from_dict(rm.RMConfig, {
        "name": "rm", "runs_root": str(root), "init_from": s["checkpoint"],
        "generate": {"k": 4, "train_prompts": 768, "heldout_prompts": 128, "workers": 2},
        "optim": {"max_steps": 96, "micro_batch_size": 8}, "parallel": {"num_workers": 1},
        "normalize_demonstrations": 256}))
    seconds["rm"] = time.perf_counter() - t0 - sum(seconds.values())
    e = evaluate.run(from_dict(evaluate.EvalConfig, {
        "name": "eval", "runs_root": str(root), "models": {"pretrained": str(pre), "sft": s["checkpoint"]},
        "reward_model": r["checkpoint"], "prompts": 128, "perplexity": {"max_tokens": 2048},
        "formats": {"names": ["qa"], "shots": [0, 2]}}))
    seconds["eval"] = time.perf_counter() - t0 - sum(seconds.values())
    print("stage seconds:", {k: round(v, 1) for k, v in seconds.items()})
    return {"root": root, "pretrain": pre, "sft": s, "rm": r, "eval": e}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_raises_the_gold_score(pipeline: dict) -> None:
    s = pipeline["sft"]
    assert s["gold_heldout_sft"] > s["gold_heldout_init"] + 0.1, s
    rows = _rows(Path(s["run_dir"]))
    assert rows[-1]["step"] == 150 and math.isfinite(rows[-1]["loss"])
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < val[0]  # the held-out demonstrations became more likely


def test_rm_is_clearly_above_chance_on_heldout_comparisons(pipeline: dict) -> None:
    r = pipeline["rm"]
    assert r["val_accuracy"] >= 0.6, r  # pairwise accuracy on held-out prompts' comparisons, chance 0.5
    assert abs(r["reward_normalization"]["mean_after"]) < 1e-3
    assert Path(r["heldout_comparisons"]).is_file() and _rows(Path(r["run_dir"]))


def test_eval_reports_gold_proxy_win_rate_and_accuracy(pipeline: dict) -> None:
    e = pipeline["eval"]
    assert e["win_rate/sft_vs_pretrained"] > 0.5
    assert math.isclose(e["win_rate/sft_vs_pretrained"] + e["win_rate/pretrained_vs_sft"], 1.0)
    assert e["rm_accuracy"] >= 0.6
    assert e["sft/proxy"] > e["pretrained/proxy"]  # the RM prefers the SFT model's samples as the labeler does
    for label in ("pretrained", "sft"):
        assert 1.0 < e[f"{label}/ppl"] < VOCAB
        assert f"{label}/format/qa/2shot/target_logprob" in e
    samples = (pipeline["root"] / "eval" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 128 and "gold" in json.loads(samples[0])["sft"]


def test_checkpoints_load_in_transformers(pipeline: dict) -> None:
    transformers = pytest.importorskip("transformers")
    from jobs.rlhf.evaluation import proxy_scores
    from models.checkpoint import load_checkpoint
    from models.tokenizer import Tokenizer

    lm = transformers.GPT2LMHeadModel.from_pretrained(pipeline["sft"]["checkpoint"])
    assert lm.config.vocab_size == VOCAB
    path = pipeline["rm"]["checkpoint"]
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(path).eval()
    hf.config.pad_token_id = None  # one unpadded sequence: read the score at its last token, the EOS
    tok = Tokenizer.from_file(Path(path) / "tokenizer.json")
    ours = proxy_scores(load_checkpoint(path), tok, ["My heart is"], [" full of love and joy"])
    ids = tok.encode("My heart is") + tok.encode(" full of love and joy") + [tok.eos_id]
    with torch.no_grad():
        theirs = float(hf(torch.tensor([ids])).logits[0, 0])
    assert math.isclose(ours[0], theirs, rel_tol=1e-4, abs_tol=1e-4)
