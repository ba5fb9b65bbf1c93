"""Learning-rate schedules as pure functions of the step.

GPT §4.1: "the learning rate was increased linearly from zero over the first 2000 updates and annealed to 0
using a cosine schedule"; GPT-3 §B decays with a cosine "down to 10% of its value" and warms up linearly.
`warmup_cosine` is that schedule with the floor (`min_ratio`) as a parameter.
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, base_lr: float, warmup_steps: int, max_steps: int, min_ratio: float = 0.1) -> float:
    """Learning rate of optimizer step `step` (0-based: the first update uses step 0).

    - warmup: step < warmup_steps → base_lr · (step + 1) / warmup_steps (linear, never exactly 0, so the first
      update is not wasted; reaches base_lr on the last warmup step);
    - decay: cosine from base_lr at step = warmup_steps down to min_ratio · base_lr at step = max_steps;
    - after max_steps: stays at min_ratio · base_lr.

    Naive equivalent: for warmup_steps ≤ s ≤ max_steps,
    lr = min_lr + ½ (base_lr − min_lr)(1 + cos(π (s − warmup_steps) / (max_steps − warmup_steps))).
    """
    if step < 0:
        raise ValueError(f"step: must be ≥ 0, got {step}")
    if warmup_steps < 0 or max_steps < 1:
        raise ValueError(f"warmup_steps/max_steps: need warmup_steps ≥ 0 and max_steps ≥ 1, got "
                         f"{warmup_steps}/{max_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio: must be in [0, 1], got {min_ratio}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    min_lr = min_ratio * base_lr
    span = max_steps - warmup_steps
    if span <= 0:  # no decay phase
        return base_lr
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / span
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
