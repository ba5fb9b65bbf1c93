"""The embedded RLHF task: continue a line of verse so that it reads **positive** (docs/RLHF.md, "The task").

Prompts are the openings (first `prompt_words` words) of spoken lines from the held-in documents of the corpus
(`jobs.data.split_documents`'s "train" split, so the pretrained model has seen their plays and the held-out
plays stay unseen). The prompt set is then split train/held-out by a hash of the prompt text.

The simulated human labeler is VADER (Hutto & Gilbert 2014, `vaderSentiment`): a rule-based sentiment model that
ships its lexicon, runs offline and is fast (~60k lines/s). The gold score of a response is VADER's compound
score (in [−1, 1]) of the whole line as read, prompt + response, so a continuation cannot make
"I do not" + " love thee" positive. It plays the three labeler roles of InstructGPT §3.4:
- demonstrations: the real continuation of a line (rest of the line + the next `response_lines − 1` lines of the
  same speech) when the labeler scores it ≥ `demo_threshold` — what a labeler would approve;
- comparisons: ranking K sampled responses by gold score (`Task.rank`);
- evaluation: gold score and win rates on held-out prompts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

from jobs.data.tasks.base import Demonstration, Split, Task, TaskError, check_split, heldout_prompt

from jobs.data.corpus import DEFAULT_VALIDATION_FRACTION, load_documents, split_documents
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer


class VaderLabeler:
    """VADER's compound sentiment score of a text, in [−1, 1] (higher = more positive)."""

    def __init__(self) -> None:

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, text: str) -> float:
        return float(self._analyzer.polarity_scores(text)["compound"])

    def scores(self, texts: Sequence[str]) -> list[float]:
        return [self.score(t) for t in texts]


@dataclass(frozen=True)
class VerseLine:
    """A line split into its opening (the prompt) and its real continuation (a candidate demonstration)."""

    prompt: str
    continuation: str


def _opening(line: str, words: int) -> int | None:
    """Character index right after the `words`-th word of `line` (None if the line is shorter)."""
    m = re.match(r"\s*(?:\S+\s+){" + str(words - 1) + r"}\S+", line)
    return m.end() if m else None


def split_lines(text: str, prompt_words: int, response_lines: int, min_rest_words: int = 2) -> list[VerseLine]:
    """Every line of `text` with ≥ prompt_words + min_rest_words words, as (opening, continuation).

    Speeches are paragraphs (blank-line separated), lines are lines. The continuation is the rest of the line
    followed by up to `response_lines − 1` further lines of the same speech, joined by newlines.
    """
    out: list[VerseLine] = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.split("\n") if ln.strip()]
        for i, line in enumerate(lines):
            if len(line.split()) < prompt_words + min_rest_words:
                continue
            cut = _opening(line, prompt_words)
            if cut is None:
                continue
            rest = " " + line[cut:].strip()
            more = lines[i + 1:i + response_lines]
            out.append(VerseLine(line[:cut].strip(), "\n".join([rest, *more])))
    return out


class PositiveVerseTask(Task):
    """Continue a line of verse so that it reads positive; labeler = VADER. See the module docstring."""

    name = "positive-verse"

    def __init__(self, corpus: str = "shakespeare", validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
                 heldout_fraction: float = 0.1, prompt_words: int = 3, response_lines: int = 2,
                 demo_threshold: float = 0.5) -> None:
        if not 0.0 < heldout_fraction < 1.0:
            raise TaskError(f"task.heldout_fraction: must be in (0, 1), got {heldout_fraction}")
        if prompt_words < 1 or response_lines < 1:
            raise TaskError("task.prompt_words/task.response_lines: must be >= 1")
        if not -1.0 <= demo_threshold < 1.0:
            raise TaskError(f"task.demo_threshold: VADER's compound score lies in [-1, 1], got {demo_threshold}")
        self.corpus = corpus
        self.validation_fraction = validation_fraction
        self.heldout_fraction = heldout_fraction
        self.prompt_words = prompt_words
        self.response_lines = response_lines
        self.demo_threshold = demo_threshold

    @cached_property
    def labeler(self) -> VaderLabeler:
        return VaderLabeler()

    @cached_property
    def lines(self) -> list[VerseLine]:
        """All candidate lines of the held-in documents, in corpus order."""
        lines = _held_in_lines(self.corpus, self.validation_fraction, self.prompt_words, self.response_lines)
        if not lines:
            raise TaskError(f"task {self.name!r}: corpus {self.corpus!r} has no line with at least "
                            f"{self.prompt_words + 2} words in its held-in documents")
        return list(lines)

    @cached_property
    def _prompt_splits(self) -> dict[str, list[str]]:
        seen: set[str] = set()
        splits: dict[str, list[str]] = {"train": [], "heldout": []}
        for v in self.lines:
            if v.prompt not in seen:
                seen.add(v.prompt)
                splits["heldout" if heldout_prompt(v.prompt, self.heldout_fraction) else "train"].append(v.prompt)
        return splits

    def prompts(self, split: Split) -> list[str]:
        check_split(split)
        return list(self._prompt_splits[split])

    def demonstrations(self) -> list[Demonstration]:
        """Real continuations of train-prompt lines that the labeler scores ≥ demo_threshold (deduplicated)."""
        train = set(self._prompt_splits["train"])
        candidates = list(dict.fromkeys((v.prompt, v.continuation) for v in self.lines if v.prompt in train))
        scores = _scores_of_lines(tuple(p + r for p, r in candidates))
        demos = [Demonstration(p, r) for (p, r), s in zip(candidates, scores) if s >= self.demo_threshold]
        if not demos:
            raise TaskError(f"task {self.name!r}: no continuation scores >= demo_threshold={self.demo_threshold}")
        return demos

    def gold_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"gold_scores: {len(prompts)} prompts for {len(responses)} responses")
        # The line as read: the response continues the prompt's text directly (it carries its own leading space).
        return self.labeler.scores([p + r for p, r in zip(prompts, responses)])


# Jobs that run in one process (the demo: SFT, then the RM's normalisation) ask for the same lines and
# demonstrations more than once; labelling ~80k lines takes seconds, so both are memoised per process.
@lru_cache(maxsize=2)
def _held_in_lines(corpus: str, validation_fraction: float, prompt_words: int, response_lines: int
                   ) -> tuple[VerseLine, ...]:
    docs = split_documents(load_documents(corpus), validation_fraction)["train"]
    return tuple(v for d in docs for v in split_lines(d.text, prompt_words, response_lines))


@lru_cache(maxsize=2)
def _scores_of_lines(texts: tuple[str, ...]) -> tuple[float, ...]:
    return tuple(VaderLabeler().scores(texts))
