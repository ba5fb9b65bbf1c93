"""`make bench`: run every benchmark module's `main()` in turn (each writes its section of docs/BENCHMARKS.md)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

SKIP = {"__init__", "common", "run_all", "generate_vllm"}  # generate_vllm: a column of generate.py


def main(argv: list[str] | None = None) -> int:
    names = argv if argv else sorted(p.stem for p in Path(__file__).parent.glob("*.py") if p.stem not in SKIP)
    failed = []
    for name in names:
        print(f"=== benchmarks.{name}", flush=True)
        try:
            importlib.import_module(f"benchmarks.{name}").main()
        except Exception as e:  # keep going: one broken benchmark must not hide the others' numbers
            print(f"benchmarks.{name} failed: {e!r}", flush=True)
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
