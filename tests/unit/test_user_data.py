"""Bring-your-own-data readers (jobs/data/tasks/user_data.py), the `files` task, conversational SFT examples, the jobs
refusal of malformed rows before anything is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.config import ConfigError, from_dict
from jobs.data.examples import ChatExample, encode_demonstration, sft_batch
from jobs.data.tasks import FilesTask, TaskConfig, TaskError, build_task
from jobs.data.tasks.base import heldout_prompt
from jobs.data.tasks.user_data import (
    UserDataError,
    detect_format,
    expand,
    read_demonstrations,
    read_preferences,
    read_prompts,
    read_rows,
)
from models.chat import render

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731


def jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


CONVS = [{"messages": [S("Be brief."), U(f"Say {i}"), A(f"{i}!"), U("Again"), A(f"{i} again")]} for i in range(20)]


# --- formats ----------------------------------------------------------------------------------------------------
def test_prompt_completion_strings_and_messages(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: 2+2?\nA:", "completion": " 4", "extra": 1},
                                      {"prompt": [U("Hi")], "completion": [A("Hello")]}])
    d0, d1 = read_demonstrations(f)
    assert (d0.prompt, d0.response, d0.messages) == ("Q: 2+2?\nA:", " 4", ())  # strings: verbatim, no template
    assert d1.prompt == "User: Hi\nAssistant:" and d1.response == " Hello" and len(d1.messages) == 2


def test_messages_parquet_directory_and_glob(tmp_path: Path) -> None:
    parquet(tmp_path / "d" / "a.parquet", CONVS[:10])
    jsonl(tmp_path / "d" / "b.jsonl", CONVS[10:])
    (tmp_path / "d" / "notes.txt").write_text("ignored in a directory")
    by_dir = read_demonstrations(tmp_path / "d")
    by_glob = read_demonstrations(str(tmp_path / "d" / "*.*l"))  # b.jsonl only
    assert len(by_dir) == 20 and len(by_glob) == 10
    d = by_dir[3]
    assert d.prompt == "System: Be brief.\nUser: Say 3\nAssistant: 3!<|endoftext|>\nUser: Again\nAssistant:"
    assert d.response == " 3 again"
    assert d.prompt + d.response + "<|endoftext|>" == render(d.messages)
    with pytest.raises(UserDataError, match="no file matches"):
        expand(str(tmp_path / "nothing*.jsonl"))


def test_pairwise_strings_messages_and_implicit_prompt(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "p.jsonl", [
        {"prompt": "The sky is", "chosen": " blue", "rejected": " green"},
        {"prompt": [U("Hi")], "chosen": [A("Hello")], "rejected": [A("Go away")]},
        {"chosen": [U("Hi"), A("Hello")], "rejected": [U("Hi"), A("Go away")]},
    ])
    c0, c1, c2 = read_preferences(f)
    assert (c0.prompt, c0.responses, c0.ranking) == ("The sky is", (" blue", " green"), (0, 1))
    assert c1 == c2  # explicit and implicit prompt give the same comparison
    assert c1.prompt == "User: Hi\nAssistant:" and c1.responses == (" Hello", " Go away")


def test_kwise_is_todays_format(tmp_path: Path) -> None:
    f = parquet(tmp_path / "k.parquet", [{"prompt": "x", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}])
    (c,) = read_preferences(f)
    assert c.best == "c" and c.k == 3


def test_prompts_files(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "pr.jsonl", [{"prompt": "Once upon"}, {"prompt": [S("Kind."), U("Hi")]}])
    g = jsonl(tmp_path / "m.jsonl", [{"messages": [U("Hi")]}, {"messages": [U("a"), A("b"), U("c")]}])
    assert read_prompts(f) == ["Once upon", "System: Kind.\nUser: Hi\nAssistant:"]
    assert read_prompts(g) == ["User: Hi\nAssistant:", "User: a\nAssistant: b<|endoftext|>\nUser: c\nAssistant:"]
    assert detect_format(read_rows(g)) == "prompts"
    # any other format gives its prompts too (e.g. PPO on the prompts of the SFT or preference data)
    assert read_prompts(jsonl(tmp_path / "c.jsonl", CONVS[:2]))[0].endswith("User: Again\nAssistant:")


# --- every malformed row kind: a clear error naming the file and the row ---------------------------------------
BAD = [
    ("sft", {"prompt": "p"}, r"row 1: missing column\(s\) 'completion'"),
    ("sft", {"prompt": "p", "completion": 3}, r"row 1: completion must be a string or a message list, got int"),
    ("sft", {"prompt": "p", "completion": "  "}, r"row 1: completion is empty"),
    ("sft", {"prompt": "p", "completion": [A("x")]}, "row 1: prompt and completion must both be strings or both"),
    ("conv", {"messages": [U("a"), {"role": "bot", "content": "b"}]}, r"row 1: messages\[1\]: unknown role 'bot'"),
    ("conv", {"messages": [S("a"), U("b")]}, "row 1: messages: no assistant turn"),
    ("conv", {"messages": [U("a"), A("")]}, r"row 1: messages\[1\]: empty assistant message"),
    ("conv", {"messages": "hi"}, "row 1: messages: must be a list of messages"),
    ("conv", {"messages": [U("a"), {"role": "assistant", "content": ["x"]}]}, "content must be a string, got list"),
    ("pair", {"prompt": "p", "chosen": "c"}, r"row 1: missing column\(s\) 'rejected'"),
    ("pair", {"prompt": "p", "chosen": "c", "rejected": ""}, "row 1: rejected is empty"),
    ("pair", {"prompt": "p", "chosen": "c", "rejected": 7}, "row 1: rejected must be a string"),
    ("pair", {"prompt": "p", "chosen": [A("c")], "rejected": [A("r")]}, "must all be strings or all message lists"),
    ("pair", {"chosen": "c", "rejected": "r"}, r"row 1: missing 'prompt'"),
    ("pair", {"prompt": [U("p")], "chosen": [U("c")], "rejected": [A("r")]}, "chosen: the last message must be"),
    ("kwise", {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}, r"row 1: ranking \[0, 0\] is not a perm"),
    ("kwise", {"prompt": "p", "responses": ["a", ""], "ranking": [0, 1]}, "row 1: response 1 is empty"),
    ("kwise", {"prompt": "p", "responses": ["a", "b"]}, r"row 1: missing column\(s\) 'ranking'"),
    ("prompts", {"prompt": 5}, "row 1: prompt must be a string or a message list, got int"),
    ("prompts", {"prompt": [U("a"), A("b")]}, "row 1: prompt: a prompt must not end with an assistant message"),
]
GOOD_ROW = {"sft": {"prompt": "p", "completion": "c"}, "conv": CONVS[0],
            "pair": {"prompt": "p", "chosen": "c", "rejected": "r"},
            "kwise": {"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]}, "prompts": {"prompt": "p"}}
READER = {"sft": read_demonstrations, "conv": read_demonstrations, "pair": read_preferences,
          "kwise": read_preferences, "prompts": read_prompts}


@pytest.mark.parametrize("kind, row, match", BAD)
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_malformed_rows_name_file_and_row(tmp_path: Path, kind: str, row: dict, match: str, suffix: str) -> None:
    rows = [GOOD_ROW[kind], row]
    if suffix == ".parquet":
        try:
            f = parquet(tmp_path / f"bad{suffix}", rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            pytest.skip("Parquet cannot hold this mix of types in one column (JSONL case covers it)")
    else:
        f = jsonl(tmp_path / f"bad{suffix}", rows)
    with pytest.raises(UserDataError, match=match) as e:
        READER[kind](f)
    assert str(e.value).startswith(f"{f}: row 1")


def test_unreadable_inputs(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    with pytest.raises(UserDataError, match=r"x.jsonl: row 1 \(line 2\): not valid JSON"):
        read_demonstrations(tmp_path / "x.jsonl")
    (tmp_path / "y.jsonl").write_text('["a"]\n')
    with pytest.raises(UserDataError, match="row 0 .*expected a JSON object"):
        read_rows(tmp_path / "y.jsonl")
    (tmp_path / "z.csv").write_text("a,b\n")
    with pytest.raises(UserDataError, match="unknown data format"):
        read_rows(tmp_path / "z.csv")
    f = jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    with pytest.raises(UserDataError, match="a 'prompts' file cannot be used for SFT demonstrations"):
        read_demonstrations(f)
    with pytest.raises(UserDataError, match="row 0: missing column"):
        read_demonstrations(f, fmt="prompt-completion")


# --- the files task -------------------------------------------------------------------------------------------
def test_files_task_hash_split_and_separate_heldout(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "c.jsonl", CONVS)
    task = build_task(from_dict(TaskConfig, {"name": "files", "data": str(f), "heldout_fraction": 0.3}))
    assert isinstance(task, FilesTask) and not task.has_labeler
    train, held = task.prompts("train"), task.prompts("heldout")
    assert sorted(train + held) == sorted(d.prompt for d in read_demonstrations(f))
    assert all(heldout_prompt(p, 0.3) for p in held) and not any(heldout_prompt(p, 0.3) for p in train)
    assert train and held  # 20 prompts at 0.3: both splits non-empty
    assert [d.prompt for d in task.demonstrations()] == train
    h = jsonl(tmp_path / "h.jsonl", CONVS[:2])
    task = FilesTask(str(f), heldout_data=str(h))
    assert len(task.prompts("train")) == 20 and len(task.prompts("heldout")) == 2
    pairs = jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(9)])
    task = FilesTask(str(pairs), heldout_fraction=0.5)
    assert {d.response for d in task.demonstrations()} == {"good"}  # the preferred response
    assert len(task.comparisons_for("train")) + len(task.comparisons_for("heldout")) == 9
    with pytest.raises(ConfigError, match="needs a data file"):
        from_dict(TaskConfig, {"name": "files"})
    with pytest.raises(TaskError, match="is a 'pairwise' file, task.data a 'messages' file"):
        FilesTask(str(f), heldout_data=str(pairs))
    prompts = jsonl(tmp_path / "pr.jsonl", [{"prompt": f"p{i}"} for i in range(9)])
    with pytest.raises(TaskError, match="a prompt-only file has no demonstrations"):
        FilesTask(str(prompts)).demonstrations()


# --- conversational SFT examples: loss on assistant turns only ---------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from models.tokenizer import Tokenizer

    return Tokenizer.train(["User: Say 1\nAssistant: 1! again. System: Be brief." * 30, "hello world"] * 5, 300)


def test_chat_example_trains_exactly_the_assistant_turns(tok) -> None:
    demo = read_demonstrations_from_rows([CONVS[1]])[0]
    e = encode_demonstration(tok, demo)
    assert isinstance(e, ChatExample)
    b = sft_batch([e, encode_demonstration(tok, demo.__class__("a", "b"))], pad_id=tok.eos_id)
    targets, mask = b["targets"][0], b["loss_mask"][0]
    trained = [int(t) for t, m in zip(targets, mask) if m]
    # independent check: the trained targets decode to the assistant turns (leading space + content + EOS), in order
    assert tok.decode(trained) == " 1!<|endoftext|> 1 again<|endoftext|>"
    assert int(mask.sum()) == len(trained) and b["input_ids"].shape == b["targets"].shape
    # the plain pair in the same batch still trains on its response only (the old rule)
    p, r = tok.encode("a"), tok.encode("b") + [tok.eos_id]
    pad = b["loss_mask"].shape[1] - (len(p) + len(r) - 1)
    assert b["loss_mask"][1].tolist() == [0] * (len(p) - 1) + [1] * len(r) + [0] * pad


def read_demonstrations_from_rows(rows: list[dict]) -> list:
    from jobs.data.tasks.user_data import Row, demonstration

    return [demonstration(Row(f"mem: row {i}", r), "messages") for i, r in enumerate(rows)]


# --- the jobs refuse bad rows before any worker starts, and write nothing ----------------------------------------
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from models.checkpoint import save_checkpoint
    from models.config import GPTConfig
    from models.gpt import GPT
    from models.heads import RewardModel
    from models.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("ck")
    tk = Tokenizer.train(["User: hello there. Assistant: hi!" * 20], 300)
    torch.manual_seed(0)
    cfg = GPTConfig.from_name("nano", vocab_size=tk.vocab_size)
    return {"lm": str(save_checkpoint(GPT(cfg), root / "lm", tokenizer=tk)),
            "rm": str(save_checkpoint(RewardModel(cfg), root / "rm", kind="reward", tokenizer=tk))}


def test_sft_refuses_before_writing(tmp_path: Path, ckpts: dict[str, str]) -> None:
    from jobs.sft import SFTConfig
    from jobs.sft import run as sft_run

    f = jsonl(tmp_path / "c.jsonl", [CONVS[0], {"messages": [U("a"), {"role": "robot", "content": "b"}]}])
    cfg = from_dict(SFTConfig, {"runs_root": str(tmp_path / "runs"), "init_from": ckpts["lm"],
                                "task": {"name": "files", "data": str(f)}, "eval": {"prompts": 0}})
    with pytest.raises(UserDataError, match=r"c.jsonl: row 1: messages\[1\]: unknown role 'robot'"):
        sft_run(cfg)
    assert not (tmp_path / "runs").exists()


def test_rm_refuses_before_writing(tmp_path: Path, ckpts: dict[str, str]) -> None:
    from jobs.rm import RMConfig
    from jobs.rm import run as rm_run

    f = jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                     {"prompt": "a", "chosen": "b", "rejected": ""}])
    cfg = from_dict(RMConfig, {"runs_root": str(tmp_path / "runs"), "init_from": ckpts["lm"], "comparisons": str(f),
                               "normalize_demonstrations": 0})
    with pytest.raises(UserDataError, match="p.jsonl: row 1: rejected is empty"):
        rm_run(cfg)
    assert not (tmp_path / "runs").exists()


def test_ppo_refuses_bad_prompt_file_before_writing(tmp_path: Path, ckpts: dict[str, str]) -> None:
    from jobs.rl.config import PPOJobConfig
    from jobs.rl.controller import Controller

    f = jsonl(tmp_path / "pr.jsonl", [{"prompt": "fine"}, {"text": "no prompt here"}])
    cfg = from_dict(PPOJobConfig, {"runs_root": str(tmp_path / "runs"), "policy": ckpts["lm"],
                                   "reward_model": ckpts["rm"], "gold": None, "prompts": {"source": str(f)}})
    with pytest.raises(ConfigError, match="prompts.source: .*pr.jsonl: row 1: missing column"):
        Controller(cfg)
    g = jsonl(tmp_path / "pm.jsonl", [{"messages": [U("a")]}, {"messages": [U("a"), A("b")]}])
    cfg = from_dict(PPOJobConfig, {"runs_root": str(tmp_path / "runs"), "policy": ckpts["lm"],
                                   "reward_model": ckpts["rm"], "gold": None, "prompts": {"source": str(g)}})
    with pytest.raises(ConfigError, match="pm.jsonl: row 1: messages: a prompt must not end with an assistant"):
        Controller(cfg)
    assert not (tmp_path / "runs").exists()


# --- the example configs read the example files (one config per format) ------------------------------------------
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_byod_configs_read_their_formats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.config import load_config
    from jobs.data.sample_data import write_samples
    from jobs.rl.config import PPOJobConfig
    from jobs.rm import RMConfig
    from jobs.sft import SFTConfig

    monkeypatch.chdir(tmp_path)
    write_samples("data/byod")
    seen = set()
    for name, cls in (("sft-messages", SFTConfig), ("sft-prompt-completion", SFTConfig)):
        cfg = load_config(cls, CONFIGS / f"byod-{name}.yaml")
        task = build_task(cfg.task)
        seen.add(task.format)
        assert len(task.demonstrations()) > 20 and task.prompts("heldout")
    for name in ("rm-pairwise", "rm-kwise"):
        cfg = load_config(RMConfig, CONFIGS / f"byod-{name}.yaml")
        comps = read_preferences(cfg.comparisons)
        seen.add(FilesTask(cfg.comparisons).format)
        assert len(comps) == 48 and all(c.best.startswith(" yes") for c in comps)
        build_task(cfg.task).demonstrations()  # the normalisation demonstrations exist
    cfg = load_config(PPOJobConfig, CONFIGS / "byod-ppo-prompts.yaml")
    prompts = read_prompts(cfg.prompts.source)
    seen.add(FilesTask(cfg.prompts.source).format)
    assert len(prompts) == 48 and all(p.endswith("?\nAssistant:") for p in prompts)
    assert seen == {"messages", "prompt-completion", "pairwise", "kwise", "prompts"}


def test_rm_comparisons_from_a_directory_of_user_files(tmp_path: Path) -> None:
    from jobs.rm import RMConfig, _comparison_files

    d = tmp_path / "prefs"
    jsonl(d / "a.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    parquet(d / "b.parquet", [{"prompt": "q", "chosen": "c", "rejected": "r"}])
    train, held = _comparison_files(from_dict(RMConfig, {"comparisons": str(d)}))
    assert (train, held) == (d, None) and len(read_preferences(train)) == 2
    gen = tmp_path / "gen"  # the layout `raygpt rm` samples into keeps its meaning
    parquet(gen / "train.parquet", [{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]}])
    parquet(gen / "heldout.parquet", [{"prompt": "q", "responses": ["a", "b"], "ranking": [0, 1]}])
    assert _comparison_files(from_dict(RMConfig, {"comparisons": str(gen)})) == (gen / "train.parquet",
                                                                                 gen / "heldout.parquet")


def test_rm_accuracy_reads_pairwise_files(tmp_path: Path, ckpts: dict[str, str]) -> None:
    """`raygpt eval` scores an RM on its own held-out file, which may be pairwise user data: the accuracy equals
    the fraction of rows whose chosen response outscores the rejected one (scored one by one here)."""
    from jobs.rlhf.evaluation import proxy_scores, rm_accuracy
    from models.checkpoint import load_checkpoint, tokenizer_path
    from models.tokenizer import Tokenizer

    rows = [{"prompt": [U(f"hello {i}")], "chosen": [A("hi there" * (i % 3 + 1))], "rejected": [A("hello.")]}
            for i in range(12)]
    f = jsonl(tmp_path / "held.jsonl", rows)
    rm, tk = load_checkpoint(ckpts["rm"]), Tokenizer.from_file(tokenizer_path(ckpts["rm"]))
    wins = 0
    for c in read_preferences(f):
        chosen, rejected = (proxy_scores(rm, tk, [c.prompt], [r])[0] for r in c.responses)
        wins += chosen > rejected
    out = rm_accuracy(rm, tk, f)
    assert out["rm_comparisons"] == 12 and out["rm_accuracy"] == pytest.approx(wins / 12)
