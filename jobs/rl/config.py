"""The typed config of `raygpt ppo` (one source of truth for YAML, `--set`, defaults and `--help`) and the
role specs built from it: each role receives only its own spec (actors/*.py), never this whole config.

Longer than 400 lines because every section of the job's config, the checks across sections (placement × algorithm
× engine × staleness) and the role specs derived from them are one contract; split, a check would sit apart from
the fields it relates."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from actors.engines import ENGINES
from actors.policy import PolicySpec, PPOUpdateSpec
from actors.reference import ReferenceSpec
from actors.reward import RewardComponent, RewardSpec
from actors.rollout_worker import RolloutWorkerSpec
from actors.value import ValueSpec
from cluster.deepspeed_engine import EngineSpec, OptimConfig
from cluster.faults import ActorFault
from cluster.placement import PlacementConfig, PlacementError, PlacementSpec
from jobs.config import ConfigError, field
from jobs.data.tasks import TaskConfig
from jobs.rl.mitigation import MitigationConfig, MonitorConfig, ensemble_items
from jobs.rl.staleness import check_config as check_staleness_config
from models.advantages import ADVANTAGE_ESTIMATORS, get_estimator
from models.generation import SamplingParams
from models.losses import LossAgg

DEFAULT_REWARD_MODEL = "runs/rm/checkpoint"


@dataclass
class KLConfig:
    """The KL penalty −β·KL(π‖π_ref) in the per-token reward (InstructGPT eq. 2)."""

    controller: Literal["adaptive", "fixed"] = field("adaptive", help="adaptive β (Ziegler et al. 2019 §2.2) or fixed")
    init_beta: float = field(0.1, help="initial β (the fixed β with controller=fixed)")
    target: float = field(6.0, help="adaptive: target KL per response (nats, summed over tokens)")
    horizon: float = field(10000.0, help="adaptive: horizon in samples (Ziegler et al.: 10000)")
    estimator: Literal["k1", "k2", "k3"] = field("k1", help="per-token KL estimator used in the reward")


@dataclass
class PPOConfig:
    """PPO update hyper-parameters (Schulman et al. 2017; values as in TRL's PPO defaults unless noted)."""

    epochs: int = field(4, help="PPO epochs over each batch")
    minibatch_size: int = field(8, help="rows per optimizer step, summed over data-parallel ranks")
    clip: float = field(0.2, help="ε of the clipped policy surrogate")
    value_clip: float = field(0.2, help="clip range of the value loss around the rollout-time values")
    gamma: float = field(1.0, help="discount γ of GAE")
    lam: float = field(0.95, help="GAE λ")
    whiten_advantages: bool = field(True, help="normalise advantages over the whole batch")
    policy_lr: float = field(2e-5, help="policy AdamW learning rate")
    value_lr: float = field(1e-5, help="value AdamW learning rate")
    weight_decay: float = field(0.0, help="AdamW weight decay of policy and value (matrices only, as in every "
                                          "engine: cluster/deepspeed_engine.py)")
    grad_clip: float = field(1.0, help="gradient-norm clip (0 = off)")
    entropy_coef: float = field(0.0, help="c₂ of PPO's entropy bonus (Schulman et al. 2017 eq. 9): the policy loss "
                                          "minus c₂ · the token-mean entropy of π (0 = off, as in TRL)")
    zero_stage: int = field(0, help="DeepSpeed ZeRO stage of policy and value (0-3; 3 needs rollout workers)")
    precision: Literal["auto", "fp32", "bf16"] = field("auto", help="auto = bf16 on GPU, fp32 on CPU")
    average_last: int = field(0, help="export the mean of the policy's weights after each of the last N iterations "
                                      "(tail averaging, as in SWA; 0 = the last weights); sampling and the "
                                      "held-out monitor use the current weights")


# algorithm → its advantage estimator (models/advantages.py ADVANTAGE_ESTIMATORS); docs/ALGORITHMS.md.
ALGORITHMS: dict[str, str] = {"ppo": "gae", "grpo": "grpo", "rloo": "rloo", "reinforce_pp": "reinforce_pp"}


@dataclass
class LossConfig:
    """Variants of the one clipped policy loss (models/losses.py `policy_loss`). Dr. GRPO = grpo with
    agg=seq-mean-token-sum-norm and group_scale=none; DAPO = grpo with agg=token-mean and clip_high=0.28."""

    agg: Literal["auto", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = field(
        "auto", help="loss aggregation; auto = seq-mean-token-mean for grpo (Shao et al. 2024 eq. 3), token-mean "
                     "otherwise; seq-mean-token-sum-norm = Dr. GRPO (normaliser: sampling.max_new_tokens)")
    clip_low: float | None = field(None, help="ε_low of the ratio clip (default: ppo.clip)")
    clip_high: float | None = field(None, help="ε_high of the ratio clip (default: ppo.clip; DAPO's clip-higher: "
                                               "0.28)")
    group_scale: Literal["group", "batch", "none"] = field(
        "group", help="grpo: divide the group-centred reward by the group's std (group), the batch's (batch) or not "
                      "at all (none = Dr. GRPO)")
    kl_in: Literal["auto", "reward", "loss"] = field(
        "auto", help="where β·KL(π‖π_ref) goes: the per-token reward (InstructGPT; kl.estimator) or a k3 loss term "
                     "(GRPO); auto = loss for grpo, reward otherwise. β comes from the kl section either way")
    behaviour_cap: float = field(3.0, help="max_staleness >= 1: truncation of the importance weight π_old/π_behav "
                                           "of stale rollouts (TRL's vllm_importance_sampling_clip_max)")

    def validate(self) -> None:
        for name in ("clip_low", "clip_high"):
            v = getattr(self, name)
            if v is not None and not v >= 0:
                raise ConfigError(f"{name}: must be >= 0, got {v}")


@dataclass
class RewardConfig:
    """One term of the composed reward r = Σ weight·r_i: a reward-model checkpoint or a 'module:callable'."""

    model: str | None = field(None, help="reward-model checkpoint directory")
    function: str | None = field(None, help="'module:callable' (prompts, responses) -> floats (a rule/verifier)")
    weight: float = field(1.0, help="weight of this term in the sum")
    name: str | None = field(None, help="key in metrics.jsonl (reward/<name>); default rm, rm_1, … / the "
                                        "callable's name")


@dataclass
class PtxConfig:
    """PPO-ptx (InstructGPT eq. 2): γ·pretraining LM loss mixed into every policy step."""

    coef: float = field(0.2, help="γ; 0 disables ptx (0.2 keeps the tiny demo's pretraining loss from rising at "
                                  "no cost in win rate: docs/PPO.md)")
    data: str = field("data/shakespeare", help="prepared Parquet dataset (`raygpt prepare`), its train split")
    batch_size: int = field(4, help="pretraining rows per optimizer step, summed over policy ranks")
    block_size: int = field(64, help="tokens per pretraining row")


@dataclass
class PromptsConfig:
    """Where prompts come from."""

    source: str = field("task", help="'task' = the task's prompts, or a .txt file with one prompt a line")
    split: str = field("train", help="task split for training prompts (held-in)")
    eval_split: str = field("heldout", help="task split for the final held-out evaluation")
    eval_source: str | None = field(None, help="held-out prompts file (default: source)")
    eval_size: int = field(128, help="held-out prompts in the final evaluation (0 = skip)")


@dataclass
class FaultConfig:
    """Fault tolerance."""

    max_restarts: int = field(3, help="Ray restarts allowed per actor")
    max_stage_retries: int = field(2, help="times a stage is resubmitted after its workers were restarted")
    stage_timeout_s: float = field(600.0, help="longest wait for any stage; a hung worker counts as failed")
    inject: list[str] = field([], help="chaos: 'role:iteration:stage' makes replica 0 of role exit (os._exit) in its "
                                       "call of that stage of that iteration (0-based), after the work — for update "
                                       "after its first optimizer step (generate: policy|rollout; score: "
                                       "reference|reward|value; update: policy|value)")

    def validate(self) -> None:
        for item in self.inject:
            parse_fault(item)


@dataclass
class PPOJobConfig:
    """Online RL on Ray actors — PPO-ptx (policy, reference, reward, value) or a critic-free algorithm (GRPO,
    RLOO, REINFORCE++: no value role) — with workers exchanging rollouts via the object store."""

    name: str = field("ppo", help="run name: runs/<name>/")
    algorithm: Literal["ppo", "grpo", "rloo", "reinforce_pp"] = field(
        "ppo", help="ppo (GAE + critic) | grpo | rloo | reinforce_pp (critic-free: no value role); docs/ALGORITHMS.md")
    group_size: int = field(1, help="responses sampled per prompt (rows [g·G, (g+1)·G) are prompt g's group); "
                                    ">= 2 for grpo and rloo")
    runs_root: str = field("runs", help="directory holding run directories")
    seed: int = field(0, help="seed of prompts order, sampling and minibatch order (all derived, nothing stateful)")
    iterations: int = field(20, help="PPO iterations (each: generate, score, advantages, update)")
    batch_size: int = field(32, help="prompts per iteration (responses = batch_size × group_size)")
    policy: str = field("runs/sft/checkpoint", help="SFT checkpoint: initial policy and frozen reference")
    reward_model: str | None = field(DEFAULT_REWARD_MODEL, help="reward-model checkpoint (or use reward_function)")
    reward_function: str | None = field(None, help="'module:callable' user reward (prompts, responses) -> floats; "
                                                   "replaces the reward model")
    rewards: list[RewardConfig] = field([], help="composed reward Σ weight·r_i of reward models and functions, "
                                                 "e.g. [{model: runs/rm/checkpoint}, {function: 'pkg.mod:fn', "
                                                 "weight: 0.5}]; replaces reward_model / reward_function")
    value_init: str | None = field(None, help="critic init checkpoint (default: the reward model, else the policy)")
    tokenizer: str | None = field(None, help="tokenizer.json (default: the policy checkpoint's)")
    gold: str | None = field("task", help="gold labeler for metrics: 'task' (VADER), 'module:callable', or null")
    task: TaskConfig = field(TaskConfig(), help="the task: prompts and gold labeler (same section as sft/rm)")
    engine: str = field("native", help="rollout engine of the rollout workers: 'native' (the trainer's own "
                                       "log-probs) or 'vllm' (the `vllm` extra; the policy recomputes the old "
                                       "log-probs and logs the gap); needs placement.replicas.rollout >= 1")
    sampling: SamplingParams = field(SamplingParams(), help="sampling (temperature > 0: PPO needs a stochastic "
                                                             "policy; log-probs use the same temperature everywhere)")
    kl: KLConfig = field(KLConfig(), help="KL penalty and controller")
    ppo: PPOConfig = field(PPOConfig(), help="policy (and critic) update: epochs, minibatches, clip, learning rates")
    loss: LossConfig = field(LossConfig(), help="policy-loss variants (aggregation, clip-higher, KL placement)")
    ptx: PtxConfig = field(PtxConfig(), help="pretraining mix")
    prompts: PromptsConfig = field(PromptsConfig(), help="prompts")
    mitigation: MitigationConfig = field(MitigationConfig(), help="against reward over-optimisation (docs)")
    monitor: MonitorConfig = field(MonitorConfig(), help="held-out evaluation during training")
    placement: PlacementConfig = field(PlacementConfig(), help="role → pool → bundles (see cluster/placement.py)")
    fault: FaultConfig = field(FaultConfig(), help="fault tolerance")
    max_staleness: int = field(0, help="asynchronous RL: rollout workers sample iterations t+1…t+k during the "
                                       "update of t, with weights ≤ k versions old (0 = synchronous; docs/PPO.md)")
    keep_checkpoints: int = field(2, help="trainer_state checkpoints kept (one per iteration is written)")
    resume: bool = field(False, help="continue runs/<name>/ from its latest trainer_state checkpoint")
    address: str | None = field(None, help="Ray cluster address (default: $RAY_ADDRESS, else an embedded cluster)")
    num_cpus: int | None = field(None, help="logical CPUs of the embedded cluster (default: all)")

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"engine: unknown rollout engine {self.engine!r} (engines: {', '.join(ENGINES)})")
        if self.engine != "native" and self.placement.replicas.get("rollout", 0) < 1 \
                and self.placement.rollout_workers.max < 1:
            raise ConfigError(f"engine: {self.engine!r} samples on rollout workers; set placement.replicas.rollout "
                              ">= 1 or placement.rollout_workers (the policy itself samples with the native engine)")
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm: unknown algorithm {self.algorithm!r}; expected one of {list(ALGORITHMS)}")
        try:
            get_estimator(self.estimator, self.group_size)
        except ValueError as e:
            msg = str(e).removeprefix("group_size: ")
            raise ConfigError(f"group_size: {msg} (algorithm {self.algorithm})") from None
        try:
            spec = self.placement_spec()
        except PlacementError as e:
            raise ConfigError(f"placement.{e}") from None
        if self.iterations < 1 or self.batch_size < 1:
            raise ConfigError("iterations/batch_size: must be >= 1")
        self.reward_components()  # raises naming rewards[i] / reward_model / reward_function
        if self.sampling.temperature <= 0:
            raise ConfigError(f"sampling.temperature: RL samples from the policy; must be > 0, got "
                              f"{self.sampling.temperature}")
        for role in ("policy", "reference", "reward"):
            if role not in spec.roles or spec.roles[role].replicas < 1:
                raise ConfigError(f"placement.replicas.{role}: every RL job needs at least one {role} replica")
        n_value = spec.roles["value"].replicas if "value" in spec.roles else 0
        if self.needs_critic and n_value < 1:
            raise ConfigError(f"placement.replicas.value: algorithm {self.algorithm} trains a critic and needs at "
                              "least one value replica")
        if not self.needs_critic and n_value > 0:
            raise ConfigError(f"placement.replicas.value: algorithm {self.algorithm} is critic-free; it places no "
                              f"value role (got {n_value} replica(s); set it to 0 or leave it out)")
        for role in ("policy", "value") if self.needs_critic else ("policy",):
            n = spec.roles[role].replicas
            if self.ppo.minibatch_size % n:
                raise ConfigError(f"ppo.minibatch_size: {self.ppo.minibatch_size} is not divisible by the {n} "
                                  f"{role} replicas")
            if self.rows % self.ppo.minibatch_size:
                raise ConfigError(f"batch_size: {self.batch_size} prompts × group_size {self.group_size} = "
                                  f"{self.rows} responses is not a multiple of ppo.minibatch_size="
                                  f"{self.ppo.minibatch_size}")
        if self.ptx.coef < 0:
            raise ConfigError(f"ptx.coef: must be >= 0, got {self.ptx.coef}")
        if not self.ppo.entropy_coef >= 0:
            raise ConfigError(f"ppo.entropy_coef: must be >= 0, got {self.ppo.entropy_coef}")
        if not 0 <= self.ppo.average_last <= self.iterations:
            raise ConfigError(f"ppo.average_last: must be in [0, iterations={self.iterations}], got "
                              f"{self.ppo.average_last}")
        if self.ptx.coef > 0 and self.ptx.batch_size % spec.roles["policy"].replicas:
            raise ConfigError(f"ptx.batch_size: {self.ptx.batch_size} is not divisible by the policy replicas")
        if self.ppo.zero_stage == 3 and self.generators(spec)[0] == "policy":
            raise ConfigError("ppo.zero_stage: stage 3 partitions the policy's weights; sample with rollout workers "
                              "(placement.replicas.rollout >= 1) or use stage <= 2")
        if self.ppo.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"ppo.zero_stage: must be 0-3, got {self.ppo.zero_stage}")
        if self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints: must be >= 1 (fault recovery reloads the latest)")
        # max_staleness: >= 0; with k >= 1 rollout workers and an algorithm that corrects for stale samples
        check_staleness_config(self.max_staleness, self.loss.behaviour_cap, self.generators(spec)[0], self.algorithm)

    # --- derived ----------------------------------------------------------------------------------------------
    @property
    def estimator(self) -> str:
        return ALGORITHMS.get(self.algorithm, self.algorithm)

    @property
    def needs_critic(self) -> bool:
        return ADVANTAGE_ESTIMATORS[self.estimator].needs_critic if self.estimator in ADVANTAGE_ESTIMATORS else True

    @property
    def rows(self) -> int:
        """Responses per iteration: batch_size prompts × group_size samples."""
        return self.batch_size * self.group_size

    @property
    def loss_agg(self) -> LossAgg:
        if self.loss.agg != "auto":
            return self.loss.agg
        return "seq-mean-token-mean" if self.algorithm == "grpo" else "token-mean"

    @property
    def kl_in_loss(self) -> bool:
        return self.loss.kl_in == "loss" or (self.loss.kl_in == "auto" and self.algorithm == "grpo")

    def placement_spec(self) -> PlacementSpec:
        """The placement; a value role left out of placement.replicas is placed only for an algorithm with a critic."""
        return self.placement.check(defaults={"value": 1 if self.needs_critic else 0})

    def reward_components(self) -> list[RewardComponent]:
        """The composed reward's terms: `rewards`, else the reward_model / reward_function shorthand. ConfigError
        naming the field for a term with neither or both of model/function, a bad weight, a duplicate name, or a
        function that does not import."""
        if self.rewards:
            if self.reward_function is not None or self.reward_model not in (None, DEFAULT_REWARD_MODEL):
                raise ConfigError("rewards: give either rewards or the reward_model / reward_function shorthands "
                                  "(set reward_model: null)")
            items = [(f"rewards[{i}]", r.model, r.function, r.weight, r.name) for i, r in enumerate(self.rewards)]
        else:
            if (self.reward_model is None) == (self.reward_function is None):
                raise ConfigError("reward_model: give exactly one of reward_model and reward_function (set the other "
                                  "to null), or a list of rewards")
            items = [("reward_model" if self.reward_model else "reward_function", self.reward_model,
                      self.reward_function, 1.0, None)]
        items = ensemble_items(items) if self.mitigation.ensemble else items  # members rm_0, rm_1, …
        out: list[RewardComponent] = []
        n_models = sum(1 for _, m, _, _, _ in items if m is not None)
        for where, model, function, weight, name in items:
            if (model is None) == (function is None):
                raise ConfigError(f"{where}: give exactly one of model and function")
            if not math.isfinite(weight):
                raise ConfigError(f"{where}.weight: must be finite, got {weight}")
            if function is not None:
                check_importable(function, f"{where}.function" if where.startswith("rewards") else where)
            default = (function or "").rpartition(":")[2] if function else \
                ("rm" if n_models == 1 else f"rm_{sum(1 for c in out if c.checkpoint is not None)}")
            try:
                out.append(RewardComponent(name or default, abspath(model), function, float(weight)))
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
        names = [c.name for c in out]
        if len(set(names)) != len(names):
            raise ConfigError(f"rewards: component names must be unique, got {names} (set rewards[i].name)")
        return out

    def reward_models(self) -> list[str]:
        """Checkpoint directories of the reward-model terms, in order."""
        return [c.checkpoint for c in self.reward_components() if c.checkpoint is not None]

    def generators(self, spec: PlacementSpec | None = None) -> tuple[str, int]:
        """(role, prompt shards): the rollout workers, `max` shards however many are alive; else one per policy rank."""
        spec = spec or self.placement_spec()
        return ("rollout", spec.rollout.max) if spec.rollout else ("policy", spec.roles["policy"].replicas)

    def run_dir(self) -> Path:
        return Path(self.runs_root) / self.name


