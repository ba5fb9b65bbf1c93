"""actors/rollout.py and the pure parts of the PPO controller, without Ray (CPU, a few seconds).

- slicing/concatenation/pickling of the Rollout record (what moves through the object store);
- `finalize` against a naive per-row computation, and its independence from how the batch was sharded;
- sampling a shard gives the same rows as sampling the whole batch (per-row seeds), which is what makes
  colocated, disaggregated and rollout-worker layouts agree;
- stale-weight refusal, the checksum, the prompt stream.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from actors.base import sample_rollout, weights_checksum
from actors.policy import WeightsInfo
from actors.reward import decode_rollout
from actors.rollout import TENSOR_FIELDS, ReadOnlyTensor, Rollout, RolloutError, finalize
from jobs.rl.controller import StaleWeightsError, check_weights, prompt_order
from models.config import GPTConfig
from models.generation import SamplingParams
from models.gpt import GPT


def random_rollout(seed: int, b: int = 6, p: int = 5, t: int = 7, version: int = 3) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    plen = torch.randint(1, p + 1, (b,), generator=g)
    tlen = torch.randint(1, t + 1, (b,), generator=g)
    prompt_mask = (torch.arange(p)[None] >= (p - plen)[:, None]).long()
    action_mask = (torch.arange(t)[None] < tlen[:, None]).long()
    prompt_ids = torch.where(prompt_mask.bool(), torch.randint(1, 50, (b, p), generator=g), 0)
    response_ids = torch.where(action_mask.bool(), torch.randint(1, 50, (b, t), generator=g), 0)
    lp = -torch.rand(b, t, generator=g) * 3
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                   action_mask=action_mask, old_logprobs=torch.where(action_mask.bool(), lp, 0.0),
                   row_index=torch.arange(b), weight_version=version, weight_checksum="abc").validate()


def scored_parts(r: Rollout, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = r.action_mask.bool()
    ref = torch.where(m, r.old_logprobs + 0.3 * torch.randn(r.old_logprobs.shape, generator=g), 0.0)
    scores = torch.randn(r.batch_size, generator=g)
    values = torch.where(m, torch.randn(r.old_logprobs.shape, generator=g), 0.0)
    return ref, scores, values


def test_split_then_concat_is_identity() -> None:
    r = random_rollout(0, b=7)
    parts = r.split(3)
    assert [p.batch_size for p in parts] == [2, 2, 3]
    back = Rollout.concat(parts)
    for name in ("prompt_ids", "prompt_mask", "response_ids", "action_mask", "old_logprobs", "row_index"):
        assert torch.equal(getattr(back, name), getattr(r, name)), name
    assert (back.weight_version, back.weight_checksum) == (3, "abc")


def test_concat_repads_prompts_left_and_responses_right() -> None:
    a, b = random_rollout(1, b=2, p=3, t=4), random_rollout(2, b=3, p=6, t=2)
    c = Rollout.concat([a, b])
    assert c.prompt_ids.shape == (5, 6) and c.response_ids.shape == (5, 4)
    for row, src, i in [(0, a, 0), (1, a, 1), (2, b, 0), (4, b, 2)]:
        # The real tokens of each row, in order, are unchanged by the re-padding.
        assert c.input_ids[row][c.attention_mask[row].bool()].tolist() == \
            src.input_ids[i][src.attention_mask[i].bool()].tolist()
    assert c.prompt_mask[:2, :3].sum() == 0 and c.action_mask[2:, 2:].sum() == 0


def test_concat_refuses_mixed_weight_versions() -> None:
    with pytest.raises(RolloutError, match="weight_version"):
        Rollout.concat([random_rollout(0, version=1), random_rollout(1, version=2)])


def test_validate_names_the_bad_field() -> None:
    r = random_rollout(0)
    with pytest.raises(RolloutError, match="values: expected shape"):
        r.replace(values=torch.zeros(r.batch_size, 3)).validate()
    with pytest.raises(RolloutError, match="scores"):
        r.replace(scores=torch.zeros(2)).validate()


def test_pickle_round_trip_goes_through_numpy_and_reads_zero_copy() -> None:
    r = random_rollout(3)
    r = r.replace(scores=torch.randn(r.batch_size))
    reduced = r.__reduce__()[1][0]
    assert all(type(v).__module__ == "numpy" for v in reduced.values())
    back = pickle.loads(pickle.dumps(r))
    assert torch.equal(back.response_ids, r.response_ids) and torch.equal(back.scores, r.scores)
    assert back.ref_logprobs is None and back.weight_checksum == "abc"
    # What Ray does: protocol 5, the arrays' bytes out of band, handed back as read-only buffers of the store's
    # shared memory. The rebuilt tensors must point INTO those buffers (no copy) ...
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(r, protocol=5, buffer_callback=buffers.append)
    store = [bytearray(b.raw()) for b in buffers]
    shared = pickle.loads(data, buffers=[memoryview(m).toreadonly() for m in store])
    addresses = {np.frombuffer(m, dtype=np.uint8).ctypes.data for m in store}
    for name in TENSOR_FIELDS:
        if getattr(r, name) is not None:
            assert getattr(shared, name).data_ptr() in addresses, name
            assert torch.equal(getattr(shared, name), getattr(r, name)), name
    # ... and no write may reach them: in-place ops, item assignment, writes through a view and out= all raise.
    lp = shared.old_logprobs
    before = bytes(store[0]), bytes(store[-1])
    for write in (lambda: lp.add_(1.0), lambda: lp.__setitem__((0, 0), 5.0), lambda: lp[0].fill_(0.0),
                  lambda: torch.mul(lp, 2.0, out=lp), lambda: shared.scores.__iadd__(1.0),
                  lambda: lp.view(-1).zero_()):
        with pytest.raises(RolloutError, match="read-only"):
            write()
    assert not lp.numpy().flags.writeable
    assert (bytes(store[0]), bytes(store[-1])) == before
    # Reading ops give ordinary tensors in new memory, which a consumer may write; so does a copy.
    doubled, copy = lp * 2, lp.clone()
    assert type(doubled) is torch.Tensor and type(copy) is torch.Tensor
    copy.add_(1.0)
    assert_close(copy, r.old_logprobs + 1.0)
    assert type(shared.select([0, 1]).old_logprobs) is torch.Tensor
    assert isinstance(lp[0], ReadOnlyTensor) and isinstance(lp.to("cpu"), ReadOnlyTensor)  # views stay protected


def naive_finalize(r: Rollout, ref: torch.Tensor, scores: torch.Tensor, values: torch.Tensor, beta: float,
                   gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, per token: r_t = −β·(logπ − logπ_ref) + score at the last token; GAE loop; whiten over all valid
    tokens of the whole batch (unbiased variance)."""
    b, t = r.old_logprobs.shape
    adv = torch.zeros(b, t, dtype=torch.float64)
    ret = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        n = int(r.action_mask[i].sum())
        rew = [-beta * float(r.old_logprobs[i, s] - ref[i, s]) for s in range(n)]
        rew[-1] += float(scores[i])
        last = 0.0
        for s in reversed(range(n)):
            nv = float(values[i, s + 1]) if s + 1 < n else 0.0
            last = rew[s] + gamma * nv - float(values[i, s]) + gamma * lam * last
            adv[i, s] = last
            ret[i, s] = last + float(values[i, s])
    m = r.action_mask.bool()
    flat = adv[m]
    white = torch.where(m, (adv - flat.mean()) / torch.sqrt(flat.var(unbiased=True) + 1e-8), 0.0)
    return white, ret


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finalize_matches_naive_per_row_computation(seed: int) -> None:
    r = random_rollout(seed, b=6)
    ref, scores, values = scored_parts(r, seed)
    stats, outs = finalize([r], [ref], [scores], [values], beta=0.2, kl_estimator="k1", gamma=0.9, lam=0.8,
                           whiten_advantages=True, splits=[2])
    got = Rollout.concat(outs[0])
    adv, ret = naive_finalize(r, ref, scores, values, 0.2, 0.9, 0.8)
    assert_close(got.advantages.double(), adv, atol=1e-5, rtol=1e-5)
    assert_close(got.returns.double(), ret, atol=1e-5, rtol=1e-5)
    m = r.action_mask.bool()
    assert stats["kl"] == pytest.approx(float(torch.where(m, r.old_logprobs - ref, 0.0).sum(1).mean()), rel=1e-5)
    assert stats["proxy_reward"] == pytest.approx(float(scores.mean()), rel=1e-6)


