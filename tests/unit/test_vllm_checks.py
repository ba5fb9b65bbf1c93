"""The checks a job runs before it starts a vLLM engine (actors/engines/vllm.py): a missing extra names the install
command; a checkpoint vLLM cannot load or would compute differently (GPT-3 banded layers, GPT-1, a reward model, a
head size vLLM's CPU attention lacks) is refused with the reason, before any engine starts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from models.checkpoint import CheckpointError, save_checkpoint
from models.config import ConfigError, GPTConfig
from models.gpt import GPT
from models.heads import RewardModel

pytest.importorskip("vllm")
from actors.engines.vllm import check_vllm_model, cpu_head_sizes, require_vllm  # noqa: E402


def _save(tmp_path: Path, name: str, model: torch.nn.Module) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(model, tmp_path / name)


def nano(**kw) -> GPTConfig:
    return GPTConfig.from_name("nano", n_head=1, **kw)  # head size 32: one vLLM's CPU attention supports


def test_missing_extra_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError, as without the extra
    with pytest.raises(ConfigError) as e:
        require_vllm()
    assert str(e.value).startswith("engine: ") and "pip install 'raygpt[vllm]'" in str(e.value)
    assert "make install" in str(e.value)


def test_a_gpt2_checkpoint_passes(tmp_path: Path) -> None:
    path = _save(tmp_path, "ok", GPT(nano()))
    assert check_vllm_model(path) == nano()


@pytest.mark.parametrize("case, model, words", [
    ("banded", lambda: GPT(nano(attention="alternating")), ["attention='alternating'", "engine: native"]),
    ("gpt1", lambda: GPT(nano(ln_placement="post", final_ln=False)), ["openai-gpt", "engine: native"]),
    ("reward", lambda: RewardModel(nano()), ["reward model", "language models only"]),
])
def test_models_vllm_cannot_run_are_refused_with_the_reason(tmp_path: Path, case: str, model, words) -> None:
    path = _save(tmp_path, case, model())
    with pytest.raises(CheckpointError) as e:
        check_vllm_model(path)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_head_size_outside_vllm_cpu_kernels_is_refused(tmp_path: Path) -> None:
    sizes = cpu_head_sizes()
    if sizes is None:
        pytest.skip("vLLM runs on an accelerator here")
    assert 16 not in sizes
    path = _save(tmp_path, "h16", GPT(GPTConfig.from_name("nano")))  # 32 / 2 heads = 16
    with pytest.raises(CheckpointError, match="head size n_embd/n_head = 16"):
        check_vllm_model(path)


def test_missing_checkpoint_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        check_vllm_model(tmp_path / "nope")


# --- raygpt serve --set engine=vllm: refused before anything is deployed ---------------------------------------
@pytest.fixture(scope="module")
def tok():
    from pydoc_data.topics import topics

    from models.tokenizer import Tokenizer

    return Tokenizer.train(list(topics.values())[:50], vocab_size=512)


def _servable(tmp_path: Path, name: str, cfg: GPTConfig, tok) -> Path:
    return save_checkpoint(GPT(cfg), tmp_path / name, tokenizer=tok)


def _serve_cfg(path: Path, **kw):
    from jobs.config import from_dict
    from jobs.serving.app import ServeConfig

    return from_dict(ServeConfig, {"models": [f"m={path}"], **kw})


def test_serve_engine_is_checked(tmp_path: Path, tok) -> None:
    path = _servable(tmp_path, "ok", nano(), tok)
    with pytest.raises(ConfigError, match="engine: must be one of native, vllm, got 'vlm'"):
        _serve_cfg(path, engine="vlm")


def test_serve_with_vllm_refuses_a_banded_model_and_a_missing_extra(tmp_path: Path, tok,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.serving.app import build_app

    path = _servable(tmp_path, "banded", nano(attention="alternating"), tok)
    with pytest.raises(ConfigError, match=r"models: m: .*attention='alternating'.*engine: native"):
        build_app(_serve_cfg(path, engine="vllm"))
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ConfigError, match=r"pip install 'raygpt\[vllm\]'"):
        build_app(_serve_cfg(_servable(tmp_path, "ok", nano(), tok), engine="vllm"))