# stage → role → the worker method that runs it: what `fault.inject` arms (cluster/faults.py).
STAGE_METHODS = {"generate": {"policy": "generate", "rollout": "generate"},
                 "score": {"reference": "compute_logprobs", "reward": "score", "value": "compute_values"},
                 "update": {"policy": "update", "value": "update"},
                 "checkpoint": {"policy": "save", "value": "save"}}  # after the update: the iteration is redone


def check_importable(path: str, field_name: str) -> None:
    """'module:callable' must import in the driver (the workers import it the same way): ConfigError naming the
    field otherwise. Only imports; a class is instantiated on the workers (actors/reward.py import_function)."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ConfigError(f"{field_name}: expected 'module:callable', got {path!r}")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{field_name}: cannot import {path!r} ({e})") from None
    if not callable(obj):
        raise ConfigError(f"{field_name}: {path!r} is not callable")


def parse_fault(item: str) -> ActorFault:
    """'role:iteration:stage' → the planned fault; the role must take part in that stage."""
    return ActorFault.parse(item, STAGE_METHODS)


def abspath(p: str | None) -> str | None:
    """Workers do not share the driver's working directory: every path handed to them is absolute."""
    return None if p is None else str(Path(p).expanduser().resolve())


@dataclass(frozen=True)
class RoleSpecs:
    policy: PolicySpec
    reference: ReferenceSpec
    reward: RewardSpec
    value: ValueSpec
    rollout: RolloutWorkerSpec


