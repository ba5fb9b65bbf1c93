"""Comparison data: validation naming the row, atomic writes (nothing partial), Parquet/JSONL round trips, the
labelling of sampled responses (seeds independent of sharding), and the RM job refusing bad files before it
writes anything."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.config import ConfigError, from_dict
from jobs.data.tasks import Comparison, ComparisonsError, TaskConfig, read_comparisons, write_comparisons
from jobs.rlhf.sampling import GenerateSection, label_shard
from models.generation import SamplingParams

GOOD = {"prompt": "My heart", "responses": [" is glad", " is sad", " is here"], "ranking": [0, 2, 1]}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("bad, message", [
    ({"ranking": [0, 0, 1]}, r"row 1: ranking \[0, 0, 1\] is not a permutation of 0..2"),
    ({"ranking": [0, 1]}, r"row 1: ranking \[0, 1\] is not a permutation of 0..2"),
    ({"ranking": [1, 2, 3]}, r"row 1: ranking .* not a permutation"),
    ({"responses": [" only one"], "ranking": [0]}, r"row 1: K=1 response\(s\); a ranking needs K >= 2"),
    ({"responses": [" fine", "   ", " also"]}, r"row 1: response 1 is empty"),
    ({"prompt": ""}, r"row 1: prompt must be a non-empty string"),
    ({"ranking": [0, 1.0, 2]}, r"row 1: ranking must be a list of integers"),
    ({"scores": [0.1, 0.2]}, r"row 1: scores must be 3 finite numbers"),
])
def test_bad_rows_name_the_row(tmp_path: Path, bad: dict, message: str) -> None:
    f = _jsonl(tmp_path / "c.jsonl", [GOOD, {**GOOD, **bad}, GOOD])
    with pytest.raises(ComparisonsError, match=message) as e:
        read_comparisons(f)
    assert str(f) in str(e.value)


def test_missing_columns_and_keys(tmp_path: Path) -> None:
    t = pa.table({"prompt": ["x"], "responses": [["a", "b"]]})
    pq.write_table(t, tmp_path / "c.parquet")
    with pytest.raises(ComparisonsError, match=r"c.parquet: missing column\(s\) 'ranking'"):
        read_comparisons(tmp_path / "c.parquet")
    f = _jsonl(tmp_path / "c.jsonl", [GOOD, GOOD, {"prompt": "x", "responses": ["a", "b"]}])
    with pytest.raises(ComparisonsError, match="row 2: missing 'ranking'"):
        read_comparisons(f)
    (tmp_path / "broken.jsonl").write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(ComparisonsError, match=r"row 1 \(line 2\): not valid JSON"):
        read_comparisons(tmp_path / "broken.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ComparisonsError, match="no comparisons"):
        read_comparisons(tmp_path / "empty.jsonl")
    with pytest.raises(ComparisonsError, match="unknown comparisons format"):
        read_comparisons(_jsonl(tmp_path / "c.csv", [GOOD]))


def test_round_trip_parquet_and_jsonl(tmp_path: Path) -> None:
    rows = [Comparison("p1", ("a", "b", "c"), (2, 0, 1), (0.1, -0.2, 0.5)),
            Comparison("p2", ("d", "e"), (1, 0), (0.0, 0.3))]  # K may differ between prompts
    write_comparisons(rows, tmp_path / "c.parquet")
    assert read_comparisons(tmp_path / "c.parquet") == rows
    _jsonl(tmp_path / "c.jsonl", [{"prompt": c.prompt, "responses": list(c.responses),
                                   "ranking": list(c.ranking)} for c in rows])
    assert [c.ranking for c in read_comparisons(tmp_path / "c.jsonl")] == [(2, 0, 1), (1, 0)]
    assert [c.best for c in rows] == ["c", "e"]


def test_write_validates_first_and_leaves_nothing_partial(tmp_path: Path) -> None:
    good = [Comparison("p", ("a", "b"), (0, 1))]
    target = write_comparisons(good, tmp_path / "out" / "c.parquet")
    before = target.read_bytes()
    bad = [*good, Comparison("q", ("a", "b"), (1, 1))]
    with pytest.raises(ComparisonsError, match="row 1: ranking"):
        write_comparisons(bad, target)
    assert target.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["c.parquet"]  # no temporary left behind
    with pytest.raises(ComparisonsError, match="row 0: response 1 is empty"):
        write_comparisons([Comparison("p", ("a", ""), (0, 1))], tmp_path / "new.parquet")
    assert not (tmp_path / "new.parquet").exists()


def test_generate_section_validation() -> None:
    with pytest.raises(ConfigError, match="k: must be in 2..9"):
        from_dict(GenerateSection, {"k": 1})
    with pytest.raises(ConfigError, match="k: must be in 2..9"):
        from_dict(GenerateSection, {"k": 12})


@pytest.fixture(scope="module")
def nano_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.checkpoint import save_checkpoint
    from models.config import GPTConfig
    from models.gpt import GPT
    from models.tokenizer import Tokenizer

    tok = Tokenizer.train(["The sweet love of a happy heart. " * 20, "A sad grief and bitter woe. " * 20], 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("nano", vocab_size=tok.vocab_size))
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "checkpoint", tokenizer=tok)


def _corpus(tmp: Path) -> str:
    for i in range(4):
        (tmp / f"d{i}.txt").write_text(f"My gentle friend number {i} is here today\nAnd sweet love is good\n"
                                       f"Then the bitter grief came {i} times again\nAnd all was lost\n")
    return str(tmp)


def test_label_shard_ranks_by_labeler_and_ignores_sharding(tmp_path: Path, nano_checkpoint: Path) -> None:
    task = from_dict(TaskConfig, {"corpus": _corpus(tmp_path), "validation_fraction": 0.25, "heldout_fraction": 0.5})
    gen = from_dict(GenerateSection, {"k": 3, "sampling": {"max_new_tokens": 6}, "batch_size": 4})
    prompts = ["My gentle friend", "Then the bitter", "And sweet love", "And all was"]
    whole, dropped = label_shard(str(nano_checkpoint), task, prompts, 0, "train", gen)
    assert len(whole) + dropped == 4 and whole
    for c in whole:
        assert c.scores is not None and c.k == 3
        ordered = [c.scores[i] for i in c.ranking]
        assert ordered == sorted(ordered, reverse=True)  # best first by the labeler's score
    halves = label_shard(str(nano_checkpoint), task, prompts[:2], 0, "train", gen)[0] + \
        label_shard(str(nano_checkpoint), task, prompts[2:], 2, "train", gen)[0]
    assert halves == whole  # per-sample seeds: the data do not depend on the sharding
    other = label_shard(str(nano_checkpoint), task, prompts, 0, "heldout", gen)[0]
    assert [c.responses for c in other] != [c.responses for c in whole]  # splits use different seeds


def test_sample_responses_uses_one_seed_per_row_and_shares_a_prompt_across_its_group(nano_checkpoint: Path
                                                                                       ) -> None:
    from actors.engines.native import NativeEngine
    from jobs.rlhf.sampling import sample_responses
    from models.checkpoint import tokenizer_path
    from models.tokenizer import Tokenizer

    engine = NativeEngine.from_checkpoint(nano_checkpoint)
    tok = Tokenizer.from_file(tokenizer_path(nano_checkpoint))
    s = SamplingParams(max_new_tokens=8)
    a = sample_responses(engine, tok, ["The sweet", "A sad", "The love"], s, [5, 6, 7], batch_size=2)
    b = sample_responses(engine, tok, ["The love", "The sweet"], s, [7, 5], batch_size=2)
    assert a[0] == b[1] and a[2] == b[0]
    # n samples of one prompt (prefill shared) = the same prompt repeated with the same seeds
    grouped = sample_responses(engine, tok, ["The sweet", "A sad"], s, [5, 8, 6, 9], n=2, batch_size=1)
    repeated = sample_responses(engine, tok, ["The sweet", "The sweet", "A sad", "A sad"], s, [5, 8, 6, 9])
    assert grouped == repeated and grouped[0] == a[0] and grouped[2] == a[1]


def test_rm_job_refuses_bad_comparisons_before_writing(tmp_path: Path, nano_checkpoint: Path) -> None:
    from jobs.rm import RMConfig
    from jobs.rm import run as rm_run

    _jsonl(tmp_path / "c.jsonl", [GOOD, {**GOOD, "ranking": [2, 2, 0]}])
    cfg = from_dict(RMConfig, {"name": "rm-bad", "runs_root": str(tmp_path / "runs"), "init_from": str(nano_checkpoint),
                               "comparisons": str(tmp_path / "c.jsonl"), "normalize_demonstrations": 0})
    with pytest.raises(ComparisonsError, match="row 1: ranking"):
        rm_run(cfg)
    assert not (tmp_path / "runs").exists()  # no run directory, nothing half-written
    pq.write_table(pa.table({"prompt": ["x"], "ranking": [[0, 1]]}), tmp_path / "m.parquet")
    cfg = from_dict(RMConfig, {"name": "rm-bad", "runs_root": str(tmp_path / "runs"), "init_from": str(nano_checkpoint),
                               "comparisons": str(tmp_path / "m.parquet"), "normalize_demonstrations": 0})
    with pytest.raises(ComparisonsError, match="missing column.*'responses'"):
        rm_run(cfg)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="init_from: .*does not exist"):
        rm_run(from_dict(RMConfig, {"init_from": str(tmp_path / "nope"), "runs_root": str(tmp_path / "runs")}))
