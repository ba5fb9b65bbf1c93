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

Shaping against reward over-optimisation (`RewardShaping`; docs/OVEROPTIMISATION.md; Gao et al. 2022): the
reward-model terms can be combined as an ensemble, conservatively (mean − k·std over members, Coste et al. 2023
"Reward Model Ensembles Help Mitigate Overoptimization" §3), normalised over the scored batch and clipped (so
pushing the proxy beyond a bound earns nothing), and repeated n-grams or length can be penalised. Every call also
reports the batch's repetition rate and distinct-2 of response tokens and the ensemble's disagreement, penalised
or not, so every run shows them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from actors.base import ScoreMeta, device, load_model, score_meta
from actors.rollout import Rollout
from cluster.worker_group import DistributedWorker
from models.diversity import distinct_n, repeated_ngrams, word_ids
from models.ensemble import conservative_score
from models.heads import last_token_index

RewardFunction = Callable[[list[str], list[str]], Sequence[float]]


class RewardError(ValueError):
    """The reward spec or a user function's output is invalid; the message names the field."""


@dataclass(frozen=True)
class RewardComponent:
    """One term of the composed reward: a reward model or a `module:callable` rule/verifier, with its weight."""

    name: str  # key of its mean score in metrics.jsonl (`reward/<name>`)
    checkpoint: str | None = None  # reward-model checkpoint directory, or
    function: str | None = None  # "module:callable" user reward on decoded text
    weight: float = 1.0

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.function is None):
            raise RewardError(f"reward.{self.name}: give exactly one of checkpoint and function")


@dataclass(frozen=True)
class RewardShaping:
    """How the component scores become the sequence reward (order: ensemble → normalise → clip → + functions →
    − penalties). Defaults leave r = Σ w_i·r_i unchanged."""

    ensemble: bool = False  # reward-model terms are ensemble members: mean − ensemble_k·std (weights unused)
    ensemble_k: float = 0.0  # conservative ensemble: k standard deviations (population std over members) below
    normalize: Literal["none", "batch"] = "none"  # batch: whiten the model term over the rows this replica scores
    clip: float = 0.0  # clamp the (normalised) model term to [−clip, clip]; 0 = off
    repetition_coef: float = 0.0  # − coef × fraction of the response's token n-grams that repeat (`repeated_ngrams`)
    repetition_n: int = 2
    repetition_across: bool = False  # also count n-grams that another response of the batch contains
    repetition_unit: Literal["token", "word"] = "token"  # n-grams of tokens, or of the decoded whitespace words
    repetition_reduction: Literal["mean", "sum"] = "mean"  # fraction of the response's n-grams, or their number
    length_coef: float = 0.0  # − coef × response tokens (a negative coef rewards length)

    def __post_init__(self) -> None:
        if self.normalize not in ("none", "batch"):
            raise RewardError(f"reward.normalize: 'none' or 'batch', got {self.normalize!r}")
        if self.clip < 0 or self.ensemble_k < 0 or self.repetition_coef < 0:
            raise RewardError("reward.clip / ensemble_k / repetition_coef: must be >= 0")
        if self.repetition_n < 1:
            raise RewardError(f"reward.repetition_n: must be >= 1, got {self.repetition_n}")
        if self.repetition_unit not in ("token", "word"):
            raise RewardError(f"reward.repetition_unit: 'token' or 'word', got {self.repetition_unit!r}")
        if self.repetition_reduction not in ("mean", "sum"):
            raise RewardError(f"reward.repetition_reduction: 'mean' or 'sum', got {self.repetition_reduction!r}")

    @property
    def decodes(self) -> bool:
        """The shaping reads the decoded responses (a penalty on words), so the reward role needs a tokenizer."""
        return bool(self.repetition_coef) and self.repetition_unit == "word"


