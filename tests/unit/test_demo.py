"""The demo's planning (every stage's config resolved with the job's own class before anything runs; failures
name the stage) and its report (from what the stages wrote; a missing metric names the file and key)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster.metrics import MetricsWriter
from jobs import demo
from jobs.config import ConfigError, load_config
from jobs.report import ReportError, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _cfg(*sets: str) -> demo.DemoConfig:
    return load_config(demo.DemoConfig, demo.DEFAULT_CONFIG, list(sets))


def test_plan_wires_stages_under_the_run_directory():
    planned = {p.stage.name: p.cfg for p in demo.plan_stages(_cfg("runs_root=/r", "name=d"))}
    assert list(planned) == [s.name for s in demo.STAGES if s.only is None]  # default: PPO alone
    assert planned["prepare"].tokenizer == planned["tokenizer"].out == "/r/d/tokenizer/tokenizer.json"
    assert planned["pretrain"].data.dir == planned["prepare"].out == "/r/d/data"
    assert planned["sft"].init_from == "/r/d/pretrain/checkpoint"
    assert planned["comparisons"].policy == planned["rm"].init_from == planned["ppo"].policy == "/r/d/sft/checkpoint"
    assert planned["ppo"].reward_model == planned["eval"].reward_model == "/r/d/rm/checkpoint"
    assert planned["eval"].models == {"pretrained": "/r/d/pretrain/checkpoint", "sft": "/r/d/sft/checkpoint",
                                      "ppo": "/r/d/ppo/checkpoint"}
    assert all(getattr(c, "runs_root", "/r/d") == "/r/d" for c in planned.values())
    # the demo's own settings reach the job: configs/demo.yaml's pretrain section
    assert planned["pretrain"].model.preset == "tiny"


def test_algorithms_run_from_the_same_sft_and_rm_and_are_all_evaluated():
    cfg, _ = demo.JOB.parse(["--config", str(demo.DEFAULT_CONFIG), "--algorithms", "ppo,grpo,rloo,reinforce_pp,dpo",
                             "--set", "runs_root=/r", "--set", "name=d"])
    planned = {p.stage.name: p.cfg for p in demo.plan_stages(cfg)}
    assert list(planned)[6:12] == ["ppo", "grpo", "rloo", "reinforce_pp", "dpo", "eval"]
    for a in ("grpo", "rloo", "reinforce_pp"):
        c = planned[a]
        assert (c.algorithm, c.name, c.policy, c.reward_model) == (a, a, "/r/d/sft/checkpoint", "/r/d/rm/checkpoint")
        assert c.rows == planned["ppo"].rows and c.iterations == planned["ppo"].iterations
        assert "value" not in c.placement_spec().roles  # critic-free
    assert planned["grpo"].group_size == planned["rloo"].group_size == 4
    assert planned["grpo"].batch_size * 4 == planned["reinforce_pp"].batch_size == planned["ppo"].batch_size
    # a demo whose PPO consumes another number of responses per iteration: every algorithm follows it
    other, _ = demo.JOB.parse(["--config", str(demo.DEFAULT_CONFIG), "--algorithms", "ppo,grpo,reinforce_pp",
                               "--set", "ppo.batch_size=128"])
    rows = {p.stage.name: p.cfg.rows for p in demo.plan_stages(other) if p.stage.name in ("ppo", "grpo",
                                                                                          "reinforce_pp")}
    assert rows == {"ppo": 128, "grpo": 128, "reinforce_pp": 128}
    assert (planned["dpo"].init_from, planned["dpo"].comparisons) == ("/r/d/sft/checkpoint", "/r/d/comparisons")
    assert planned["eval"].models == {"pretrained": "/r/d/pretrain/checkpoint", "sft": "/r/d/sft/checkpoint",
                                      **{a: f"/r/d/{a}/checkpoint" for a in
                                         ("ppo", "grpo", "rloo", "reinforce_pp", "dpo")}}
    with pytest.raises(ConfigError, match="algorithms: unknown algorithm 'a2c'"):
        demo.JOB.parse(["--algorithms", "ppo,a2c"])
    with pytest.raises(ConfigError, match="algorithms: must include ppo"):
        demo.JOB.parse(["--algorithms", "grpo"])


def test_a_bad_stage_field_is_named_with_its_stage():
    with pytest.raises(demo.StageError, match=r"stage 'ppo': kl\.targett: unknown field"):
        demo.plan_stages(_cfg("ppo.kl.targett=3"))
    with pytest.raises(demo.StageError, match=r"stage 'sft': optim\.max_steps"):
        demo.plan_stages(_cfg("sft.optim.max_steps=many"))


def test_a_missing_stage_module_fails_naming_the_stage(monkeypatch):
    monkeypatch.setattr(demo, "STAGES", [*demo.STAGES, demo.Stage("distill", "not a job", lambda c: {})])
    with pytest.raises(demo.StageError, match="stage 'distill': job: unknown job 'distill'"):
        demo.plan_stages(_cfg())


def test_smoke_config_is_valid_and_shorter():
    smoke = {p.stage.name: p.cfg for p in demo.plan_stages(load_config(demo.DemoConfig, demo.SMOKE_CONFIG))}
    full = {p.stage.name: p.cfg for p in demo.plan_stages(_cfg())}
    assert smoke["pretrain"].optim.max_steps < full["pretrain"].optim.max_steps
    assert smoke["ppo"].iterations < full["ppo"].iterations


def test_main_reports_stage_failures(capsys):
    assert demo.main(["--set", "rm.optim.lr=fast"]) == 1  # a stage's config error: before anything starts
    assert "FAILED: stage 'rm': optim.lr: expected a number" in capsys.readouterr().err


# --- report -------------------------------------------------------------------------------------------------
def _fake_run(root: Path) -> None:
    with MetricsWriter(root / "pretrain", tensorboard=False) as w:
        for s in range(0, 30, 5):
            w.write(s, loss=6 - s / 10, **({"val_loss": 6.1 - s / 10} if s % 10 == 0 else {}))
    with MetricsWriter(root / "sft", tensorboard=False) as w:
        for s in range(10):
            w.write(s, loss=5 - s / 20)
    with MetricsWriter(root / "rm", tensorboard=False) as w:
        for s in range(10):
            w.write(s, accuracy=0.5 + s / 40, **({"val_accuracy": 0.55 + s / 50} if s % 3 == 0 else {}))
    with MetricsWriter(root / "ppo", tensorboard=False) as w:
        for it in range(1, 6):
            w.write(it, iteration=it, gold_reward=0.1 * it, proxy_reward=0.2 * it, kl=0.5 * it, beta=0.1 / it)
    (root / "ppo" / "config.yaml").write_text("kl: {controller: adaptive, target: 6.0}\n")
    (root / "eval").mkdir()
    (root / "eval" / "summary.json").write_text(json.dumps(
        {"win_rate/ppo_vs_sft": 0.8125, "sft/gold": 0.2, "ppo/gold": 0.6, "rm_accuracy": 0.7}))
    rows = [{"prompt": f"p{i}", **{m: {"response": f"{m} says {i}", "gold": i / 10} for m in
                                    ("pretrained", "sft", "ppo")}} for i in range(4)]
    (root / "eval" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_from_stage_outputs(tmp_path):
    _fake_run(tmp_path)
    state = {"pretrain": {"status": "done", "seconds": 100.0}, "ppo": {"status": "done", "seconds": 200.0}}
    cfg = SimpleNamespace(corpus="shakespeare", samples=3, goal_win_rate=0.75)
    out = write_report(tmp_path, cfg, state, wall_seconds=600)
    md = (tmp_path / "report.md").read_text()
    assert "**81.2%** (goal ≥ 75.0%: met)" in md
    assert "| gold score, PPO | 0.600 |" in md
    assert "| p2 | pretrained says 2 [+0.20] | sft says 2 [+0.20] | ppo says 2 [+0.20] |" in md
    assert "| p3 |" not in md  # samples=3
    assert "total 10.0 min" in md and "| ppo | 200 s | done |" in md
    for png in ("lm_loss.png", "rm_accuracy.png", "ppo.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG
    assert out["numbers"]["win_rate"] == 0.8125
    write_report(tmp_path, cfg, state, wall_seconds=100)  # resumed: earlier stages ran in another invocation
    assert "stages 5.0 min in all; this (resumed) run 1.7 min" in (tmp_path / "report.md").read_text()


def test_report_refuses_missing_metrics(tmp_path):
    _fake_run(tmp_path)
    rows = (tmp_path / "ppo" / "metrics.jsonl").read_text().replace('"beta"', '"b"')
    (tmp_path / "ppo" / "metrics.jsonl").write_text(rows)
    cfg = SimpleNamespace(corpus="x", samples=0, goal_win_rate=0.75)
    with pytest.raises(ReportError, match=r"ppo/metrics\.jsonl: no rows with 'beta'"):
        write_report(tmp_path, cfg, {})
    (tmp_path / "eval" / "summary.json").write_text("{}")
    with pytest.raises(ReportError, match="summary.json: missing"):
        write_report(tmp_path, cfg, {})


def test_report_compares_the_algorithms(tmp_path):
    _fake_run(tmp_path)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    summary.update({"ppo/kl": 4.0, "ppo/proxy": 1.0, "ppo/distinct2": 0.5, "sft/kl": 0.0,
                    "win_rate/grpo_vs_sft": 0.875, "grpo/gold": 0.7, "grpo/proxy": 1.2, "grpo/kl": 5.5,
                    "grpo/distinct2": 0.4, "win_rate/dpo_vs_sft": 0.7, "dpo/gold": 0.4, "dpo/proxy": 0.3,
                    "dpo/kl": 2.0, "dpo/distinct2": 0.6})
    (tmp_path / "eval" / "summary.json").write_text(json.dumps(summary))
    with MetricsWriter(tmp_path / "grpo", tensorboard=False) as w:
        for it, rate in ((1, 30.0), (2, 50.0)):
            w.write(it, iteration=it, samples_per_s=rate)
    (tmp_path / "dpo").mkdir()
    (tmp_path / "dpo" / "summary.json").write_text(json.dumps({"pairs_per_s": 123.4}))
    state = {a: {"status": "done", "seconds": s} for a, s in (("ppo", 200.0), ("grpo", 90.0), ("dpo", 60.0))}
    cfg = SimpleNamespace(corpus="shakespeare", samples=0, goal_win_rate=0.75, algorithms=["ppo", "grpo", "dpo"])
    out = write_report(tmp_path, cfg, state, wall_seconds=600)
    md = (tmp_path / "report.md").read_text()
    assert "| grpo | 87.5% | 0.700 | 1.200 | 5.500 | 0.400 | 90 s | 40.0 samples/s |" in md
    assert "| dpo | 70.0% | 0.400 | 0.300 | 2.000 | 0.600 | 60 s | 123.4 pairs/s |" in md
    assert "| ppo | 81.2% | 0.600 | 1.000 | 4.000 | 0.500 | 200 s | – |" in md  # no samples_per_s rows
    assert (tmp_path / "gold_vs_kl.png").read_bytes()[:8] == PNG and "![gold_vs_kl](gold_vs_kl.png)" in md
    assert out["numbers"]["algorithms"]["grpo"]["win_rate"] == 0.875
    del summary["win_rate/dpo_vs_sft"]
    (tmp_path / "eval" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ReportError, match="no 'win_rate/dpo_vs_sft'"):
        write_report(tmp_path, cfg, state)
