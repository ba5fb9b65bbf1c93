"""models/schedules.warmup_cosine against hand-worked values."""

from __future__ import annotations

import math

import pytest

from models.schedules import warmup_cosine


def test_warmup_is_linear_and_reaches_the_peak():
    assert [warmup_cosine(s, 1.0, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_midpoint_end_and_after():
    lr = lambda s: warmup_cosine(s, 2.0, 10, 110, min_ratio=0.1)  # noqa: E731
    assert lr(10) == pytest.approx(2.0)
    assert lr(60) == pytest.approx((2.0 + 0.2) / 2)  # half-way: cos(π/2) = 0
    assert lr(35) == pytest.approx(0.2 + 0.5 * 1.8 * (1 + math.cos(math.pi / 4)))
    assert lr(110) == pytest.approx(0.2) and lr(500) == pytest.approx(0.2)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 200))  # monotone after warmup


def test_no_decay_phase_and_bad_input():
    assert warmup_cosine(7, 1.0, 10, 10) == pytest.approx(0.8)
    assert warmup_cosine(12, 1.0, 10, 10) == 1.0
    with pytest.raises(ValueError, match="step"):
        warmup_cosine(-1, 1.0, 1, 10)
    with pytest.raises(ValueError, match="min_ratio"):
        warmup_cosine(0, 1.0, 1, 10, min_ratio=2.0)
