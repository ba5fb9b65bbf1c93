"""RLHF advantage math: per-token KL estimators and rewards, GAE, whitening, and the KL-coefficient controllers.

Pure functions of tensors (shapes in each docstring; B = batch of responses, T = response length, right-padded).
`mask` is the action mask: 1 on generated response tokens, 0 on padding. Nothing here calls `.item()` or reads a
config object; the controllers are tiny host-side classes fed with already-reduced Python floats.

References
- InstructGPT: Ouyang et al. 2022, "Training language models to follow instructions with human feedback", eq. 2.
- Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2 (KL reward, adaptive β).
- GAE: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation", eq. 16.
- KL estimators k1/k2/k3: Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.
- GRPO: Shao et al. 2024, "DeepSeekMath", §4.1.2; Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like
  Training: A Critical Perspective", §3.1.
- RLOO: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
  Feedback in LLMs"; Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!".
- REINFORCE++: Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models".

Estimators are selected by name through `ADVANTAGE_ESTIMATORS` / `compute_advantages` ("gae" | "grpo" | "rloo" |
"reinforce_pp"), each formula written once below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from models.masked import masked_mean, masked_var

KLKind = Literal["k1", "k2", "k3"]
KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3")


# --- KL estimators (per token, samples drawn from the policy π) -------------------------------------------------


def kl_k1(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k1 = log π(a) − log π_ref(a): unbiased for KL(π‖π_ref), high variance, can be negative. (...)→(...)."""
    return logp - logp_ref


def kl_k2(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π(a) − log π_ref(a))²: biased, low variance, ≥ 0. (...)→(...)."""
    return 0.5 * (logp - logp_ref) ** 2


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k3 = r − 1 − log r with r = π_ref(a)/π(a): unbiased and ≥ 0 (log r ≤ r − 1). (...)→(...).

    Not clamped: a huge log-ratio overflows exp() to inf, which is the honest answer rather than a silent cap.
    """
    log_r = logp_ref - logp
    return torch.exp(log_r) - log_r - 1


_KL_FNS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(logp: torch.Tensor, logp_ref: torch.Tensor, kind: KLKind) -> torch.Tensor:
    """Per-token KL estimate of the given kind ("k1" | "k2" | "k3"). logp, logp_ref: (B, T) → (B, T)."""
    if kind not in _KL_FNS:
        raise ValueError(f"kind: unknown KL estimator {kind!r}; expected one of {KL_KINDS}")
    return _KL_FNS[kind](logp, logp_ref)


# --- rewards, GAE, whitening ------------------------------------------------------------------------------------


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of mask (B, T) → (B,) long; 0 for an all-zero row."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask.bool(), positions, 0).max(dim=-1).values


