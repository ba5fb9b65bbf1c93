"""The task interface of the human-feedback stages (InstructGPT §3.2–3.5): where prompts come from, which
demonstrations the SFT model imitates, and how a labeler ranks K responses to one prompt.

A task supplies
- `prompts(split)`: the prompt set, split deterministically into "train" (SFT/RM/PPO) and "heldout" (evaluation);
- `demonstrations()`: labeler-approved (prompt, response) pairs for SFT, on train prompts only;
- `gold_scores(prompts, responses)`: the labeler's score of each response (higher = preferred). For the embedded
  task this is the simulated human (VADER); the reward model never sees it, only the rankings derived from it;
- `rank(prompt, responses)`: the labeler's ranking of K responses, best first.

A task without a labeler (user-supplied labelled data) raises `TaskError` from `gold_scores`; evaluation then
skips the gold metrics instead of inventing them.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from jobs.data.corpus import DataError
from models.chat import Message

Split = Literal["train", "heldout"]
SPLITS: tuple[str, ...] = ("train", "heldout")


class TaskError(DataError):
    """A task cannot provide what was asked (unknown task, no labeler, no demonstrations); names the task."""


@dataclass(frozen=True)
class Demonstration:
    """One SFT example: the response is what a labeler would write (or approved) for the prompt.

    A conversation (user data in the `messages` format) also keeps its messages: SFT then trains on every
    assistant turn (models.chat.encode_chat), while prompt/response are its last exchange rendered with the chat
    template (prompt + response + EOS = the rendered conversation), which is what the RM and eval read."""

    prompt: str
    response: str
    messages: tuple[Message, ...] = ()


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: must be one of {list(SPLITS)}, got {split!r}")


def stable_unit(text: str, salt: str = "") -> float:
    """A number in [0, 1) fixed by `text` alone (SHA-256): the same on every machine, Python hash seed and
    input order. Used for the prompt split and for breaking ties between equally scored responses."""
    digest = hashlib.sha256(f"{salt}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def heldout_prompt(prompt: str, fraction: float) -> bool:
    """Deterministic train/held-out assignment of one prompt by a hash of its text."""
    return stable_unit(prompt, "heldout") < fraction


def rank_by_scores(prompt: str, responses: Sequence[str], scores: Sequence[float]) -> list[int]:
    """Indices of `responses`, best first: by score descending; ties broken by a hash of (prompt, response), so
    the order of equally scored responses is arbitrary but reproducible and independent of their position
    (a position-based rule would teach the RM that earlier samples are better)."""
    if len(scores) != len(responses):
        raise ValueError(f"scores: {len(scores)} scores for {len(responses)} responses")
    return sorted(range(len(responses)),
                  key=lambda i: (-scores[i], stable_unit(f"{prompt}\0{responses[i]}", "tie"), i))


class Task(ABC):
    """A prompt distribution plus a (simulated or recorded) human labeler. Subclass it to plug in a task; see
    `jobs.data.tasks.build_task` for how a config names one (`module.path:ClassName`)."""

    name: str = "task"

    @abstractmethod
    def prompts(self, split: Split) -> list[str]:
        """Unique prompts of `split` ("train" or "heldout") in a deterministic order."""

    def demonstrations(self) -> list[Demonstration]:
        """Labeler-approved (prompt, response) pairs on train prompts, in a deterministic order."""
        raise TaskError(f"task {self.name!r}: provides no demonstrations")

    @property
    def has_labeler(self) -> bool:
        """Whether `gold_scores`/`rank` can judge new responses (False for recorded labels only)."""
        return True

    def gold_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """The labeler's score of each (prompt, response); higher is preferred."""
        raise TaskError(f"task {self.name!r}: has no labeler, so it cannot score new responses")

    def rank(self, prompt: str, responses: Sequence[str]) -> list[int]:
        """The labeler's ranking of K responses to one prompt: indices, best first (a permutation of 0..K−1)."""
        return rank_by_scores(prompt, responses, self.gold_scores([prompt] * len(responses), responses))
