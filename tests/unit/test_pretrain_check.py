"""`raygpt pretrain` checks its dataset before any worker starts (jobs/pretrain.py `check` →
jobs/data/reader.py `check_dataset`): another tokenizer than the one the data was prepared with, or a rank that
would get less than one sequence, is a ConfigError naming data.dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.config import ConfigError, from_dict
from jobs.data.tokens import prepare
from jobs.pretrain import PretrainConfig, check
from models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pretrain-check")
    (root / "corpus").mkdir()
    for i in range(2):  # two documents: one held in, one held out (pretraining validates on it)
        text = f"The sweet love {i} of a happy heart. " * 40 + "\n\nA sad grief. " * 40
        (root / "corpus" / f"d{i}.txt").write_text(text)
    (root / "other.txt").write_text("Completely different words, numbers 12345 and symbols !?% " * 40)
    tok = Tokenizer.train([(root / "corpus" / "d0.txt").read_text()], vocab_size=300).save(root / "tok.json")
    other = Tokenizer.train([(root / "other.txt").read_text()], vocab_size=300).save(root / "other.json")
    prepare(str(root / "corpus"), tok, root / "data", validation_fraction=0.5)
    return {"dir": str(root / "data"), "tok": str(tok), "other": str(other)}


def config(dataset: dict[str, str], **data: object) -> PretrainConfig:
    return from_dict(PretrainConfig, {"model": {"preset": "nano"}, "data": {"dir": dataset["dir"],
                                                                           "tokenizer": dataset["tok"], **data}})


def test_a_consistent_dataset_passes(dataset: dict[str, str]) -> None:
    mcfg, meta = check(config(dataset, seq_len=16))
    assert meta["vocab_size"] == mcfg.vocab_size


def test_a_replaced_tokenizer_is_refused_before_workers_start(dataset: dict[str, str], tmp_path: Path) -> None:
    import shutil

    data, tok = tmp_path / "data", tmp_path / "tok.json"
    shutil.copy(dataset["tok"], tok)
    prepare(str(Path(dataset["dir"]).parent / "corpus"), tok, data, validation_fraction=0.5)
    assert check(config({**dataset, "dir": str(data)}, tokenizer=str(tok), seq_len=16))
    shutil.copy(dataset["other"], tok)  # the dataset's tokenizer file now holds another vocabulary
    with pytest.raises(ConfigError, match="data.dir: .*tokenizer"):
        check(config({**dataset, "dir": str(data)}, tokenizer=str(tok), seq_len=16))


def test_the_datasets_own_tokenizer_wins_over_a_stale_default(dataset: dict[str, str]) -> None:
    # data.tokenizer's default path may hold another run's tokenizer: the dataset's recorded one is used
    mcfg, meta = check(config(dataset, tokenizer=dataset["other"], seq_len=16))
    assert meta["tokenizer"]["path"] == dataset["tok"]


def test_too_little_data_for_the_ranks_is_refused(dataset: dict[str, str]) -> None:
    cfg = from_dict(PretrainConfig, {"model": {"preset": "nano"}, "parallel": {"num_workers": 64},
                                     "data": {"dir": dataset["dir"], "tokenizer": dataset["tok"], "seq_len": 64}})
    with pytest.raises(ConfigError, match="data.dir"):
        check(cfg)
    assert Path(dataset["dir"]).is_dir()
