"""RLHF advantage math: per-token KL estimators and rewards, GAE, whitening, and the KL-coefficient controllers.

Pure functions of tensors (shapes in each docstring; B = batch of responses, T = response length, right-padded).
`mask` is the action mask: 1 on generated response tokens, 0 on padding. Nothing here calls `.item()` or reads a
config object; the controllers are tiny host-side classes fed with already-reduced Python floats.

References
- InstructGPT: Ouyang et al. 2022, "Training language models to follow instructions with human feedback", eq. 2.
- Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2 (KL reward, adaptive β).
- GAE: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation", eq. 16.
- KL estimators k1/k2/k3: Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.
"""

from __future__ import annotations

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
