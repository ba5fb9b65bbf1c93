"""The reward role: one scalar per full sequence — the reward model's score, or a user function (a rule or a
verifier) behind the same interface, `score(rollout) -> (B,)`.

Reward model (InstructGPT §3.5): `models.heads.RewardModel` reads its scalar head at the last real token of
prompt + response. User function: `"package.module:callable"` taking `(prompts, responses)` as lists of decoded
strings and returning one float per row; it runs inside this actor, so it can hold state (load a verifier once).
Inference only: replicas are independent.

The EOS rule (one place, `reward_inputs`): the reward model is trained on prompt + response + EOS and reads its
head at that closing EOS (jobs/data/examples.py `encode_example`), so every scored response ends with exactly one
EOS — a response cut at max_new_tokens gets one appended, one that ended by itself is scored as it is. The reward
role, the RM's own normalisation and accuracy, and evaluation's proxy score all go through `score_sequences` /
`reward_inputs`, so "proxy reward" means one thing everywhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from actors.base import ScoreMeta, device, load_model, score_meta
from actors.rollout import Rollout
from cluster.worker_group import DistributedWorker
from models.heads import last_token_index

RewardFunction = Callable[[list[str], list[str]], Sequence[float]]


class RewardError(ValueError):
    """The reward spec or a user function's output is invalid; the message names the field."""


@dataclass(frozen=True)
class RewardSpec:
    checkpoint: str | None = None  # reward-model checkpoint directory, or
    function: str | None = None  # "module:callable" user reward on decoded text
    tokenizer: str | None = None  # tokenizer.json to decode with (required by `function`)
    eos_id: int = 0  # the token that closes a response (`reward_inputs`)

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.function is None):
            raise RewardError("reward: give exactly one of reward.checkpoint and reward.function")
        if self.function is not None and self.tokenizer is None:
            raise RewardError("reward.function: a user reward needs a tokenizer to decode responses")


def import_function(path: str, field_name: str = "reward.function",
                    error: type[ValueError] = RewardError) -> RewardFunction:
    """`"module:callable"` → the callable (the module must be importable on the workers). A class is
    instantiated with no arguments (a verifier that loads something once); its `gold_scores` method is used if it
    has one (a task's labeler, jobs/data/tasks), else the instance must be callable. Errors name `field_name`."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise error(f"{field_name}: expected 'module:callable', got {path!r}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise error(f"{field_name}: cannot import {path!r} ({e})") from None
    if isinstance(fn, type):
        fn = fn()
    fn = getattr(fn, "gold_scores", fn)
    if not callable(fn):
        raise error(f"{field_name}: {path!r} is neither callable nor has gold_scores")
    return fn


def close_response(response: Sequence[int], eos_id: int) -> list[int]:
    """The response as the reward model reads it: ending with exactly one EOS (appended when it was cut)."""
    ids = list(response)
    return ids if ids and ids[-1] == eos_id else [*ids, eos_id]


def reward_inputs(input_ids: Tensor, attention_mask: Tensor, eos_id: int) -> tuple[Tensor, Tensor]:
    """(B, L) sequences (any padding) → (B, L + 1) with EOS appended after the last real token of every row that
    does not already end with EOS (`close_response`, vectorised)."""
    b = input_ids.shape[0]
    ids = torch.cat([input_ids, input_ids.new_full((b, 1), eos_id)], 1)
    mask = torch.cat([attention_mask, attention_mask.new_zeros((b, 1))], 1)
    last = last_token_index(attention_mask)
    rows = torch.arange(b, device=input_ids.device)
    cut = input_ids[rows, last] != eos_id  # the response was truncated: it needs its closing EOS
    # A right-padded row has room after its last token; a row that fills its width uses the new column.
    slot = last + 1
    ids[rows[cut], slot[cut]] = eos_id
    mask[rows[cut], slot[cut]] = 1
    return ids, mask


@torch.no_grad()
def score_sequences(model: nn.Module, sequences: Sequence[Sequence[int]], eos_id: int, batch_size: int = 64
                    ) -> Tensor:
    """(N,) float32 r(x, y) of token sequences prompt + response (with or without the closing EOS: `reward_inputs`
    adds it where missing), right-padded in batches."""
    model.eval()
    dev = next(model.parameters()).device
    out: list[Tensor] = []
    for i in range(0, len(sequences), batch_size):
        seqs = [list(s) for s in sequences[i:i + batch_size]]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), eos_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[j, :len(s)] = 1
        ids, mask = reward_inputs(ids, mask, eos_id)
        out.append(model(ids.to(dev), mask.to(dev)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def decode_rollout(rollout: Rollout, decode: Callable[[list[int]], str], eos_id: int) -> tuple[list[str], list[str]]:
    """Prompt and response texts of every row (padding and the closing EOS dropped)."""
    prompts, responses = [], []
    for b in range(rollout.batch_size):
        p = rollout.prompt_ids[b][rollout.prompt_mask[b].bool()].tolist()
        r = [t for t in rollout.response_ids[b][rollout.action_mask[b].bool()].tolist()]
        if r and r[-1] == eos_id:
            r = r[:-1]
        prompts.append(decode(p))
        responses.append(decode(r))
    return prompts, responses


class RewardWorker(DistributedWorker):
    """r(x, y) for each row. Plain class; jobs/ppo.py wires it with `ray.remote`."""

    role = "reward"

    def __init__(self, spec: RewardSpec, rank: int = 0, world_size: int = 1) -> None:
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.eos_id = spec.eos_id
        self.model = None
        self.function: RewardFunction | None = None
        if spec.checkpoint is not None:
            self.model = load_model(spec.checkpoint, "reward").eval().requires_grad_(False)
        else:
            from models.tokenizer import Tokenizer

            self.function = import_function(spec.function or "")
            self.tokenizer = Tokenizer.from_file(spec.tokenizer or "")

    def score(self, rollout: Rollout) -> tuple[ScoreMeta, Tensor]:
        """(meta, (B,) float32 sequence rewards on CPU)."""
        scores = self.scores(rollout)
        self.fault_point()
        return score_meta(scores), scores

    @torch.no_grad()
    def scores(self, rollout: Rollout) -> Tensor:
        """(B,) float32 sequence rewards (CPU)."""
        if self.model is not None:
            dev = device()
            ids, mask = reward_inputs(rollout.input_ids, rollout.attention_mask, self.eos_id)
            return self.model(ids.to(dev), mask.to(dev)).float().cpu()
        prompts, responses = decode_rollout(rollout, self.tokenizer.decode, self.tokenizer.eos_id)
        out = self.function(prompts, responses)  # type: ignore[misc]
        scores = torch.as_tensor([float(x) for x in out], dtype=torch.float32)
        if scores.shape != (rollout.batch_size,):
            raise RewardError(f"reward.function: returned {scores.numel()} scores for {rollout.batch_size} rows")
        if not bool(torch.isfinite(scores).all()):
            raise RewardError(f"reward.function: returned a non-finite score at row "
                              f"{int((~torch.isfinite(scores)).nonzero()[0])}")
        return scores