def role_specs(cfg: PPOJobConfig, eos_id: int, tokenizer_path: str, n_policy: int, n_value: int) -> RoleSpecs:
    s = sampling = cfg.sampling
    p = cfg.ppo

    def engine(lr: float, replicas: int) -> EngineSpec:  # constant LR; one optimizer step per minibatch
        optim = OptimConfig.constant(lr, weight_decay=p.weight_decay, grad_clip=p.grad_clip,
                                     micro_batch_size=p.minibatch_size // replicas)
        return EngineSpec(optim, zero_stage=p.zero_stage, precision=p.precision)

    n_value = max(n_value, 1)  # a critic-free algorithm starts no value role; its spec is never used
    policy_engine, value_engine = engine(p.policy_lr, n_policy), engine(p.value_lr, n_value)
    policy_dir = abspath(cfg.policy) or ""
    components = cfg.reward_components()
    shaping = cfg.mitigation.shaping()
    models = [c.checkpoint for c in components if c.checkpoint is not None]
    value_init = abspath(cfg.value_init) or (models[0] if models else None) or policy_dir
    agg = cfg.loss_agg
    norm = s.max_new_tokens if agg == "seq-mean-token-sum-norm" else None  # Dr. GRPO's constant normaliser
    return RoleSpecs(
        policy=PolicySpec(policy_dir, policy_engine, sampling, eos_id,
                          PPOUpdateSpec(epochs=p.epochs, minibatch_size=p.minibatch_size // n_policy, clip_eps=p.clip,
                                        ptx_coef=cfg.ptx.coef, entropy_coef=p.entropy_coef, seed=cfg.seed,
                                        clip_low=cfg.loss.clip_low,
                                        clip_high=cfg.loss.clip_high, loss_agg=agg,
                                        max_response_len=norm,
                                        behaviour_cap=cfg.loss.behaviour_cap if cfg.max_staleness else None,
                                        average_from=cfg.iterations - p.average_last if p.average_last else None)),
        reference=ReferenceSpec(policy_dir, temperature=s.temperature),
        reward=RewardSpec(components=tuple(components), eos_id=eos_id, shaping=shaping,
                          tokenizer=tokenizer_path if any(c.function for c in components) or shaping.decodes
                          else None),
        value=ValueSpec(value_init, value_engine, epochs=p.epochs, minibatch_size=p.minibatch_size // n_value,
                        clip_eps=p.value_clip, seed=cfg.seed),
        rollout=RolloutWorkerSpec(policy_dir, sampling, eos_id, engine=cfg.engine),
    )


def plan(cfg: PPOJobConfig) -> str:
    """The placement plan printed by --dry-run."""
    spec = cfg.placement_spec()
    role, n = cfg.generators(spec)
    critic = "value role (critic, GAE)" if cfg.needs_critic else "no value role (critic-free)"
    kl = "a k3 loss term" if cfg.kl_in_loss else f"the reward ({cfg.kl.estimator})"
    lines = [f"algorithm: {cfg.algorithm} (estimator {cfg.estimator}; {critic}); loss {cfg.loss_agg}; KL in {kl}",
             spec.describe(), f"generation: {role} × {n}"
             + (f", {cfg.group_size} samples per prompt (prefill shared)" if cfg.group_size > 1 else ""),
             "reward: " + " + ".join(f"{c.weight:g}·{c.name}" for c in cfg.reward_components()),
             f"per iteration: {cfg.batch_size} prompts × {cfg.group_size} = {cfg.rows} responses → "
             f"{cfg.ppo.epochs} epochs × {cfg.rows // cfg.ppo.minibatch_size} minibatches of {cfg.ppo.minibatch_size}"]
    return "\n".join(lines)
