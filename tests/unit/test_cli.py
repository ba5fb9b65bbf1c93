"""The `raygpt` CLI: dispatch, --help with every field and default, --dry-run, and local job resolution (what
`raygpt submit` and `raygpt tune` rely on to reject a bad spec before anything starts)."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from jobs import cli
from jobs.config import ConfigError
from jobs.submit import build_submission
from jobs.tokenizer import TokenizerJobConfig


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"  {name} " in out


def test_unknown_command(capsys):
    assert cli.main(["pretrian"]) == 2
    assert "unknown command 'pretrian'" in capsys.readouterr().err


def test_job_help_lists_every_field_with_default(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["tokenizer", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(TokenizerJobConfig):
        assert f"  {f.name} (" in out and f"= {f.default!r}" in out


def test_dry_run_prints_resolved_config_and_runs_nothing(tmp_path, capsys):
    out_path = tmp_path / "tok.json"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("vocab_size: 500\ncorpus: pydoc\n")
    rc = cli.main(["tokenizer", "--config", str(cfg_file), "--set", "vocab_size=600", "--set", f"out={out_path}",
                   "--dry-run"])
    assert rc == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["vocab_size"] == 600 and printed["corpus"] == "pydoc" and printed["out"] == str(out_path)
    assert printed["min_frequency"] == TokenizerJobConfig().min_frequency
    assert not out_path.exists()


def test_resolve_job_returns_config_class_and_run():
    r = cli.resolve_job("tokenizer", ["--set", "vocab_size=512"])
    assert r.cls is TokenizerJobConfig and r.module == "jobs.tokenizer"
    assert r.cfg == TokenizerJobConfig(vocab_size=512)
    from jobs import tokenizer

    assert r.run is tokenizer.run


@pytest.mark.parametrize("argv, field", [
    (["--set", "vocab_size=12"], "vocab_size"),          # validate()
    (["--set", "vocab_size=many"], "vocab_size"),        # type
    (["--set", "vocab_sise=300"], "vocab_sise"),         # unknown field
    (["--set", "min_frequency=0"], "min_frequency"),
])
def test_resolve_job_names_the_field(argv, field):
    with pytest.raises(ConfigError, match=field):
        cli.resolve_job("tokenizer", argv)


def test_resolve_job_rejects_non_jobs_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="not a job"):
        cli.resolve_job("submit", [])
    with pytest.raises(ConfigError, match="unknown job"):
        cli.resolve_job("pretrian", [])
    with pytest.raises(ConfigError, match="no such file"):
        cli.resolve_job("tokenizer", ["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match="unrecognized arguments: --bogus"):
        cli.resolve_job("tokenizer", ["--bogus"])


def test_build_submission_ships_project_and_relative_config(tmp_path):
    from jobs.submit import PROJECT_ROOT

    inside = PROJECT_ROOT / ".tmp" / "test_cli_cfg.yaml"
    inside.parent.mkdir(exist_ok=True)
    inside.write_text("vocab_size: 300\n")
    try:
        spec = build_submission("tokenizer", [f"--config={inside}", "--set", "corpus=pydoc"])
    finally:
        inside.unlink()
    assert spec["entrypoint"] == "python -m jobs.tokenizer --config .tmp/test_cli_cfg.yaml --set corpus=pydoc"
    assert spec["runtime_env"]["working_dir"] == str(PROJECT_ROOT)
    assert "/.venv/" in spec["runtime_env"]["excludes"]
    # no loopback-only settings shipped to a real cluster
    assert "GLOO_SOCKET_IFNAME" not in spec["runtime_env"]["env_vars"]

    wd = tmp_path / "wd"  # a working dir holding the job's module, and a config file beside it (not inside)
    (wd / "jobs").mkdir(parents=True)
    (wd / "jobs" / "tokenizer.py").write_text("")
    outside = tmp_path / "c.yaml"
    outside.write_text("vocab_size: 300\n")
    with pytest.raises(ConfigError, match="outside the working dir"):
        build_submission("tokenizer", ["--config", str(outside)], working_dir=wd)
    with pytest.raises(ConfigError, match="does not contain jobs.prepare"):
        build_submission("prepare", [], working_dir=wd)
