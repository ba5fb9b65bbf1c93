"""The task interface and the embedded positive-verse task: prompt openings, deterministic split, demonstrations
approved by the labeler (checked against VADER called directly), rankings, plug-in tasks, labelled data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from jobs.config import ConfigError, from_dict
from jobs.data.tasks import (
    LabelledTask,
    PositiveVerseTask,
    TaskConfig,
    TaskError,
    build_task,
    rank_by_scores,
)
from jobs.data.tasks.positive_verse import split_lines

SPEECHES = [
    "O happy dagger, this is thy sheath; there rust,\nAnd let me die in sweet and gentle peace.\n\n"
    "My bounty is as boundless as the sea,\nMy love as deep; the more I give to thee,",
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n\n"
    "I hate the murderous villain and his foul black deeds,\nThe wretched grief and bitter woe of all.",
    "Good night, good night! parting is such sweet sorrow,\nThat I shall say good night till it be morrow.\n\n"
    "Love looks not with the eyes, but with the mind,\nAnd therefore is winged Cupid painted blind.",
    "All the world's a stage, and all the men and women\nMerely players; they have their exits and entrances,\n\n"
    "The fool doth think he is wise, but the wise man knows\nHimself to be a fool, a happy fool indeed.",
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n\n"
    "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date.",
    "What light through yonder window breaks? It is\nThe east, and Juliet is the sun, the lovely sun.\n\n"
    "Cowards die many times before their deaths;\nThe valiant never taste of death but once.",
]


@pytest.fixture()
def corpus(tmp_path: Path) -> str:
    for i, text in enumerate(SPEECHES):
        (tmp_path / f"play{i}.txt").write_text(text + "\n")
    return str(tmp_path)


def test_split_lines_hand_worked() -> None:
    text = "Now is the winter of our discontent\nMade glorious summer\n\nShort line here\nOther speech"
    lines = split_lines(text, prompt_words=3, response_lines=2)
    # the 3-word line "Short line here" has no continuation; "Made glorious summer" neither
    assert [(v.prompt, v.continuation) for v in lines] == [
        ("Now is the", " winter of our discontent\nMade glorious summer"),
    ]
    one = split_lines("To be, or not to be: that is the question:\nWhether 'tis nobler", 2, 1)
    assert one[0].prompt == "To be," and one[0].continuation == " or not to be: that is the question:"


def test_prompt_split_is_deterministic_and_disjoint(corpus: str) -> None:
    a = PositiveVerseTask(corpus=corpus, validation_fraction=0.2, heldout_fraction=0.3)
    b = PositiveVerseTask(corpus=corpus, validation_fraction=0.2, heldout_fraction=0.3)
    train, held = a.prompts("train"), a.prompts("heldout")
    assert train == b.prompts("train") and held == b.prompts("heldout")
    assert train and held and not set(train) & set(held)
    assert all(len(p.split()) == 3 for p in train + held)
    # prompts come from held-in documents only: the held-out play's lines never appear
    held_in_text = "".join(SPEECHES)
    assert all(p in held_in_text for p in train + held)
    with pytest.raises(ValueError, match="split"):
        a.prompts("validation")  # type: ignore[arg-type]


def test_demonstrations_are_labeler_approved_train_prompt_lines(corpus: str) -> None:
    task = PositiveVerseTask(corpus=corpus, validation_fraction=0.2, heldout_fraction=0.3, demo_threshold=0.4)
    demos = task.demonstrations()
    vader = SentimentIntensityAnalyzer()
    train = set(task.prompts("train"))
    assert demos
    for d in demos:
        assert d.prompt in train
        assert vader.polarity_scores(d.prompt + d.response)["compound"] >= 0.4
    # and every train line that VADER approves is among them (nothing approved is lost)
    approved = {(v.prompt, v.continuation) for v in task.lines if v.prompt in train
                and vader.polarity_scores(v.prompt + v.continuation)["compound"] >= 0.4}
    assert {(d.prompt, d.response) for d in demos} == approved


def test_gold_score_reads_the_whole_line() -> None:
    task = PositiveVerseTask()
    love, hate = task.gold_scores(["My heart is", "My heart is"], [" full of love and joy", " full of hate and woe"])
    assert love > 0.5 and hate < 0
    # negation in the prompt flips a positive continuation: the labeler reads prompt + response
    neg, pos = task.gold_scores(["I do not", "I do truly"], [" love thee", " love thee"])
    assert neg < 0 < pos


def test_rank_by_scores_best_first_and_position_independent() -> None:
    responses = ["a", "b", "c", "d"]
    assert rank_by_scores("p", responses, [0.1, 0.9, -0.5, 0.3]) == [1, 3, 0, 2]
    # ties: the order of tied responses follows the responses, not their positions
    tied = rank_by_scores("p", responses, [0.0, 0.0, 0.0, 0.0])
    shuffled = ["c", "a", "d", "b"]
    tied2 = rank_by_scores("p", shuffled, [0.0] * 4)
    assert [responses[i] for i in tied] == [shuffled[i] for i in tied2]
    assert sorted(tied) == [0, 1, 2, 3]


def test_task_rank_uses_the_labeler() -> None:
    task = PositiveVerseTask()
    responses = [" full of hate", " full of love", " full of stones"]
    ranking = task.rank("My heart is", responses)
    assert ranking[0] == 1 and ranking[-1] == 0


def test_task_config_and_plugins(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="name: unknown task"):
        from_dict(TaskConfig, {"name": "nope"})
    with pytest.raises(ConfigError, match="data"):
        from_dict(TaskConfig, {"name": "labelled"})
    cfg = from_dict(TaskConfig, {"name": "jobs.data.tasks.positive_verse:PositiveVerseTask",
                                 "options": {"prompt_words": 2}})
    task = build_task(cfg)
    assert isinstance(task, PositiveVerseTask) and task.prompt_words == 2
    with pytest.raises(TaskError, match="not a subclass"):
        build_task(from_dict(TaskConfig, {"name": "jobs.data.tasks.positive_verse:VaderLabeler"}))
    with pytest.raises(TaskError, match="cannot import"):
        build_task(from_dict(TaskConfig, {"name": "no_such_module:Task"}))


def test_labelled_task_from_jsonl(tmp_path: Path) -> None:
    rows = [{"prompt": f"prompt {i}", "responses": [f"worse {i}", f"better {i}"], "ranking": [1, 0]}
            for i in range(40)]
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = build_task(from_dict(TaskConfig, {"name": "labelled", "data": str(f)}))
    assert isinstance(task, LabelledTask) and not task.has_labeler
    train, held = task.prompts("train"), task.prompts("heldout")
    assert sorted(train + held) == sorted(r["prompt"] for r in rows) and held and train
    assert all(d.response.startswith("better") for d in task.demonstrations())
    assert {d.prompt for d in task.demonstrations()} == set(train)
    with pytest.raises(TaskError, match="no labeler"):
        task.gold_scores(["x"], ["y"])


def test_embedded_shakespeare_prompts() -> None:
    task = PositiveVerseTask()
    train, held = task.prompts("train"), task.prompts("heldout")
    assert len(train) > 10_000 and len(held) > 1_000
    assert not set(train) & set(held)
    assert 0.07 < len(held) / (len(train) + len(held)) < 0.13  # heldout_fraction 0.1 by hash
    assert held[:5] == PositiveVerseTask().prompts("heldout")[:5]


def test_prompt_formats_contexts_and_scores() -> None:
    from jobs.data.tasks.formats import BUILTIN, PromptFormat, resolve_formats, token_f1

    qa = BUILTIN["qa"]
    assert qa.context(0, 0) == "Q: Who is the Prince of Denmark?\nA:"
    # k-shot: the k examples after the query's own (cyclically), then the query; never its own answer
    two = qa.context(5, 2)
    assert two == "Q: Who is the Prince of Denmark?\nA: Hamlet\nQ: Who loves Juliet?\nA: Romeo\n" \
                  "Q: Who is the wife of Macbeth?\nA:"
    assert BUILTIN["translation"].context(1, 1) == "my love = mon amour\nthe king ="
    assert BUILTIN["tldr"].context(0, 0).endswith("London.\nTL;DR:")
    assert token_f1(" The Hamlet", "Hamlet") == 1.0 and token_f1("Lady Macbeth", " Macbeth") == pytest.approx(2 / 3)
    assert token_f1("Romeo", "Juliet") == 0.0
    with pytest.raises(TaskError, match="shots must be in"):
        qa.context(0, 6)
    with pytest.raises(TaskError, match="end with"):
        PromptFormat("bad", "{target} {input}", (("a", "b"), ("c", "d")))
    with pytest.raises(TaskError, match="unknown format"):
        resolve_formats(["nope"])


def test_user_prompt_formats_file(tmp_path: Path) -> None:
    from jobs.data.tasks.formats import resolve_formats

    f = tmp_path / "formats.json"
    f.write_text(json.dumps([{"name": "opposite", "template": "{input} is the opposite of{target}",
                              "separator": "\n", "examples": [["hot", " cold"], ["up", " down"]]}]))
    (fmt,) = resolve_formats(["opposite"], str(f))
    assert fmt.context(0, 1) == "up is the opposite of down\nhot is the opposite of"