def per_token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r_t = −β·KL_t on every response token, plus the RM score on the last valid one.

    InstructGPT eq. 2 / Ziegler et al. 2019 §2.2: the objective is r_θ(x, y) − β·log(π/π_ref); spreading the KL
    term per token and paying the sequence score at the end gives the per-token reward PPO's GAE consumes.
    score: (B,) RM score per sequence; kl: (B, T) per-token KL estimate; mask: (B, T); beta: KL coefficient
    (float or 0-d tensor). Returns (B, T), exactly 0 at masked positions. A row with no valid token receives
    nothing (its score is dropped); callers reject empty responses before scoring.
    """
    if kl.shape != mask.shape or score.shape != kl.shape[:1]:
        raise ValueError(
            f"shapes: score {tuple(score.shape)}, kl {tuple(kl.shape)}, mask {tuple(mask.shape)}; "
            "expected (B,), (B, T), (B, T)"
        )
    valid = mask.bool()
    rewards = torch.where(valid, -beta * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    last = last_valid_index(mask)
    paid = torch.where(valid.any(dim=-1), score.to(kl.dtype), torch.zeros((), dtype=kl.dtype, device=kl.device))
    return rewards.scatter_add(-1, last.unsqueeze(-1), paid.unsqueeze(-1))


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 16), vectorised over the batch.

    δ_t = r_t + γ·V_{t+1} − V_t;  A_t = δ_t + γλ·A_{t+1};  returns R_t = A_t + V_t (the value-function target).
    rewards, values, mask: (B, T) → advantages, returns: (B, T), both 0 at masked positions.
    The value after the last valid token is 0 (the response ends the episode). Masked positions contribute
    nothing: the recursion steps over them, carrying V_{t+1} and A_{t+1} from the next valid token, so for a
    right-padded mask this is exactly the textbook recursion on each row's valid prefix. Reverse scan over T;
    no loop over B.
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"shapes: rewards {tuple(rewards.shape)}, values {tuple(values.shape)}, "
            f"mask {tuple(mask.shape)}; expected three equal (B, T)"
        )
    valid = mask.bool()
    zero = torch.zeros_like(rewards[:, 0])
    next_value, next_adv = zero, zero
    advantages = torch.zeros_like(rewards)
    for t in range(rewards.shape[1] - 1, -1, -1):
        m = valid[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(m, adv_t, zero)
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv_t, next_adv)
    returns = torch.where(valid, advantages + values, torch.zeros_like(values))
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Masked whitening: (x − μ)/√(σ² + eps) over valid positions (μ, σ² masked; σ² unbiased), 0 where masked.

    Advantage normalisation as in PPO implementations (TRL `masked_whiten`, OpenAI baselines). shift_mean=False
    rescales only (adds μ back), used for reward whitening. x, mask: (B, T) → (B, T).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device))


# --- critic-free estimators (one advantage per response, from a group of G responses per prompt) ----------------
#
# Group layout, used by every group estimator and by whoever samples: rows [g·G, (g+1)·G) of the batch are the G
# responses to prompt g (the sampler repeats each prompt G times consecutively, so a (B,) tensor viewed as
# (B/G, G) puts one prompt's group on one row). B must be a multiple of G and G >= 2 (a group of one has no
# baseline).

GroupScale = Literal["group", "batch", "none"]
GROUP_SCALES: tuple[str, ...] = ("group", "batch", "none")


def check_group_size(group_size: int, batch: int | None = None) -> None:
    """Raise ValueError naming `group_size` unless it is an integer >= 2 (and divides `batch`, when given)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(
            f"group_size: a group estimator compares responses to the same prompt and needs an integer >= 2, "
            f"got {group_size!r}"
        )
    if batch is not None and batch % group_size:
        raise ValueError(
            f"group_size: a batch of {batch} responses is not a whole number of groups of {group_size} "
            "(rows [g·G, (g+1)·G) are prompt g's group)"
        )


def sequence_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """R = score − β·Σ_t KL_t per response: `per_token_rewards` summed over the response. (B,), (B, T), (B, T) → (B,).

    The KL-in-reward sequence objective (Ziegler et al. 2019 §2.2) as the critic-free estimators consume it; RLOO's
    paper and TRL's RLOOTrainer use it with the k1 estimator (Ahmadian et al. 2024). β = 0 gives the score.
    """
    return per_token_rewards(score, kl, mask, beta).sum(dim=-1)


