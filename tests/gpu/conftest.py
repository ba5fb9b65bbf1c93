"""tests/gpu: every test needs CUDA and is skipped cleanly without it (`make test` on CPU machines)."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run tests/gpu/run_all.sh on a GPU machine")
    for item in items:
        if "/tests/gpu/" in str(item.path):
            item.add_marker(skip)
