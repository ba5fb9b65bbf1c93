"""The native rollout engine: continuous batching (models/batching.py), the counter-based sampler (models/rng.py)
and the NativeEngine wrapper, each against something independent — a naive per-row loop that recomputes the whole
sequence every step (no KV cache, no padding, no batch), the trainer's full forward pass, pure-Python integer
arithmetic, and sampling frequencies against the filtered softmax."""

from __future__ import annotations

import pytest
import torch

from actors.base import weights_checksum
from actors.engines.native import NativeEngine
from models import batching
from models.batching import decode
from models.config import GPTConfig
from models.generation import (
    SamplingParams,
    filter_logits,
    generate,
    left_pad,
    sample_next,
    stream,
    tempered_logprobs,
)
from models.gpt import GPT
from models.rng import mix32, sample_categorical, uniform

EOS = 100
CFG = GPTConfig.from_name("nano", vocab_size=101, n_ctx=48, eos_token_id=EOS, bos_token_id=EOS)


def eos_model(cfg: GPTConfig = CFG, seed: int = 0) -> GPT:
    """A random model whose EOS logit gets a context-dependent boost, so rows really end at varied steps: the
    final LayerNorm's bias and the EOS row of the (tied) unembedding share a direction."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(0.3)
        model.lm_head.weight[EOS] = 0.25
    return model


def prompts(count: int = 7, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (count,), generator=g).tolist()
    return [torch.randint(0, EOS, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def naive(model: GPT, prompt: list[int], params: SamplingParams, seed: int) -> tuple[list[int], Tensor]:
    """One row alone: recompute the whole sequence every step (no cache, no padding), sample with (seed, step)."""
    seq, tokens, lps = list(prompt), [], []
    for t in range(params.max_new_tokens):
        logits = model(torch.tensor([seq]))[:, -1]
        tok, lp = sample_next(logits, params, torch.tensor([seed]), t)
        tokens.append(int(tok[0]))
        lps.append(float(lp[0]))
        seq.append(tokens[-1])
        if tokens[-1] == EOS:
            break
    return tokens, torch.tensor(lps)


Tensor = torch.Tensor

SETTINGS = [
    (SamplingParams(max_new_tokens=16, temperature=0.9), "dense"),
    (SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95), "alternating"),
    (SamplingParams(max_new_tokens=12, temperature=0.0), "dense"),
]


@pytest.mark.parametrize("params,attention", SETTINGS)
@pytest.mark.parametrize("n,max_rows", [(1, 3), (3, 4), (2, None)])
def test_continuous_batching_equals_each_row_alone(params: SamplingParams, attention: str, n: int,
                                                   max_rows: int | None) -> None:
    cfg = CFG.replace(attention=attention, local_window=5)
    model, ps = eos_model(cfg), prompts()
    seeds = torch.arange(len(ps) * n) * 7919 + 3
    out = decode(model, ps, params, seeds=seeds, eos_id=EOS, n=n, max_rows=max_rows, pad_id=EOS)
    lengths = out.lengths.tolist()
    for r in range(len(ps) * n):
        tokens, lps = naive(model, ps[r // n], params, int(seeds[r]))
        assert out.tokens[r, :lengths[r]].tolist() == tokens, f"row {r}"
        assert (out.tokens[r, lengths[r]:] == EOS).all()  # padding after the end
        torch.testing.assert_close(out.logprobs[r, :lengths[r]], lps, atol=1e-5, rtol=0)
    # the scenario is what it claims: rows end at EOS at varied steps
    ended_at_eos = [row[lengths[r] - 1] == EOS for r, row in enumerate(out.tokens.tolist())]
    if params.temperature > 0:
        assert sum(ended_at_eos) >= 3 and len(set(lengths)) >= 3, lengths
    if max_rows is not None:  # more rows than slots: finished rows' slots were reused by later prompts
        assert out.stats["prefills"] > 1 and out.stats["slots"] < len(ps) * n


@pytest.mark.parametrize("packed", [True, False])
def test_slot_reuse_survives_column_compaction(packed: bool) -> None:
    """Long run through few slots: the shared write column wraps around the cache (compaction) several times.
    Both matmul paths: oneDNN-packed weights (the CPU default) and the model's own linears."""
    model, ps = eos_model(), prompts(count=12, seed=5)
    params = SamplingParams(max_new_tokens=16, temperature=1.0)
    seeds = torch.arange(len(ps) * 2) + 11
    out = decode(model, ps, params, seeds=seeds, eos_id=EOS, n=2, max_rows=2, pad_id=EOS, packed=packed)
    assert out.stats["column_shifts"] >= 2, out.stats
    for r in range(len(ps) * 2):
        tokens, lps = naive(model, ps[r // 2], params, int(seeds[r]))
        assert out.tokens[r, :int(out.lengths[r])].tolist() == tokens, f"row {r}"
        torch.testing.assert_close(out.logprobs[r, :int(out.lengths[r])], lps, atol=1e-5, rtol=0)


def test_dead_slots_are_dropped_without_changing_samples() -> None:
    model, ps = eos_model(), prompts(count=6, seed=2)
    params = SamplingParams(max_new_tokens=16, temperature=1.0)
    seeds = torch.arange(12) + 40
    out = decode(model, ps, params, seeds=seeds, eos_id=EOS, n=2, pad_id=EOS)
    assert out.stats["slot_drops"] >= 1 and out.stats["slot_steps"] < out.stats["decode_steps"] * 12
    for r in range(12):
        assert out.tokens[r, :int(out.lengths[r])].tolist() == naive(model, ps[r // 2], params, int(seeds[r]))[0]


def test_default_batch_is_capped_by_the_cache_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    model, ps = eos_model(), prompts()
    params = SamplingParams(max_new_tokens=16, temperature=1.0)
    seeds = torch.arange(len(ps) * 2)
    everything = decode(model, ps, params, seeds=seeds, eos_id=EOS, n=2, pad_id=EOS)
    span = max(len(p) for p in ps) + 16
    per_slot = 2 * CFG.n_layer * (span + max(8, span // 2)) * CFG.n_embd * 4
    monkeypatch.setattr(batching, "CACHE_BUDGET_BYTES", 5 * per_slot)
    capped = decode(model, ps, params, seeds=seeds, eos_id=EOS, n=2, pad_id=EOS)
    assert everything.stats["slots"] == 14 and capped.stats["slots"] == 5
    assert capped.tokens.tolist() == everything.tokens.tolist()


def test_group_prefix_sharing_equals_no_sharing() -> None:
    model, ps = eos_model(), prompts()
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95)
    seeds = torch.arange(len(ps) * 4) + 100
    shared = decode(model, ps, params, seeds=seeds, eos_id=EOS, n=4, max_rows=8, pad_id=EOS)
    repeated = [p for p in ps for _ in range(4)]
    alone = decode(model, repeated, params, seeds=seeds, eos_id=EOS, n=1, max_rows=8, pad_id=EOS)
    assert shared.tokens.tolist() == alone.tokens.tolist()
    torch.testing.assert_close(shared.logprobs, alone.logprobs, atol=1e-5, rtol=0)
    assert shared.stats["prefill_rows"] == len(ps) and alone.stats["prefill_rows"] == 4 * len(ps)


@pytest.mark.parametrize("params", [s[0] for s in SETTINGS])
def test_logprobs_equal_the_trainers_forward_pass(params: SamplingParams) -> None:
    model = eos_model()
    gen = generate(model, prompts(), params, eos_id=EOS, seeds=9, n=2, max_rows=5)
    with torch.no_grad():  # the trainer's computation: one forward over prompt + response, tempered log-probs
        logits = model(gen.sequences, gen.attention_mask)[:, gen.prompt_len - 1:-1]
    ref = tempered_logprobs(logits, gen.response_ids, params.temperature) * gen.response_mask
    assert gen.response_mask.sum() > 0
    torch.testing.assert_close(gen.logprobs, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("packed", [True, False])
def test_static_stream_samples_what_continuous_batching_samples(packed: bool) -> None:
    """The server's step-by-step `stream` (one static left-padded batch) and `generate` draw the same tokens."""
    model, ps = eos_model(), prompts(count=5)
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9)
    ids, mask = left_pad(ps, EOS)
    steps = list(stream(model, ids, mask, params, eos_id=EOS, seeds=[3, 1, 4, 1, 5], packed=packed))
    tokens = torch.stack([s[0] for s in steps], 1)
    logprobs = torch.stack([s[1] for s in steps], 1)
    gen = generate(model, ps, params, eos_id=EOS, seeds=[3, 1, 4, 1, 5], max_rows=2)
    assert tokens.tolist() == gen.response_ids.tolist()
    torch.testing.assert_close(logprobs, gen.logprobs, atol=1e-5, rtol=0)


def test_generation_layout_left_padded_prompts_right_padded_responses() -> None:
    model, ps = eos_model(), prompts(count=3)
    gen = generate(model, ps, SamplingParams(max_new_tokens=10), eos_id=EOS, seeds=0, n=2)
    P = max(len(p) for p in ps)
    assert gen.prompt_len == P and gen.sequences.shape[0] == 6
    for r in range(6):
        p = ps[r // 2]
        assert gen.sequences[r, P - len(p):P].tolist() == p and gen.attention_mask[r, :P].sum() == len(p)
        n_resp = int(gen.response_mask[r].sum())
        assert gen.response_mask[r].tolist() == [1] * n_resp + [0] * (gen.response_ids.size(1) - n_resp)
        assert (gen.logprobs[r, n_resp:] == 0).all()


def test_bad_input_names_the_field() -> None:
    model = eos_model()
    p = SamplingParams(max_new_tokens=8)
    with pytest.raises(ValueError, match="seeds"):
        decode(model, [[1, 2]], p, seeds=torch.arange(3), n=2)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        decode(model, [[1], list(range(45))], p, seeds=torch.arange(2))
    with pytest.raises(ValueError, match=r"prompts\[0\]: empty"):
        decode(model, [[]], p, seeds=torch.arange(1))
    with pytest.raises(ValueError, match="max_rows"):
        decode(model, [[1]], p, seeds=torch.arange(1), max_rows=0)


# ---- the counter-based generator -------------------------------------------------------------------------------

def _lowbias32(x: int) -> int:  # Wellons' reference, in Python's unbounded integers
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_mix32_equals_reference_integer_arithmetic() -> None:
    xs = [0, 1, 2**31 - 1, 2**31, 2**32 - 1] + torch.randint(0, 2**32, (200,), generator=torch.Generator()
                                                              .manual_seed(0)).tolist()
    assert mix32(torch.tensor(xs)).tolist() == [_lowbias32(x) for x in xs]


def test_uniform_is_a_pure_function_of_seed_and_step() -> None:
    seeds = torch.tensor([0, 1, -5, 2**62 + 3, 2**40, 7])
    steps = torch.tensor([0, 3, 3, 1, 0, 9])
    u = uniform(seeds, steps)
    assert ((u >= 0) & (u < 1)).all() and len(set(u.tolist())) == 6
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    assert torch.equal(uniform(seeds[perm], steps[perm]), u[perm])  # batch order and batch-mates do not matter
    assert torch.equal(uniform(seeds[:1], 4), uniform(torch.tensor([0, 9]), torch.tensor([4, 4]))[:1])
    many = uniform(torch.arange(20000), 0)
    assert abs(float(many.mean()) - 0.5) < 0.01 and abs(float(many.var()) - 1 / 12) < 0.005


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.7), (4, 0.8)])
def test_sample_frequencies_follow_the_filtered_softmax(top_k: int, top_p: float) -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    rows = 40000
    tokens = sample_categorical(logits.expand(rows, -1), uniform(torch.arange(rows) * 3 + 1, 5), top_k, top_p)
    freq = torch.bincount(tokens, minlength=6).float() / rows
    expected = filter_logits(logits[None], top_k, top_p).softmax(-1)[0]
    assert (freq[expected == 0] == 0).all()
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


# ---- the engine -----------------------------------------------------------------------------------------------

def test_native_engine_rows_and_seeds_follow_the_contract() -> None:
    engine = NativeEngine(eos_model(), max_rows=4)
    ps = prompts(count=3)
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    seeds = [5, 80, 13, 2, 99, 41]
    gen = engine.generate(ps, params, eos_id=EOS, seeds=seeds, n=2)
    assert gen.response_ids.shape[0] == 6 and engine.exact_logprobs
    for r in range(6):  # row i·n + j = sample j of prompt i, seeded by seeds[i·n + j]
        tokens, _ = naive(engine.model, ps[r // 2], params, seeds[r])
        assert gen.response_ids[r, :len(tokens)].tolist() == tokens
    with pytest.raises(ValueError, match="seeds"):
        engine.generate(ps, params, eos_id=EOS, seeds=seeds[:5], n=2)


def test_packed_twin_follows_weight_updates() -> None:
    """The oneDNN-packed copy is rebuilt when the weights change in place (load_state_dict, optimizer steps)."""
    model, other = eos_model(seed=0), eos_model(seed=1)
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    before = generate(model, [[1, 2, 3]], params, eos_id=EOS, seeds=[4])
    model.load_state_dict(other.state_dict())
    after = generate(model, [[1, 2, 3]], params, eos_id=EOS, seeds=[4])
    theirs = generate(other, [[1, 2, 3]], params, eos_id=EOS, seeds=[4])
    assert after.response_ids.tolist() == theirs.response_ids.tolist() != before.response_ids.tolist()


def test_native_engine_load_weights_checksum_and_refusals() -> None:
    engine = NativeEngine(eos_model(seed=0))
    other = eos_model(seed=1)
    state = {k: v.numpy() for k, v in other.state_dict().items()}
    checksum = engine.load_weights(state, version=3)
    assert checksum == weights_checksum(other.state_dict()) and engine.version == 3
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    mine = engine.generate([[1, 2, 3]], params, eos_id=EOS, seeds=[4])
    theirs = generate(other, [[1, 2, 3]], params, eos_id=EOS, seeds=[4])
    assert mine.response_ids.tolist() == theirs.response_ids.tolist()
    with pytest.raises(ValueError, match="missing transformer.h.0.attn.c_attn.bias"):
        engine.load_weights({k: v for k, v in state.items() if k != "transformer.h.0.attn.c_attn.bias"}, 4)
    bad = dict(state, **{"transformer.wpe.weight": state["transformer.wpe.weight"][:5]})
    with pytest.raises(ValueError, match=r"state\['transformer.wpe.weight'\]: shape"):
        engine.load_weights(bad, 4)


@pytest.mark.slow  # ~15 s of inductor compilation
def test_compiled_decode_step_equals_each_row_alone() -> None:
    model, ps = eos_model(), prompts()
    params = SamplingParams(max_new_tokens=16, temperature=1.0)
    seeds = torch.arange(len(ps) * 2) + 3
    out = decode(model, ps, params, seeds=seeds, eos_id=EOS, n=2, max_rows=5, pad_id=EOS, compile=True)
    for r in range(len(ps) * 2):
        tokens, lps = naive(model, ps[r // 2], params, int(seeds[r]))
        assert out.tokens[r, :int(out.lengths[r])].tolist() == tokens, f"row {r}"
        torch.testing.assert_close(out.logprobs[r, :int(out.lengths[r])], lps, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="compile"):
        decode(model, ps, params, seeds=seeds, n=2, packed=True, compile=True)
