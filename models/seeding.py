"""The one seed-derivation scheme of the project: every random draw is keyed by a tuple of integers/strings.

`derive_seed(run_seed, "heldout", prompt_index, sample)` → a 63-bit seed, a pure function of its parts (NumPy's
SeedSequence entropy mixing; strings are hashed with SHA-256, never Python's salted `hash`). Nothing random has to
be checkpointed: the iteration, row or step number *is* the RNG state, so a resumed or re-sharded run draws the
same numbers. `permutation` and `stream_position` give the endless, epoch-by-epoch shuffled order of a dataset
(SFT/RM examples, pretraining blocks) as a pure function of (key, position).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

Part = int | str


def _words(parts: tuple[Part, ...]) -> list[int]:
    out: list[int] = []
    for p in parts:
        if isinstance(p, str):
            out.append(int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "big"))
        elif isinstance(p, (int, np.integer)) and not isinstance(p, bool):
            out.append(int(p) % 2**64)  # negative ints wrap: SeedSequence takes non-negative words
        else:
            raise TypeError(f"seed parts must be int or str, got {type(p).__name__} {p!r}")
    return out


def derive_seed(*parts: Part) -> int:
    """A 63-bit seed that is a pure function of `parts` (e.g. run seed, "heldout", row, sample)."""
    state = np.random.SeedSequence(_words(parts)).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def rng(*parts: Part) -> np.random.Generator:
    """A NumPy generator (PCG64) keyed by `parts`."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(_words(parts))))


def permutation(n: int, *parts: Part) -> np.ndarray:
    """The permutation of range(n) keyed by `parts` (typically (seed, epoch, …)); read-only, cached."""
    return _permutation(n, tuple(_words(parts)))


@lru_cache(maxsize=8)  # a stream reads one epoch at a time; a few entries cover epoch boundaries and ranks
def _permutation(n: int, words: tuple[int, ...]) -> np.ndarray:
    perm = np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(words)))).permutation(n)
    perm.flags.writeable = False
    return perm


def stream_slice(n: int, start: int, count: int, *parts: Part) -> np.ndarray:
    """Items [start, start + count) of the endless stream epoch 0, epoch 1, … of range(n), where epoch e is
    `permutation(n, *parts, e)`. The data order of SFT/RM examples and of pretraining blocks."""
    if n < 1 or start < 0 or count < 0:
        raise ValueError(f"stream_slice: need n >= 1, start >= 0, count >= 0; got {n}, {start}, {count}")
    out, pos = [], start
    while pos < start + count:
        epoch, offset = divmod(pos, n)
        take = min(start + count - pos, n - offset)
        out.append(permutation(n, *parts, epoch)[offset:offset + take])
        pos += take
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
