"""The typed config of `raygpt ppo` (one source of truth for YAML, `--set`, defaults and `--help`) and the
role specs built from it: each role receives only its own spec (actors/*.py), never this whole config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from actors.policy import PolicySpec, PPOUpdateSpec
from actors.reference import ReferenceSpec
from actors.reward import RewardSpec
from actors.rollout_worker import RolloutWorkerSpec
from actors.value import ValueSpec
from cluster.deepspeed_engine import EngineSpec
from cluster.placement import PlacementConfig, PlacementError, PlacementSpec
from jobs.config import ConfigError, field
from jobs.data.tasks import TaskConfig
from models.generation import SamplingParams


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
    weight_decay: float = field(0.0, help="AdamW weight decay (policy and value)")
    grad_clip: float = field(1.0, help="gradient-norm clip (0 = off)")
    zero_stage: int = field(0, help="DeepSpeed ZeRO stage of policy and value (0-3; 3 needs rollout workers)")
    precision: Literal["auto", "fp32", "bf16"] = field("auto", help="auto = bf16 on GPU, fp32 on CPU")


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
    inject: list[str] = field([], help="fault injection for tests/demos: 'role:iteration:stage' makes replica 0 of "
                                       "role exit mid-call in that stage (generate: policy|rollout; score: "
                                       "reference|reward|value; update: policy|value)")


@dataclass
class PPOJobConfig:
    """PPO-ptx on Ray actors: policy, reference, reward and value workers exchanging rollouts via the object store."""

    name: str = field("ppo", help="run name: runs/<name>/")
    runs_root: str = field("runs", help="directory holding run directories")
    seed: int = field(0, help="seed of prompts order, sampling and minibatch order (all derived, nothing stateful)")
    iterations: int = field(20, help="PPO iterations (each: generate, score, advantages, update)")
    batch_size: int = field(32, help="prompts (= responses) per iteration")
    policy: str = field("runs/sft/checkpoint", help="SFT checkpoint: initial policy and frozen reference")
    reward_model: str | None = field("runs/rm/checkpoint", help="reward-model checkpoint (or use reward_function)")
    reward_function: str | None = field(None, help="'module:callable' user reward (prompts, responses) -> floats; "
                                                   "replaces the reward model")
    value_init: str | None = field(None, help="critic init checkpoint (default: the reward model, else the policy)")
    tokenizer: str | None = field(None, help="tokenizer.json (default: the policy checkpoint's)")
    gold: str | None = field("task", help="gold labeler for metrics: 'task' (VADER), 'module:callable', or null")
    task: TaskConfig = field(TaskConfig(), help="the task: prompts and gold labeler (same section as sft/rm)")
    sampling: SamplingParams = field(SamplingParams(), help="sampling (temperature > 0: PPO needs a stochastic "
                                                             "policy; log-probs use the same temperature everywhere)")
    kl: KLConfig = field(KLConfig(), help="KL penalty and controller")
    ppo: PPOConfig = field(PPOConfig(), help="PPO update")
    ptx: PtxConfig = field(PtxConfig(), help="pretraining mix")
    prompts: PromptsConfig = field(PromptsConfig(), help="prompts")
    placement: PlacementConfig = field(PlacementConfig(), help="role → pool → bundles (see cluster/placement.py)")
    fault: FaultConfig = field(FaultConfig(), help="fault tolerance")
    keep_checkpoints: int = field(2, help="trainer_state checkpoints kept (one per iteration is written)")
    resume: bool = field(False, help="continue runs/<name>/ from its latest trainer_state checkpoint")
    address: str | None = field(None, help="Ray cluster address (default: $RAY_ADDRESS, else an embedded cluster)")
    num_cpus: int | None = field(None, help="logical CPUs of the embedded cluster (default: all)")

    def validate(self) -> None:
        try:
            spec = self.placement.check()
        except PlacementError as e:
            raise ConfigError(f"placement.{e}") from None
        if self.iterations < 1 or self.batch_size < 1:
            raise ConfigError("iterations/batch_size: must be >= 1")
        if (self.reward_model is None) == (self.reward_function is None):
            raise ConfigError("reward_model: give exactly one of reward_model and reward_function (set the other "
                              "to null)")
        if self.sampling.temperature <= 0:
            raise ConfigError(f"sampling.temperature: PPO samples from the policy; must be > 0, got "
                              f"{self.sampling.temperature}")
        for role in ("policy", "reference", "reward", "value"):
            if role not in spec.roles or spec.roles[role].replicas < 1:
                raise ConfigError(f"placement.replicas.{role}: every PPO role needs at least one replica")
        for role in ("policy", "value"):
            n = spec.roles[role].replicas
            if self.ppo.minibatch_size % n:
                raise ConfigError(f"ppo.minibatch_size: {self.ppo.minibatch_size} is not divisible by the {n} "
                                  f"{role} replicas")
            if self.batch_size % self.ppo.minibatch_size:
                raise ConfigError(f"batch_size: {self.batch_size} is not a multiple of ppo.minibatch_size="
                                  f"{self.ppo.minibatch_size}")
        if self.ptx.coef < 0:
            raise ConfigError(f"ptx.coef: must be >= 0, got {self.ptx.coef}")
        if self.ptx.coef > 0 and self.ptx.batch_size % spec.roles["policy"].replicas:
            raise ConfigError(f"ptx.batch_size: {self.ptx.batch_size} is not divisible by the policy replicas")
        if self.ppo.zero_stage == 3 and self.generators(spec)[0] == "policy":
            raise ConfigError("ppo.zero_stage: stage 3 partitions the policy's weights; sample with rollout workers "
                              "(placement.replicas.rollout >= 1) or use stage <= 2")
        if self.ppo.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"ppo.zero_stage: must be 0-3, got {self.ppo.zero_stage}")
        if self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints: must be >= 1 (fault recovery reloads the latest)")
        for item in self.fault.inject:
            parse_fault(item)

    # --- derived ----------------------------------------------------------------------------------------------
    def placement_spec(self) -> PlacementSpec:
        return self.placement.check()

    def generators(self, spec: PlacementSpec | None = None) -> tuple[str, int]:
        """(role, replicas) that sample: the rollout workers if any, else the policy."""
        spec = spec or self.placement_spec()
        n = spec.roles["rollout"].replicas if "rollout" in spec.roles else 0
        return ("rollout", n) if n > 0 else ("policy", spec.roles["policy"].replicas)

    def run_dir(self) -> Path:
        return Path(self.runs_root) / self.name


STAGE_ROLES = {"generate": ("policy", "rollout"), "score": ("reference", "reward", "value"),
               "update": ("policy", "value")}


def parse_fault(item: str) -> tuple[str, int, str]:
    """'role:iteration:stage' → (role, iteration, stage); the role must take part in that stage."""
    parts = item.split(":")
    if len(parts) != 3 or parts[2] not in STAGE_ROLES or parts[0] not in STAGE_ROLES[parts[2]] \
            or not parts[1].isdigit():
        raise ConfigError(f"fault.inject: {item!r} is not 'role:iteration:stage' with a role of that stage "
                          f"({STAGE_ROLES})")
    return parts[0], int(parts[1]), parts[2]


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
    engine = dict(weight_decay=p.weight_decay, zero_stage=p.zero_stage, grad_clip=p.grad_clip, precision=p.precision)
    policy_engine = EngineSpec(lr=p.policy_lr, micro_batch_size=p.minibatch_size // n_policy, **engine)
    value_engine = EngineSpec(lr=p.value_lr, micro_batch_size=p.minibatch_size // n_value, **engine)
    policy_dir = abspath(cfg.policy) or ""
    value_init = abspath(cfg.value_init or cfg.reward_model or cfg.policy) or ""
    return RoleSpecs(
        policy=PolicySpec(policy_dir, policy_engine, sampling, eos_id,
                          PPOUpdateSpec(epochs=p.epochs, minibatch_size=p.minibatch_size // n_policy, clip_eps=p.clip,
                                        ptx_coef=cfg.ptx.coef, seed=cfg.seed)),
        reference=ReferenceSpec(policy_dir, temperature=s.temperature),
        reward=RewardSpec(checkpoint=abspath(cfg.reward_model), function=cfg.reward_function,
                          tokenizer=tokenizer_path if cfg.reward_function else None, eos_id=eos_id),
        value=ValueSpec(value_init, value_engine, epochs=p.epochs, minibatch_size=p.minibatch_size // n_value,
                        clip_eps=p.value_clip, seed=cfg.seed),
        rollout=RolloutWorkerSpec(policy_dir, sampling, eos_id),
    )


def plan(cfg: PPOJobConfig) -> str:
    """The placement plan printed by --dry-run."""
    spec = cfg.placement_spec()
    role, n = cfg.generators(spec)
    lines = [spec.describe(), f"generation: {role} × {n}",
             f"per iteration: {cfg.batch_size} prompts → {cfg.ppo.epochs} epochs × "
             f"{cfg.batch_size // cfg.ppo.minibatch_size} minibatches of {cfg.ppo.minibatch_size}"]
    return "\n".join(lines)
