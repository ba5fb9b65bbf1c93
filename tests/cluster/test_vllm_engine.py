"""The vLLM rollout engine (actors/engines/vllm.py) inside a Ray actor, one engine for the module (start ~5–25 s).

Independent references: our GPT (`models.gpt`) run by PyTorch on the same weights — its full forward pass with
`models.generation.tempered_logprobs` on vLLM's sampled tokens (the PPO recompute), its greedy decode through
`models.generation.generate`, and `actors.base.weights_checksum` of the state the policy sends. The model is a random
`nano` GPT with one head (head size 32: vLLM's CPU attention has no 16), so its distributions are broad and the
tokens vary; EOS is chosen per call from tokens the engine produced, which gives responses of known varied length.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from actors.base import weights_checksum
from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import GPTConfig
from models.generation import Generation, SamplingParams, generate, tempered_logprobs
from models.gpt import GPT

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [1]]
# fp32 on both sides: the only differences are summation orders of vLLM's GEMM/attention kernels vs PyTorch's,
# ~1e-7 relative on logits of magnitude < 10 (measured max |Δ log p| ≈ 1e-6). A stale or mis-loaded layer moves
# log-probs by > 0.1 (measured 1.5 for a stale LM head), so 1e-4 separates the two by orders of magnitude.
MAX_GAP = 1e-4


class Holder:
    """The engine in its own process, as a rollout worker holds it; `call` runs a function on it there."""

    def __init__(self, path: str) -> None:
        from actors.engines.vllm import VLLMEngine

        self.engine = VLLMEngine(path, kv_cache_gib=0.25)

    def call(self, fn: Any, *args: Any) -> Any:
        return fn(self.engine, *args)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(GPT(GPTConfig.from_name("nano", n_head=1)), tmp_path_factory.mktemp("vllm") / "nano")


@pytest.fixture(scope="module")
def engine(ckpt: Path):
    import ray

    from cluster.runtime import init_ray, shutdown_ray

    init_ray(num_cpus=2, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Holder and the test's functions, by value
    try:
        yield ray.remote(num_cpus=1)(Holder).remote(str(ckpt))
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        shutdown_ray()


def run(engine: Any, fn: Any, *args: Any) -> Any:
    import ray

    return ray.get(engine.call.remote(fn, *args), timeout=300)


def gen(engine: Any, prompts: list[list[int]], params: SamplingParams, eos_id: int | None, seeds: list[int],
        n: int = 1) -> Generation:
    return run(engine, lambda e, *a: e.generate(*a[:2], eos_id=a[2], seeds=a[3], n=a[4]),
               prompts, params, eos_id, seeds, n)


def logprob_gap(model: GPT, g: Generation, temperature: float) -> torch.Tensor:
    """|vLLM log p − ours| per response token: our full forward pass over each row's prompt + response."""
    out = []
    for i in range(g.sequences.size(0)):
        m = g.response_mask[i].bool()
        resp = g.response_ids[i][m]
        prompt = g.sequences[i, : g.prompt_len][g.attention_mask[i, : g.prompt_len].bool()]
        with torch.no_grad():
            logits = model(torch.cat([prompt, resp])[None])[0, len(prompt) - 1: -1]
        out.append((tempered_logprobs(logits, resp, temperature) - g.logprobs[i][m]).abs())
    return torch.cat(out)