def _group_std(grouped: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel) standard deviation along the last axis, as TRL's `nanstd` and Shao et al.'s std."""
    return grouped.std(dim=-1, unbiased=True, keepdim=True)


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, scale: GroupScale = "group", eps: float = 1e-4
) -> torch.Tensor:
    """GRPO outcome advantage: Â_i = (R_i − mean(R_group)) / (std + eps). rewards (B,) → (B,).

    Shao et al. 2024 (DeepSeekMath) §4.1.2 "outcome supervision": every token of response i gets Â_i.
    scale: "group" = divide by the group's std (GRPO); "none" = keep the mean-centred reward (Dr. GRPO, Liu et al.
    2025: the std divide up-weights prompts that are too easy or too hard); "batch" = divide by the std of
    all B rewards (TRL's scale_rewards="batch"). std is unbiased; eps = 1e-4 as TRL's GRPOTrainer (a group whose
    rewards are all equal gets Â = 0, not NaN). Group layout: see the section comment above.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected one reward per response (B,), got {tuple(rewards.shape)}")
    check_group_size(group_size, rewards.shape[0])
    if scale not in GROUP_SCALES:
        raise ValueError(f"scale: unknown reward scaling {scale!r}; expected one of {GROUP_SCALES}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=-1, keepdim=True)
    if scale == "group":
        centred = centred / (_group_std(grouped) + eps)
    elif scale == "batch":
        centred = centred / (_group_std(rewards.view(1, -1)) + eps)
    return centred.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024; Kool et al. 2019): Â_i = R_i − (1/(G−1))·Σ_{j≠i} R_j.

    The baseline of response i is the mean reward of its G−1 siblings, so it does not depend on R_i (the estimator
    stays unbiased). Equivalently Â_i = G/(G−1)·(R_i − mean(R_group)). rewards (B,) → (B,); group layout above.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected one reward per response (B,), got {tuple(rewards.shape)}")
    check_group_size(group_size, rewards.shape[0])
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(dim=-1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = Σ_{s≥t} γ^{s−t}·r_s over valid tokens: (B, T), (B, T) → (B, T), 0 where masked.

    GAE with V ≡ 0 and λ = 1 is exactly this sum (δ_t = r_t, A_t = r_t + γ·A_{t+1}), so it is computed by `gae`
    (one recursion in the code base, masked holes stepped over the same way).
    """
    advantages, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    return advantages


def reinforce_pp_advantages(
    score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float, gamma: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning LLMs").

    r_t = −β·KL_t + score·[t = last] (token-level KL penalty in the reward, `per_token_rewards`);
    G_t = Σ_{s≥t} γ^{s−t} r_s (`discounted_returns`); Â_t = (G_t − μ) / σ with μ, σ over every valid token of the
    global batch (`whiten`) — the batch normalisation that replaces PPO's critic. No group structure needed.
    score: (B,); kl, mask: (B, T) → (advantages, returns G, rewards r), each (B, T) and 0 where masked.
    """
    rewards = per_token_rewards(score, kl, mask, beta)
    returns = discounted_returns(rewards, mask, gamma)
    return whiten(returns, mask), returns, rewards


# --- one registry: the estimator is a name in the config --------------------------------------------------------


@dataclass(frozen=True)
class AdvantageInputs:
    """Everything an advantage estimator may read. B responses, T response tokens (right-padded).

    scores: (B,) sequence reward (learned RM and/or rule rewards, already composed). mask: (B, T) action mask.
    kl: (B, T) per-token KL estimate of the sampling policy to the reference (`kl_penalty`), used with kl_coef as
    KL in the reward; None = no KL in the reward (KL as a loss term instead, or none), which needs kl_coef = 0.
    values: (B, T) critic values — "gae" only. group_size: responses per prompt — "grpo", "rloo".
    """

    scores: torch.Tensor
    mask: torch.Tensor
    kl: torch.Tensor | None = None
    kl_coef: float = 0.0
    values: torch.Tensor | None = None
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True  # "gae" only: normalise A over the batch's valid tokens (PPO practice)
    group_size: int = 1
    scale: GroupScale = "group"  # "grpo" only
    eps: float = 1e-4  # "grpo" only: the std guard


@dataclass(frozen=True)
class AdvantageResult:
    """advantages: (B, T), 0 where masked. returns: (B, T) target of the value function ("gae") or the discounted
    return ("reinforce_pp"); None for the group estimators. rewards: (B, T) per-token reward that was optimised
    (score on the last token, −β·KL on every token): what `non_score_reward` logging reads."""

    advantages: torch.Tensor
    returns: torch.Tensor | None
    rewards: torch.Tensor


def _broadcast(per_response: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, T): the response's advantage on each of its valid tokens, 0 elsewhere."""
    return torch.where(mask.bool(), per_response[:, None].to(mask.device), torch.zeros((), dtype=per_response.dtype))


def _kl(x: AdvantageInputs) -> torch.Tensor:
    """The per-token KL of the reward: x.kl, or zeros when there is no KL in the reward (then kl_coef must be 0)."""
    if x.kl is not None:
        return x.kl
    if x.kl_coef != 0:
        raise ValueError("kl: kl_coef != 0 puts KL in the reward and needs the per-token KL estimate (B, T)")
    return torch.zeros(x.mask.shape, dtype=x.scores.dtype, device=x.scores.device)


def _gae(x: AdvantageInputs) -> AdvantageResult:
    if x.values is None:
        raise ValueError("values: the 'gae' estimator needs critic values (B, T); the critic-free ones do not")
    rewards = per_token_rewards(x.scores, _kl(x), x.mask, x.kl_coef)
    advantages, returns = gae(rewards, x.values, x.mask, x.gamma, x.lam)
    if x.whiten_advantages:
        advantages = whiten(advantages, x.mask)
    return AdvantageResult(advantages, returns, rewards)


def _grpo(x: AdvantageInputs) -> AdvantageResult:
    rewards = per_token_rewards(x.scores, _kl(x), x.mask, x.kl_coef)
    adv = grpo_advantages(rewards.sum(dim=-1), x.group_size, x.scale, x.eps)
    return AdvantageResult(_broadcast(adv, x.mask), None, rewards)


def _rloo(x: AdvantageInputs) -> AdvantageResult:
    rewards = per_token_rewards(x.scores, _kl(x), x.mask, x.kl_coef)
    adv = rloo_advantages(rewards.sum(dim=-1), x.group_size)
    return AdvantageResult(_broadcast(adv, x.mask), None, rewards)


def _reinforce_pp(x: AdvantageInputs) -> AdvantageResult:
    advantages, returns, rewards = reinforce_pp_advantages(x.scores, _kl(x), x.mask, x.kl_coef, x.gamma)
    return AdvantageResult(advantages, returns, rewards)


@dataclass(frozen=True)
class Estimator:
    """A registry entry: the function and what the job must provide for it."""

    fn: Callable[[AdvantageInputs], AdvantageResult]
    needs_critic: bool  # a value role must be placed (and only then)
    grouped: bool  # samples group_size >= 2 responses per prompt


ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(_gae, needs_critic=True, grouped=False),  # PPO (InstructGPT)
    "grpo": Estimator(_grpo, needs_critic=False, grouped=True),  # GRPO / Dr. GRPO / DAPO advantages
    "rloo": Estimator(_rloo, needs_critic=False, grouped=True),
    "reinforce_pp": Estimator(_reinforce_pp, needs_critic=False, grouped=False),
}


def get_estimator(name: str, group_size: int = 1) -> Estimator:
    """The registry entry for `name`, checked against group_size (ValueError naming `estimator` or `group_size`),
    so a job can reject a bad config before anything starts. Non-grouped estimators accept any group_size >= 1."""
    if name not in ADVANTAGE_ESTIMATORS:
        known = tuple(ADVANTAGE_ESTIMATORS)
        raise ValueError(f"estimator: unknown advantage estimator {name!r}; expected one of {known}")
    entry = ADVANTAGE_ESTIMATORS[name]
    if entry.grouped:
        check_group_size(group_size)
    elif isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: must be an integer >= 1, got {group_size!r}")
    return entry


def compute_advantages(name: str, inputs: AdvantageInputs) -> AdvantageResult:
    """Run the estimator registered as `name` ("gae" | "grpo" | "rloo" | "reinforce_pp") on `inputs`."""
    scores, mask, kl = inputs.scores, inputs.mask, _kl(inputs)
    if scores.dim() != 1 or mask.dim() != 2 or mask.shape[0] != scores.shape[0] or kl.shape != mask.shape:
        raise ValueError(
            f"shapes: scores {tuple(scores.shape)}, mask {tuple(mask.shape)}, kl {tuple(kl.shape)}; "
            "expected (B,), (B, T), (B, T)"
        )
    return get_estimator(name, inputs.group_size).fn(inputs)


# --- KL coefficient controllers (Ziegler et al. 2019 §2.2) ------------------------------------------------------


class FixedKLController:
    """β stays constant; same interface as the adaptive controller so callers do not branch."""

    kind = "fixed"

    def __init__(self, beta: float) -> None:
        if not beta >= 0:
            raise ValueError(f"beta: must be >= 0, got {beta}")
        self.beta = float(beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns β."""
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self.beta = float(state["beta"])


class AdaptiveKLController:
    """Adaptive β (Ziegler et al. 2019 §2.2): steer the measured KL towards `target`.

    e_t = clip(KL_t / target − 1, −0.2, 0.2);  β ← β·(1 + K_β·e_t) with K_β = n_steps / horizon, where n_steps
    is the number of samples (episodes) seen since the last update and horizon the paper's 10 000.
    """

    kind = "adaptive"

    def __init__(self, init_beta: float, target: float, horizon: float) -> None:
        for name, v in (("init_beta", init_beta), ("target", target), ("horizon", horizon)):
            if not v > 0:
                raise ValueError(f"{name}: must be > 0, got {v}")
        self.beta = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update β from the batch-mean KL (a Python float, reduced by the caller) and return the new β."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self.beta, self.target, self.horizon = float(state["beta"]), float(state["target"]), float(state["horizon"])


def _check_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"kind: state is for a {state.get('kind')!r} KL controller, not {kind!r}")