def test_finalize_does_not_depend_on_how_generation_was_sharded() -> None:
    r = random_rollout(5, b=8)
    ref, scores, values = scored_parts(r, 5)
    kw = dict(beta=0.1, kl_estimator="k3", gamma=1.0, lam=0.95, whiten_advantages=True, splits=[1, 2])
    s1, whole = finalize([r], [ref], [scores], [values], **kw)
    # Three uneven shards handed over in scrambled order, each with its own padding widths.
    idx = [[5, 1, 7], [0], [3, 2, 6, 4]]
    parts = [r.select(i) for i in idx]
    s2, sharded = finalize(parts, [ref[i] for i in idx], [scores[i] for i in idx], [values[i] for i in idx], **kw)
    a, b = whole[0][0], Rollout.concat(sharded[0])
    assert torch.equal(a.row_index, b.row_index)
    for name in ("advantages", "returns", "rewards", "kl"):
        assert_close(getattr(a, name), getattr(b, name), atol=0, rtol=0)
    assert [p.batch_size for p in sharded[1]] == [4, 4]
    assert s1 == s2


def nano_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_name("nano", vocab_size=64)).eval()


def test_a_shard_samples_the_same_rows_as_the_whole_batch() -> None:
    model = nano_model()
    prompts = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10], [11, 12], [13]]
    seeds = [100 + i for i in range(6)]
    s = SamplingParams(max_new_tokens=6, temperature=1.0)
    whole = sample_rollout(model, prompts, list(range(6)), seeds, s, 0, 0, "x")
    parts = [sample_rollout(model, prompts[a:b], list(range(a, b)), seeds[a:b], s, 0, 0, "x")
             for a, b in [(0, 2), (2, 6)]]
    joined = Rollout.concat(parts)
    t = min(whole.response_ids.shape[1], joined.response_ids.shape[1])
    assert torch.equal(whole.response_ids[:, :t], joined.response_ids[:, :t])
    assert_close(whole.old_logprobs[:, :t], joined.old_logprobs[:, :t], atol=1e-5, rtol=1e-5)


