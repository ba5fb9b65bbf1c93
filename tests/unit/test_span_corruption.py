"""T5's span corruption (Raffel et al. 2020 §3.1.4) by its properties, the text-to-text batch (§2.4), and the
seq2seq loss against transformers' own loss on the same model and labels."""

from __future__ import annotations

import pytest
import torch
import transformers

from models.config import T5Config
from models.span_corruption import (
    noise_mask,
    sentinel_ids,
    seq2seq_loss,
    shift_right,
    span_corruption,
    span_corruption_batch,
    text_to_text_batch,
)
from models.t5 import T5

SENT = sentinel_ids(1000, 100)
EOS = 1


def reconstruct(inp: list[int], tgt: list[int]) -> list[int]:
    """Independent inverse: replace each sentinel in the input by the tokens that follow it in the target."""
    spans: dict[int, list[int]] = {}
    current = None
    for tok in tgt[:-1]:
        if tok in SENT:
            current = tok
            spans[current] = []
        else:
            spans[current].append(tok)  # type: ignore[index]
    out: list[int] = []
    for tok in inp[:-1]:
        out.extend(spans[tok] if tok in SENT else [tok])
    return out


@pytest.mark.parametrize("length", [20, 57, 100, 512])
def test_inputs_and_targets_reconstruct_the_example_with_sentinels_in_order(length: int) -> None:
    ids = torch.randint(2, 900, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    for seed in range(5):
        inp, tgt = span_corruption(ids, SENT, EOS, seed)
        inp_l, tgt_l = inp.tolist(), tgt.tolist()
        assert inp_l[-1] == EOS and tgt_l[-1] == EOS
        assert reconstruct(inp_l, tgt_l) == ids
        in_sent = [t for t in inp_l if t in SENT]
        tgt_sent = [t for t in tgt_l if t in SENT]
        assert in_sent == tgt_sent == SENT[:len(in_sent)]  # unique, in order <extra_id_0>, <extra_id_1>, ...
        n_noise = len(tgt_l) - 1 - len(tgt_sent)
        assert n_noise == round(length * 0.15)  # noise density 0.15
        assert len(tgt_sent) == max(round(n_noise / 3), 1)  # mean span length 3


def test_density_and_span_length_over_many_draws() -> None:
    gen = torch.Generator().manual_seed(0)
    masks = torch.stack([noise_mask(200, 0.15, 3.0, gen) for _ in range(200)])
    assert masks.float().mean().item() == pytest.approx(0.15)
    starts = masks & ~torch.cat([torch.zeros(200, 1, dtype=torch.bool), masks[:, :-1]], 1)
    assert masks.sum().item() / starts.sum().item() == pytest.approx(3.0, rel=0.05)
    # spans land in different places for different draws
    assert len({tuple(m.nonzero().flatten().tolist()) for m in masks}) > 150


def test_seeded_and_pure() -> None:
    ids = list(range(10, 70))
    a, b = span_corruption(ids, SENT, EOS, 7), span_corruption(ids, SENT, EOS, 7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(span_corruption(ids, SENT, EOS, 8)[0], a[0])
    assert ids == list(range(10, 70))
    with pytest.raises(ValueError, match="sentinel"):
        span_corruption(ids, SENT[:1], EOS, 7)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        span_corruption([5], SENT, EOS, 0)


def test_text_to_text_batch_adds_prefix_eos_and_shifts() -> None:
    b = text_to_text_batch([([5, 6, 7], [8, 9]), ([5], [10, 11, 12, 13, 14])], prefix=[3, 4], eos_id=EOS, pad_id=0,
                           decoder_start_token_id=0, max_input_len=5, max_target_len=4)
    assert b.input_ids.tolist() == [[3, 4, 5, 6, 1], [3, 4, 5, 1, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert b.labels.tolist() == [[8, 9, 1, 0], [10, 11, 12, 1]]
    assert b.labels_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert b.decoder_input_ids.tolist() == [[0, 8, 9, 1], [0, 10, 11, 12]]
    assert torch.equal(shift_right(b.labels, 0), b.decoder_input_ids)


def test_seq2seq_loss_equals_transformers_loss() -> None:
    cfg = T5Config.from_name("t5-nano", vocab_size=1000)
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(
        transformers.T5Config(**{k: v for k, v in cfg.to_dict().items() if k != "n_ctx"})).eval()
    ours = T5(cfg).eval()
    ours.load_state_dict(hf.state_dict())
    examples = [torch.randint(2, 900, (n,), generator=torch.Generator().manual_seed(n)) for n in (30, 41)]
    b = span_corruption_batch(examples, SENT, EOS, pad_id=0, decoder_start_token_id=0, seed=3)
    labels = b.labels.masked_fill(b.labels_mask == 0, -100)
    with torch.no_grad():
        theirs = hf(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=labels).loss
        mine = seq2seq_loss(ours(b.input_ids, b.attention_mask, b.decoder_input_ids), b.labels, b.labels_mask)
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_a_tiny_t5_learns_span_corruption() -> None:
    cfg = T5Config.from_name("t5-nano", vocab_size=128)
    sent = sentinel_ids(cfg.vocab_size, 20)
    torch.manual_seed(0)
    model = T5(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = [torch.arange(2, 42) for _ in range(8)]  # a fixed, learnable "text": counting
    losses = []
    for step in range(40):
        b = span_corruption_batch(data, sent, EOS, 0, 0, seed=step * 8)
        loss = seq2seq_loss(model(b.input_ids, b.attention_mask, b.decoder_input_ids), b.labels, b.labels_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
