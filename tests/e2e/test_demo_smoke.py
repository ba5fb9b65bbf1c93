"""`raygpt demo --smoke`: the whole pipeline end to end with tiny steps (configs/demo-smoke.yaml), as a user runs
it (a subprocess through the CLI), ending with the report, the plots and one served request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"
STAGES = ["tokenizer", "prepare", "pretrain", "sft", "comparisons", "rm", "ppo", "eval", "serve"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    runs = tmp_path_factory.mktemp("demo") / "runs"
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--smoke", "--set", f"runs_root={runs}"],
                          cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True, capture_output=True,
                          timeout=600)
    return proc, runs / "demo-smoke"


def test_demo_runs_every_stage_and_reports(demo):
    proc, root = demo
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for i, stage in enumerate(STAGES, 1):  # progress shown, in pipeline order
        assert f"[demo {i}/{len(STAGES) + 1}] {stage}" in proc.stdout
    state = json.loads((root / "stages.json").read_text())
    assert [s for s in STAGES if state.get(s, {}).get("status") == "done"] == STAGES
    report = (root / "report.md").read_text()
    assert "win rate of PPO over SFT" in report
    for png in ("lm_loss.png", "rm_accuracy.png", "ppo.png"):
        data = (root / png).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000, png
        assert f"]({png})" in report
    assert report.count("\n| ") > 5  # result table, stage table, samples


def test_demo_artifacts_are_real(demo):
    proc, root = demo
    assert proc.returncode == 0
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    for lm in ("pretrain", "sft", "ppo"):
        GPT2LMHeadModel.from_pretrained(root / lm / "checkpoint")
        assert (root / lm / "metrics.jsonl").stat().st_size > 0
    GPT2ForSequenceClassification.from_pretrained(root / "rm" / "checkpoint")
    served = json.loads((root / "serve.json").read_text())
    assert served["completion"] and served["usage"]["completion_tokens"] >= 1
    ev = json.loads((root / "eval" / "summary.json").read_text())
    assert 0.0 <= ev["win_rate/ppo_vs_sft"] <= 1.0
