"""Test-wide environment: every socket on loopback, every file inside the project, nothing from a hub."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Ray binds loopback only (docs/ARCHITECTURE.md, "Networking")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".tmp" / "torch_extensions"))


def _trl_without_vllm() -> None:
    """TRL 1.12 (a test peer for the PPO/GRPO/RLOO/DPO math, never a runtime dependency) imports vLLM's GPU weight
    transfer classes whenever any vLLM is installed; the CPU vLLM of the `vllm` extra (0.32) does not have them, so
    importing TRL's trainers would fail. The parity tests use no vLLM path of TRL: tell TRL there is none."""
    import importlib

    try:
        import_utils = importlib.import_module("trl.import_utils")
    except ImportError:
        return
    import_utils.is_vllm_available = lambda *args, **kwargs: False


_trl_without_vllm()