def test_rows_are_seeded_padded_and_stop_at_eos(engine: Any) -> None:
    params = SamplingParams(max_new_tokens=16, temperature=1.0)
    seeds = [11, 12, 21, 22, 31, 32]
    free = gen(engine, PROMPTS, params, None, seeds, n=2)  # no EOS: every row runs 16 tokens
    assert free.response_ids.shape == (6, 16) and bool(free.response_mask.all())
    assert free.prompt_len == 7 and free.sequences.shape == (6, 23)
    for r, p in enumerate(PROMPTS[i // 2] for i in range(6)):  # left padding, row i·n + j = prompt i
        assert free.sequences[r, 7 - len(p): 7].tolist() == p and free.attention_mask[r, :7].sum() == len(p)
    assert not torch.equal(free.response_ids[0], free.response_ids[1]), "two samples of a prompt are the same"

    # A row's sample is a function of its seed: alone, or with other batch-mates, it is the same.
    alone = gen(engine, [PROMPTS[1]], params, None, [21])
    assert torch.equal(alone.response_ids[0], free.response_ids[2])

    # EOS = a token row 0 produced at step 5 (and not before): row 0 now ends there, EOS included and masked in;
    # every row is cut at its own first EOS and padded with it.
    eos = int(free.response_ids[0, 5])
    assert eos not in free.response_ids[0, :5].tolist()
    cut = gen(engine, PROMPTS, params, eos, seeds, n=2)
    for r in range(6):
        row = free.response_ids[r].tolist()
        want = row[: row.index(eos) + 1] if eos in row else row
        got = cut.response_ids[r][cut.response_mask[r].bool()].tolist()
        assert got == want, r
        assert cut.response_ids[r, len(want):].eq(eos).all() and cut.logprobs[r, len(want):].eq(0).all()
    assert cut.response_mask[0].sum() == 6


def test_logprobs_match_the_trainers_recompute(engine: Any, ckpt: Path) -> None:
    model = load_checkpoint(ckpt).eval()
    gaps = {}
    for t in (1.0, 0.7, 0.0):
        g = gen(engine, PROMPTS, SamplingParams(max_new_tokens=24, temperature=t), 0, list(range(6)), n=2)
        d = logprob_gap(model, g, t)
        gaps[t] = (d.mean().item(), d.max().item())
        assert d.max() < MAX_GAP, gaps
    print(f"vLLM vs trainer |Δ log p| (mean, max) by temperature: {gaps}")
    # greedy: the same tokens as our sampler
    g = gen(engine, PROMPTS, SamplingParams(max_new_tokens=24, temperature=0), 0, [0, 1, 2])
    ref = generate(model, PROMPTS, SamplingParams(max_new_tokens=24, temperature=0), eos_id=0, seeds=[0, 1, 2])
    assert torch.equal(g.response_ids, ref.response_ids) and torch.equal(g.response_mask, ref.response_mask)


def test_pushed_weights_are_held_checksummed_and_sampled_from(engine: Any, ckpt: Path) -> None:
    base = load_checkpoint(ckpt).eval()
    new = copy.deepcopy(base)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in new.parameters():  # every tensor changes, the tied wte/lm_head included
            p.add_(torch.randn_like(p) * 0.05)
    state = {k: v.numpy() for k, v in new.state_dict().items()}
    checksum = run(engine, lambda e, s: e.load_weights(s, 7), state)
    assert checksum == weights_checksum(new.state_dict())  # read back from vLLM's model, equal to what was sent
    assert run(engine, lambda e: (e.version, e.held_checksum())) == (7, checksum)

    params = SamplingParams(max_new_tokens=24, temperature=1.0)
    g = gen(engine, PROMPTS, params, 0, [5, 6, 7])
    assert logprob_gap(new, g, 1.0).max() < MAX_GAP  # sampled from the pushed weights, not the checkpoint's
    assert logprob_gap(base, g, 1.0).max() > 0.1

    # The checksum is over what vLLM holds: corrupt one held tensor and the engine no longer matches the policy.
    def corrupt(e: Any) -> str:
        def bump(worker: Any) -> None:
            dict(worker.model_runner.model.named_parameters())["transformer.h.1.mlp.c_fc.bias"].data[0] += 1e-3
        e.llm.collective_rpc(bump)
        return e.held_checksum()

    assert run(engine, corrupt) != checksum

    # Bad pushes name the parameter; the engine then reports no version (a caller refuses it until a good push).
    bad = dict(state)
    del bad["transformer.ln_f.bias"]
    with pytest.raises(Exception, match=r"missing transformer\.ln_f\.bias"):
        run(engine, lambda e, s: e.load_weights(s, 8), bad)
    bad = {**state, "transformer.wpe.weight": state["transformer.wpe.weight"][:-1]}
    with pytest.raises(Exception, match=r"state\['transformer\.wpe\.weight'\]: shape"):
        run(engine, lambda e, s: e.load_weights(s, 8), bad)
    assert run(engine, lambda e, s: e.load_weights(s, 9), state) == checksum
