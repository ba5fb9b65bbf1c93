"""The typed job-config system: YAML + dotted overrides, errors that name the field, section defaults."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from jobs.config import ConfigError, field, help_lines, load_config, to_dict


@dataclass
class Optim:
    lr: float = field(3e-4, help="peak learning rate")
    max_steps: int = field(100, help="optimizer steps")


@dataclass
class Job:
    name: str = field("job", help="run name")
    optim: Optim = field(Optim(lr=1e-3), help="optimizer")
    tags: list[str] = field(["a"], help="labels")


def test_partial_section_keeps_the_fields_own_default(tmp_path) -> None:
    cfg = load_config(Job, overrides=["optim.max_steps=7"])
    assert (cfg.optim.lr, cfg.optim.max_steps) == (1e-3, 7)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("optim:\n  max_steps: 9\n")
    cfg = load_config(Job, yaml_file, ["optim.lr=3e-5"])
    assert (cfg.optim.lr, cfg.optim.max_steps) == (3e-5, 9)
    assert load_config(Job).optim.lr == 1e-3


def test_errors_name_the_dotted_field(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"optim\.max_steps: expected an integer"):
        load_config(Job, overrides=["optim.max_steps=abc"])
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown field"):
        load_config(Job, overrides=["optim.lrr=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(Job, overrides=["optim.lr"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(Job, tmp_path / "missing.yaml")


def test_mutable_defaults_are_not_shared_and_help_lists_every_field() -> None:
    a, b = load_config(Job), load_config(Job)
    a.tags.append("x")
    assert b.tags == ["a"]
    text = "\n".join(help_lines(Job))
    for name in ("name", "optim.lr", "optim.max_steps", "tags"):
        assert name in text
    assert to_dict(b) == {"name": "job", "optim": {"lr": 1e-3, "max_steps": 100}, "tags": ["a"]}
