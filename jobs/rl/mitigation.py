"""Against reward over-optimisation (issue 17; docs/OVEROPTIMISATION.md): the `mitigation` and `monitor` sections
of `raygpt ppo`, the stop rule, and the periodic held-out evaluation of the policy during training.

Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization") measure over-optimisation as the gold reward
peaking and falling while the proxy keeps rising, both against √KL(π‖π_init); the monitor writes exactly those
points (held-out gold, proxy, KL, distinct-2) into metrics.jsonl every `monitor.every` iterations, and the stop
rule ends a run on signals that need no labeler (KL over budget, the reward-model ensemble disagreeing more).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from actors.reward import RewardShaping
from jobs.config import ConfigError, field
from models.checkpoint import CheckpointError
from models.ensemble import ensemble_members, is_ensemble

# (where in the config, model checkpoint, function, weight, name): one term of the composed reward.
RewardItem = tuple[str, "str | None", "str | None", float, "str | None"]


@dataclass
class MitigationConfig:
    """Holding reward over-optimisation back (docs/OVEROPTIMISATION.md, measured in docs/BENCHMARKS.md): how the
    reward role shapes the proxy (actors/reward.py RewardShaping), and a stop rule on signals the run has without
    the labeler. The KL side is the kl section (target, horizon)."""

    ensemble: bool = field(False, help="reward_model is an ensemble checkpoint (`raygpt rm --set ensemble=N`): "
                                       "score with every member, combined as mean − ensemble_k·std")
    ensemble_k: float = field(0.0, help="conservative ensemble: standard deviations below the members' mean "
                                        "(Coste et al. 2023); 0 = the mean")
    normalize: Literal["none", "batch"] = field("none", help="batch: whiten the reward-model score over each scored "
                                                             "batch (per reward replica) before clipping")
    clip: float = field(0.0, help="clamp the (normalised) reward-model score to ±clip (0 = off)")
    repetition_penalty: float = field(0.0, help="subtract coef × the fraction of the response's token n-grams that "
                                                "repeat an earlier one (models/diversity.py repeated_ngrams)")
    repetition_n: int = field(2, help="n of the repetition penalty (and of the reward/repetition metric)")
    repetition_scope: Literal["response", "batch"] = field(
        "response", help="response: repeats within the response; batch: also n-grams another response contains")
    repetition_unit: Literal["token", "word"] = field(
        "token", help="token: n-grams of token ids; word: of the decoded whitespace-split words (what the "
                      "evaluator's distinct-n counts; the reward role decodes with the policy's tokenizer)")
    repetition_reduction: Literal["mean", "sum"] = field(
        "mean", help="mean: the penalty is coef × the fraction of the response's n-grams that repeat; sum: coef × "
                     "their number (with scope batch: the repeated n-grams the response adds to the batch)")
    length_penalty: float = field(0.0, help="subtract coef × response tokens (negative rewards length)")
    stop_kl: float = field(0.0, help="stop rule: end the run when the training KL per response exceeds this for "
                                     "stop_patience iterations in a row (0 = off)")
    stop_disagreement: float = field(0.0, help="stop rule (ensemble): end the run when the members' disagreement "
                                               "(reward/ensemble_std) exceeds this multiple of its first "
                                               "iteration's value for stop_patience iterations in a row (0 = off)")
    stop_patience: int = field(3, help="iterations in a row a stop signal must hold")

    def validate(self) -> None:
        for name in ("ensemble_k", "clip", "repetition_penalty", "stop_kl", "stop_disagreement"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.repetition_n < 1 or self.stop_patience < 1:
            raise ConfigError("repetition_n/stop_patience: must be >= 1")
        if self.stop_disagreement and not self.ensemble:
            raise ConfigError("stop_disagreement: needs an ensemble (mitigation.ensemble: true)")

    def shaping(self) -> RewardShaping:
        return RewardShaping(ensemble=self.ensemble, ensemble_k=self.ensemble_k, normalize=self.normalize,
                             clip=self.clip, repetition_coef=self.repetition_penalty, repetition_n=self.repetition_n,
                             repetition_across=self.repetition_scope == "batch",
                             repetition_unit=self.repetition_unit, repetition_reduction=self.repetition_reduction,
                             length_coef=self.length_penalty)


@dataclass
class MonitorConfig:
    """Held-out evaluation of the policy during training (gold vs proxy against KL: Gao et al. 2022), off the
    driver: a Ray task samples the current weights on a few held-out prompts through the one evaluator."""

    every: int = field(0, help="evaluate every N iterations (0 = only the final evaluation)")
    prompts: int = field(32, help="held-out prompts per evaluation (the first N of prompts.eval_split)")

    def validate(self) -> None:
        if self.every < 0 or self.prompts < 1:
            raise ConfigError(f"every: must be >= 0, prompts >= 1 (got {self.every}, {self.prompts})")


def ensemble_items(items: list[RewardItem]) -> list[RewardItem]:
    """mitigation.ensemble: the one reward-model term expands into the ensemble's members rm_0, rm_1, …"""
    models = [i for i in items if i[1] is not None]
    if len(models) != 1 or not is_ensemble(models[0][1] or ""):
        raise ConfigError("mitigation.ensemble: needs exactly one reward model, an ensemble checkpoint (with "
                          "ensemble.json: `raygpt rm --set ensemble=N`)")
    where, path, _, weight, _ = models[0]
    try:
        members = ensemble_members(path or "")
    except CheckpointError as e:
        raise ConfigError(f"{where}: {e}") from None
    return [i for i in items if i[1] is None] + [(where, str(m), None, weight, f"rm_{j}")
                                                 for j, m in enumerate(members)]



class StopRule:
    """mitigation.stop_*: end the run early on signals available without the labeler. Fed each iteration's
    metrics; `update` returns the reason once a signal has held for `stop_patience` iterations in a row:
    - KL over budget: `kl` (the training rollouts' KL(π‖π_ref) per response) > stop_kl;
    - the ensemble disagreeing: `reward/ensemble_std` > stop_disagreement × its first iteration's value (the
      members agree on SFT-like samples; their spread grows where the policy leaves the comparisons' support).
    The run then ends after that iteration and exports its last weights (the policy at the stop)."""

    def __init__(self, cfg: MitigationConfig) -> None:
        self.cfg = cfg
        self.streak = {"kl": 0, "disagreement": 0}
        self.first_std: float | None = None

    def update(self, stats: dict[str, float]) -> str | None:
        c = self.cfg
        fired = {"kl": bool(c.stop_kl) and stats.get("kl", 0.0) > c.stop_kl, "disagreement": False}
        std = stats.get("reward/ensemble_std")
        if c.stop_disagreement and std is not None:
            if self.first_std is None:
                self.first_std = std
            fired["disagreement"] = std > c.stop_disagreement * self.first_std
        for k, on in fired.items():
            self.streak[k] = self.streak[k] + 1 if on else 0
        if self.streak["kl"] >= c.stop_patience:
            return f"KL per response above mitigation.stop_kl={c.stop_kl:g} for {self.streak['kl']} iterations"
        if self.streak["disagreement"] >= c.stop_patience:
            return (f"ensemble disagreement above {c.stop_disagreement:g}× its first value ({self.first_std:.3g}) "
                    f"for {self.streak['disagreement']} iterations")
        return None