def test_weights_checksum_sees_a_one_ulp_change() -> None:
    a = nano_model(0).state_dict()
    b = {k: v.clone() for k, v in a.items()}
    assert weights_checksum(a) == weights_checksum(b)
    w = b["transformer.h.0.mlp.c_fc.weight"]
    w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(1.0))
    assert weights_checksum(a) != weights_checksum(b)


def test_controller_refuses_stale_or_mismatched_weights() -> None:
    from actors.base import RolloutMeta

    expected = WeightsInfo(version=4, checksum="c4")
    check_weights([RolloutMeta(2, 4, "c4", 10)], expected)
    with pytest.raises(StaleWeightsError, match="version 3"):
        check_weights([RolloutMeta(2, 4, "c4", 10), RolloutMeta(2, 3, "c3", 10)], expected)
    with pytest.raises(StaleWeightsError, match="shard 0"):
        check_weights([RolloutMeta(2, 4, "other", 10)], expected)


def test_prompt_stream_visits_every_prompt_once_per_epoch_and_is_a_pure_function() -> None:
    n, batch = 10, 4
    stream = [i for it in range(5) for i in prompt_order(n, 7, it, batch)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert prompt_order(n, 7, 3, batch) == stream[12:16]
    assert prompt_order(n, 8, 0, batch) != prompt_order(n, 7, 0, batch)


def test_decode_rollout_drops_padding_and_the_closing_eos() -> None:
    r = random_rollout(0, b=2, p=3, t=4)
    r.response_ids[0, int(r.action_mask[0].sum()) - 1] = 0  # the last real token of row 0 is EOS (id 0)
    prompts, responses = decode_rollout(r, lambda ids: ",".join(map(str, ids)), eos_id=0)
    n = int(r.action_mask[0].sum()) - 1
    assert responses[0] == ",".join(map(str, r.response_ids[0, :n].tolist()))
    assert prompts[1] == ",".join(map(str, r.prompt_ids[1][r.prompt_mask[1].bool()].tolist()))


def test_rollout_worker_refuses_missing_and_corrupted_weights(tmp_path) -> None:
    from actors.base import WeightsMessage
    from actors.rollout_worker import RolloutWorker, RolloutWorkerSpec
    from models.checkpoint import save_checkpoint

    model = nano_model(1)
    save_checkpoint(model, tmp_path / "sft", kind="lm")
    worker = RolloutWorker(RolloutWorkerSpec(str(tmp_path / "sft"), SamplingParams(max_new_tokens=3), eos_id=0))
    with pytest.raises(RolloutError, match="no weights yet"):
        worker.generate([[1, 2]], [0], [5])
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    message = WeightsMessage(version=1, checksum=weights_checksum(state), state=state)
    assert worker.load_weights(message) == (1, message.checksum)
    meta, rollout = worker.generate([[1, 2], [3]], [0, 1], [5, 6])
    assert (meta.weight_version, meta.weight_checksum) == (1, message.checksum) and rollout.batch_size == 2
    # Weights that do not hash to what the policy announced are refused, and the worker stops sampling.
    bad = dict(state, **{"transformer.ln_f.bias": state["transformer.ln_f.bias"] + 1e-3})
    with pytest.raises(RolloutError, match="weight_checksum"):
        worker.load_weights(WeightsMessage(version=2, checksum=message.checksum, state=bad))
    with pytest.raises(RolloutError, match="no weights yet"):
        worker.generate([[1, 2]], [0], [5])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_equal_the_training_forward(temperature: float) -> None:
    """PPO's ratio π_θ/π_old is exactly 1 before the first step only if the sampler's log-probs (KV cache, one
    token at a time) equal the update's (one full forward pass over prompt + response) under the same
    temperature."""
    from actors.base import response_logits, response_logprobs

    model = nano_model(2)
    prompts = [[5 + i] * (1 + i % 4) for i in range(8)]
    r = sample_rollout(model, prompts, list(range(8)), list(range(8)),
                       SamplingParams(max_new_tokens=10, temperature=temperature), 0, 0, "")
    with torch.no_grad():
        again = response_logprobs(response_logits(model, r), r, temperature)
    assert_close(again, r.old_logprobs, atol=1e-5, rtol=0)


def test_large_fields_travel_as_pieces_and_are_read_back_as_one_view_without_a_copy() -> None:
    """A field over 1 MiB is pickled as ≤ 1 MiB byte views (Ray copies each larger buffer with threads it spawns
    per buffer). Laid end to end — as Ray lays 64-byte-multiple buffers in one object — they are read back as one
    view over that memory; pickled in-band (plain pickle) they are joined by one copy. Both equal the original."""
    from actors.rollout import PIECE_BYTES

    b, t = 1024, 640  # old_logprobs 2.5 MiB (2 pieces and a half one), response_ids and action_mask 5 MiB each
    g = torch.Generator().manual_seed(0)
    r = Rollout(prompt_ids=torch.randint(1, 99, (b, 3), generator=g), prompt_mask=torch.ones(b, 3).long(),
                response_ids=torch.randint(1, 99, (b, t), generator=g), action_mask=torch.ones(b, t).long(),
                old_logprobs=torch.randn(b, t, generator=g), row_index=torch.arange(b))
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(r, protocol=5, buffer_callback=buffers.append)
    sizes = [b_.raw().nbytes for b_ in buffers]
    assert max(sizes) <= PIECE_BYTES and sizes.count(PIECE_BYTES) == 2 + 5 + 5
    # one store buffer holding every piece end to end (each full piece is a multiple of 64 bytes)
    arena = bytearray(sum(sizes))
    views, offset = [], 0
    for buf, n in zip(buffers, sizes):
        arena[offset:offset + n] = buf.raw()
        views.append(memoryview(arena)[offset:offset + n].toreadonly())
        offset += n
    shared = pickle.loads(data, buffers=views)
    base = np.frombuffer(arena, dtype=np.uint8).ctypes.data
    for name in ("response_ids", "action_mask", "old_logprobs", "prompt_ids"):
        got = getattr(shared, name)
        assert torch.equal(got, getattr(r, name)), name
        assert base <= got.data_ptr() < base + len(arena), name  # a view into the arena, not a copy
        assert isinstance(got, ReadOnlyTensor), name
    with pytest.raises(RolloutError, match="read-only"):
        shared.old_logprobs.add_(1.0)
    back = pickle.loads(pickle.dumps(r))  # in-band: the pieces are separate bytes, joined by a copy
    assert all(torch.equal(getattr(back, n), getattr(r, n)) for n in ("response_ids", "old_logprobs"))
