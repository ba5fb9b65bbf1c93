"""The step loop of the supervised Ray Train jobs (SFT, the reward model, DPO): which examples a step trains on,
when to validate, log and checkpoint. Pretraining has its own loop (token blocks, MFU); everything else in a job is
its model, its batches and its loss.

Data order: step s trains on items [s·B, (s+1)·B) of the endless per-epoch-shuffled stream of the n examples
(`models.seeding.stream_slice`, B = rows per rank × data-parallel size), rank r on its contiguous B/dp of them —
a pure function of (seed, step), so a resumed run continues at exactly the same data position.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from cluster.train.engine import Batch, LossFn, TrainEngine
from models.seeding import stream_slice


def rank_rows(n: int, step: int, rows: int, seed: int, dp_rank: int, dp_size: int) -> list[int]:
    """This data-parallel rank's example indices for optimizer step `step` (see the module docstring)."""
    step_items = stream_slice(n, step * rows * dp_size, rows * dp_size, seed)
    return [int(i) for i in step_items[dp_rank * rows:(dp_rank + 1) * rows]]


def run_steps(engine: TrainEngine, n: int, make_batch: Callable[[Sequence[int]], Batch], loss_fn: LossFn, *,
              max_steps: int, seed: int, validate: Callable[[], dict[str, float]], eval_every: int,
              checkpoint_every: int, log_every: int, tokens_of: Callable[[Batch], int],
              rate_name: str = "tokens_per_s") -> None:
    """Train from the engine's step (0, or the restored one) to `max_steps` on `make_batch(indices)` batches of the
    n examples: validation at step 0, every `eval_every` steps and at the end; a metrics row per step (loss and
    the loss's metrics, lr, grad_norm, epoch, `rate_name` = trained tokens/s of all ranks); reports every
    `log_every` steps and a checkpoint every `checkpoint_every` steps and at the end."""
    ctx, rows = engine.ctx, engine.optim.micro_batch_size * engine.optim.grad_accum
    if engine.state.step == 0:
        engine.log(validate())
    for step in range(engine.state.step, max_steps):
        batch = make_batch(rank_rows(n, step, rows, seed, ctx.dp_rank, ctx.dp_size))
        tokens = tokens_of(batch)
        t0 = time.perf_counter()
        metrics = engine.train_step(batch, loss_fn, tokens=tokens)
        row: dict[str, Any] = {**metrics, "epoch": (step + 1) * rows * ctx.dp_size / n,
                               rate_name: tokens * ctx.dp_size / (time.perf_counter() - t0)}
        s = engine.state.step
        if s % eval_every == 0 or s == max_steps:
            row.update(validate())
        engine.log(row)
        due = s % checkpoint_every == 0 or s == max_steps
        if due or s % log_every == 0:
            engine.flush(checkpoint=due)
