"""`raygpt tune`: ASHA over a job's config fields picks the best trial, stops the bad ones early and writes a
config that reproduces the best trial; bad sweep specs are refused before Ray starts, naming the field."""

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray.cloudpickle
import yaml

from cluster.metrics import MetricsWriter
from jobs.cli import ResolvedJob
from jobs.config import ConfigError, field, from_dict, load_config
from jobs.tune import TuneJobConfig, check, parse_spec, sweep


@dataclass
class ToyConfig:
    """A job whose loss curve is known: it is lowest for lr = 1e-3 at every step."""

    name: str = field("toy", help="run name")
    runs_root: str = field("runs", help="runs root")
    lr: float = field(1e-2, help="learning rate")
    steps: int = field(8, help="steps")


def toy_run(cfg: ToyConfig) -> None:
    with MetricsWriter(Path(cfg.runs_root) / cfg.name, tensorboard=False) as w:
        for t in range(cfg.steps):
            w.write(t, loss=(math.log10(cfg.lr) + 3) ** 2 + 1 / (t + 1))
            time.sleep(0.3)


@pytest.mark.slow
def test_asha_sweep_finds_best_and_stops_bad_trials(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # trials unpickle the toy job by value
    try:
        job = ResolvedJob("toy", __name__, ToyConfig, ToyConfig(), toy_run)
        # grid order matters for what ASHA can compare: the good trials run first, the bad ones meet their rungs
        cfg = load_config(TuneJobConfig, None, [
            "name=sweep", "runs_root=runs", "job=toy", "metric=loss", "mode=min", "num_samples=1",
            "max_concurrent=2", "num_cpus=2", "asha.grace_period=2", "asha.reduction_factor=2", "asha.max_t=8",
            "space={lr: 'grid(1e-3, 1e-4, 1e-5, 1e-1)'}"])
        summary = sweep(job, cfg)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])

    out = tmp_path / "runs" / "sweep"
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 4 and all(t["error"] is None for t in trials)
    by_lr = {t["params"]["lr"]: t for t in trials}
    assert summary["best"]["params"]["lr"] == pytest.approx(1e-3)
    assert by_lr[1e-3]["reports"] == 8  # the best trial ran to the end
    for bad in (1e-5, 1e-1):  # far worse than the first two at the first rung → stopped there
        assert by_lr[bad]["reports"] < 8 and by_lr[bad]["stopped_early"]
    best = from_dict(ToyConfig, yaml.safe_load((out / "best.yaml").read_text()))
    assert best.lr == pytest.approx(1e-3) and best.steps == 8 and best.name == "sweep-best"
    # every trial wrote its own run directory through the job's own code
    assert len(list((tmp_path / "runs").glob("sweep-*/metrics.jsonl"))) == 4


@pytest.mark.parametrize("space, message", [
    ({"optim.lrr": "loguniform(1e-4, 1e-3)"}, "space.optim.lrr"),
    ({"optim.lr": "loguniform(0, 1e-3)"}, "space.optim.lr: loguniform needs low > 0"),
    ({"optim.max_steps": "choice(10, 2.5)"}, "space.optim.max_steps"),
    ({"optim.lr": "logspace(1, 2)"}, "space.optim.lr"),
])
def test_bad_space_is_refused_naming_the_field(space, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        cfg = TuneJobConfig(job="pretrain", space=space)
        cfg.validate()
        check(cfg)


def test_untunable_jobs_are_refused():
    with pytest.raises(ConfigError, match="no field 'name'"):
        check(TuneJobConfig(job="tokenizer", space={"vocab_size": "choice(300, 400)"}))


def test_parse_spec():
    assert parse_spec("loguniform(1e-4, 3e-3)", "x") == ("loguniform", [1e-4, 3e-3])
    assert parse_spec("choice(a, 2, 0.5)", "x") == ("choice", ["a", 2, 0.5])
    assert parse_spec("randint(1, 8)", "x") == ("randint", [1, 8])
    with pytest.raises(ConfigError, match="low < high"):
        parse_spec("uniform(2, 1)", "x")