@dataclass(frozen=True)
class RewardSpec:
    """The sequence reward r(x, y) = Σ_i w_i·r_i(x, y) over `components`; `checkpoint` / `function` alone are the
    one-component shorthand (weight 1)."""

    checkpoint: str | None = None  # reward-model checkpoint directory, or
    function: str | None = None  # "module:callable" user reward on decoded text
    tokenizer: str | None = None  # tokenizer.json to decode with (required by a function)
    eos_id: int = 0  # the token that closes a response (`reward_inputs`)
    components: tuple[RewardComponent, ...] = ()
    shaping: RewardShaping = field(default_factory=RewardShaping)

    def __post_init__(self) -> None:
        if self.components and (self.checkpoint is not None or self.function is not None):
            raise RewardError("reward: give components, or one of reward.checkpoint and reward.function")
        if not self.components and (self.checkpoint is None) == (self.function is None):
            raise RewardError("reward: give exactly one of reward.checkpoint and reward.function")
        names = [c.name for c in self.parts()]
        if len(set(names)) != len(names):
            raise RewardError(f"reward.components: names must be unique, got {names}")
        if any(c.function is not None for c in self.parts()) and self.tokenizer is None:
            raise RewardError("reward.function: a user reward needs a tokenizer to decode responses")
        if self.shaping.decodes and self.tokenizer is None:
            raise RewardError("reward.repetition_unit: a penalty on words needs a tokenizer to decode responses")
        if self.shaping.ensemble and sum(c.checkpoint is not None for c in self.parts()) < 2:
            raise RewardError("reward.ensemble: an ensemble needs at least two reward-model checkpoints")

    def parts(self) -> tuple[RewardComponent, ...]:
        if self.components:
            return self.components
        name = "rm" if self.checkpoint is not None else "function"
        return (RewardComponent(name, self.checkpoint, self.function, 1.0),)


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
    """r(x, y) for each row: the weighted sum of the spec's components (reward models and user functions).
    Plain class; jobs/ppo.py wires it with `ray.remote`."""

    role = "reward"

    def __init__(self, spec: RewardSpec, rank: int = 0, world_size: int = 1) -> None:
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.eos_id = spec.eos_id
        self.parts = spec.parts()
        # One loaded scorer per component, in order: a model (nn.Module) or a function.
        self.scorers: list[nn.Module | RewardFunction] = []
        self.tokenizer = None
        for part in self.parts:
            if part.checkpoint is not None:
                self.scorers.append(load_model(part.checkpoint, "reward").eval().requires_grad_(False))
            else:
                self.scorers.append(import_function(part.function or "", f"reward.{part.name}.function"))
        if any(p.function is not None for p in self.parts) or spec.shaping.decodes:
            from models.tokenizer import Tokenizer

            self.tokenizer = Tokenizer.from_file(self.spec.tokenizer or "")

    @property
    def model(self) -> nn.Module | None:
        """The reward model of a one-model spec (what `scores` runs), else None."""
        return self.scorers[0] if len(self.scorers) == 1 and isinstance(self.scorers[0], nn.Module) else None

    def score(self, rollout: Rollout) -> tuple[ScoreMeta, Tensor]:
        """(meta with per-component means and the batch's text statistics, (B,) float32 composed sequence rewards
        on CPU). Statistics: `repetition` (mean `repeated_ngrams` of the responses, n = repetition_n, within each
        response), `distinct2_tokens` (distinct token bigrams of all responses), `response_tokens`, and with an
        ensemble `ensemble_std` (mean over rows of the members' std: their disagreement)."""
        parts = self.component_scores(rollout)
        scores = self.compose(parts, rollout)
        meta = score_meta(scores)
        means = {name: float(v.mean()) for name, v in parts.items()}
        resp, mask = rollout.response_ids, rollout.action_mask
        means["repetition"] = float(repeated_ngrams(resp, mask, self.spec.shaping.repetition_n).mean())
        means["distinct2_tokens"] = distinct_n([r[m.bool()].tolist() for r, m in zip(resp, mask)], 2)
        means["response_tokens"] = float(mask.sum(1).float().mean())
        members = self.members(parts)
        if members is not None:
            means["ensemble_std"] = float(members.std(0, correction=0).mean())
        return ScoreMeta(meta.rows, meta.mean, means), scores

    def members(self, parts: dict[str, Tensor]) -> Tensor | None:
        """(M, B) scores of the ensemble's members, or None without an ensemble."""
        if not self.spec.shaping.ensemble:
            return None
        return torch.stack([parts[p.name] for p in self.parts if p.checkpoint is not None])

    def compose(self, parts: dict[str, Tensor], rollout: Rollout | None = None) -> Tensor:
        """(B,) per component → (B,) reward. Without shaping Σ_i w_i·r_i; with it (RewardShaping, in order): the
        reward-model term (Σ w_i·r_i over models, or an ensemble's mean − k·std), whitened over the batch, clipped
        to ±clip; plus Σ w_j·f_j over functions; minus repetition_coef × `repeated_ngrams` and length_coef ×
        response tokens (both need the rollout)."""
        sh = self.spec.shaping
        zero = torch.zeros_like(next(iter(parts.values())))
        members = self.members(parts)
        if members is not None:
            model = conservative_score(members, sh.ensemble_k)
        else:
            model = sum((p.weight * parts[p.name] for p in self.parts if p.checkpoint is not None), zero)
        if sh.normalize == "batch" and model.numel() > 1:
            model = (model - model.mean()) / (model.std(correction=0) + 1e-6)
        if sh.clip > 0:
            model = model.clamp(-sh.clip, sh.clip)
        out = model + sum((p.weight * parts[p.name] for p in self.parts if p.function is not None), zero)
        if (sh.repetition_coef or sh.length_coef) and rollout is None:
            raise RewardError("reward: a repetition or length penalty needs the rollout's responses")
        if sh.repetition_coef and rollout is not None:
            if sh.decodes:  # the evaluator's unit: n-grams of the decoded whitespace words
                assert self.tokenizer is not None
                ids, mask = word_ids(decode_rollout(rollout, self.tokenizer.decode, self.tokenizer.eos_id)[1])
            else:
                ids, mask = rollout.response_ids, rollout.action_mask
            out = out - sh.repetition_coef * repeated_ngrams(ids, mask, sh.repetition_n, sh.repetition_across,
                                                            sh.repetition_reduction)
        if sh.length_coef and rollout is not None:
            out = out - sh.length_coef * rollout.action_mask.sum(1).float()
        return out

    @torch.no_grad()
    def scores(self, rollout: Rollout) -> Tensor:
        """(B,) float32 composed sequence rewards (CPU)."""
        return self.compose(self.component_scores(rollout), rollout)

    @torch.no_grad()
    def component_scores(self, rollout: Rollout) -> dict[str, Tensor]:
        """name → (B,) float32 score of each component (CPU), unweighted."""
        out: dict[str, Tensor] = {}
        texts: tuple[list[str], list[str]] | None = None
        for part, scorer in zip(self.parts, self.scorers):
            if isinstance(scorer, nn.Module):
                dev = device()
                ids, mask = reward_inputs(rollout.input_ids, rollout.attention_mask, self.eos_id)
                out[part.name] = scorer(ids.to(dev), mask.to(dev)).float().cpu()
                continue
            if texts is None:
                assert self.tokenizer is not None
                texts = decode_rollout(rollout, self.tokenizer.decode, self.tokenizer.eos_id)
            scores = torch.as_tensor([float(x) for x in scorer(*texts)], dtype=torch.float32)
            where = f"reward.{part.name}.function"
            if scores.shape != (rollout.batch_size,):
                raise RewardError(f"{where}: returned {scores.numel()} scores for {rollout.batch_size} rows")
            if not bool(torch.isfinite(scores).all()):
                raise RewardError(f"{where}: returned a non-finite score at row "
                                  f"{int((~torch.isfinite(scores)).nonzero()[0])}")
            out[part.name] = scores
        return out
