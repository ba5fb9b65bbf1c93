"""Bad pretraining input fails with a one-line error naming the field — before Ray or any worker starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import pretrain


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from jobs.data.corpus import load_texts
    from jobs.data.tokens import prepare
    from models.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("data")
    Tokenizer.train(load_texts("pydoc"), vocab_size=512, min_frequency=2).save(root / "tokenizer.json")
    prepare("pydoc", root / "tokenizer.json", root / "pydoc", row_tokens=256)
    return root / "pydoc"


@pytest.mark.parametrize("sets, message", [
    ({"parallel.num_workers": 3, "parallel.tensor": 2},
     "parallel.num_workers: world size 3 is not divisible by tensor × pipeline = 2 × 1"),
    ({"parallel.num_workers": 4, "parallel.pipeline": 2, "parallel.zero_stage": 2},
     "parallel.zero_stage: ZeRO-2 cannot be combined with pipeline=2"),
    ({"parallel.num_workers": 4, "parallel.pipeline": 2, "parallel.zero_stage": 3},
     "parallel.zero_stage: ZeRO-3 cannot be combined with pipeline=2"),
    ({"parallel.num_workers": 4, "parallel.tensor": 4},
     "parallel.tensor: model n_head=2 is not divisible by tensor=4"),
    ({"parallel.num_workers": 4, "parallel.min_workers": 2, "parallel.tensor": 2},
     "parallel.min_workers: elastic training is data-parallel only"),
    ({"parallel.pipeline": 3, "parallel.num_workers": 3}, "parallel.pipeline: 3 stages but the model has only 2"),
    ({"data.dir": "DOES-NOT-EXIST"}, "data.dir: DOES-NOT-EXIST does not exist"),
    ({"checkpoint.resume_from": "DOES-NOT-EXIST"}, "checkpoint.resume_from: DOES-NOT-EXIST is not a raygpt checkpoint"),
])
def test_bad_input_fails_before_any_worker_starts(dataset, tmp_path, capsys, sets, message):
    import ray

    sets = {"data.dir": str(dataset), "model.preset": "nano", "runs_root": str(tmp_path), "name": "bad", **sets}
    argv = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    assert pretrain.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    assert not ray.is_initialized() and not (tmp_path / "bad").exists()  # nothing started, nothing written


def test_dry_run_prints_the_topology(dataset, capsys):
    argv = ["--set", f"data.dir={dataset}", "--set", "parallel.num_workers=4", "--set", "parallel.tensor=2",
            "--set", "parallel.zero_stage=1", "--dry-run"]
    assert pretrain.main(argv) == 0
    out = capsys.readouterr().out
    assert "world 4 = data 2 × tensor 2 × pipeline 1" in out
    assert "rank 1: pipeline stage 0, data-parallel rank 0, tensor-parallel rank 1" in out
