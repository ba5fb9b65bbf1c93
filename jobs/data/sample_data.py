"""Small example files in every user data format (docs/DATA.md "Bring your own data"; configs/byod-*.yaml).

    python -m jobs.data.sample_data data/byod

writes chats.jsonl (messages), completions.jsonl (prompt-completion), prefs.jsonl + prefs_heldout.jsonl
(pairwise, message lists), kwise.parquet (K-wise), prompts.jsonl + prompts_heldout.jsonl (prompt-only, messages).
The task is a toy one — "Is the <thing> <adjective>?", answered "yes, the cat is good." or "no." — so a `nano`
model learns it in seconds: the demonstrations answer either way, the preferences prefer the yes-answer, so
the RM has something to learn and PPO a reward to climb. tests/e2e/test_user_data_e2e.py trains on these files.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

THINGS = ["cat", "dog", "sun", "sea", "king", "rose", "moon", "tree", "ship", "bird"]
ADJS = ["good", "warm", "kind", "bright", "fair", "old"]
SYSTEM = {"role": "system", "content": "Answer briefly."}
NO = {"role": "assistant", "content": "no."}


def user(thing: str, adj: str) -> dict[str, str]:
    return {"role": "user", "content": f"Is the {thing} {adj}?"}


def yes(thing: str, adj: str) -> dict[str, str]:
    return {"role": "assistant", "content": f"yes, the {thing} is {adj}."}


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_samples(out: str | Path, seed: int = 0) -> dict[str, str]:
    """Write the example files into `out`; returns {name: path}. 48 train and 12 held-out questions."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pairs = [(t, a) for t in THINGS for a in ADJS]
    rng.shuffle(pairs)
    train, held = pairs[:48], pairs[48:]
    convs = []
    for i, (t, a) in enumerate(train * 2):
        answer = yes(t, a) if i % 2 == 0 else NO
        msgs = [SYSTEM, user(t, a), answer] if i % 3 else [user(t, a), answer]
        if i % 4 == 1:  # a second turn: SFT's loss covers both assistant turns
            t2, a2 = train[(i + 7) % len(train)]
            msgs += [user(t2, a2), yes(t2, a2) if i % 8 == 1 else NO]
        convs.append({"messages": msgs})

    def prefs(ps: list[tuple[str, str]]) -> list[dict[str, Any]]:
        return [{"prompt": [user(t, a)], "chosen": [yes(t, a)], "rejected": [NO]} for t, a in ps]

    kwise = [{"prompt": f"Q: Is the {t} {a}?\nA:", "responses": [" no.", f" yes, the {t} is {a}.", " maybe."],
              "ranking": [1, 2, 0]} for t, a in train]
    pq.write_table(pa.Table.from_pylist(kwise), root / "kwise.parquet")
    return {
        "chats": _jsonl(root / "chats.jsonl", convs),
        "completions": _jsonl(root / "completions.jsonl", [
            {"prompt": f"Q: Is the {t} {a}?\nA:", "completion": f" yes, the {t} is {a}." if i % 2 == 0 else " no."}
            for i, (t, a) in enumerate(train)]),
        "prefs": _jsonl(root / "prefs.jsonl", prefs(train)),
        "prefs_heldout": _jsonl(root / "prefs_heldout.jsonl", prefs(held)),
        "kwise": str(root / "kwise.parquet"),
        "prompts": _jsonl(root / "prompts.jsonl", [{"messages": [user(t, a)]} for t, a in train]),
        "prompts_heldout": _jsonl(root / "prompts_heldout.jsonl", [{"messages": [user(t, a)]} for t, a in held]),
    }


if __name__ == "__main__":
    for name, path in write_samples(sys.argv[1] if len(sys.argv) > 1 else "data/byod").items():
        print(f"{name:16s} {path}")
