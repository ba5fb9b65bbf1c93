"""ELMo (Peters et al. 2018 §3): biLM loss against a naive per-direction loop, the directions' causality with
padding, the residual LSTM stack against a hand-written one, the scalar mix, the byte table, checkpoints,
and the probe on synthetic features whose label lives in one layer only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.config import ElmoConfig, ModelConfigError
from models.elmo import ELMo, ScalarMix, bilm_loss, byte_table, tokenizer_bytes
from models.elmo_probe import pool_layers, train_probe
from models.registry import build_model, load_model, save_model
from models.tokenizer import Tokenizer

CFG = ElmoConfig.from_name("elmo-nano", vocab_size=61)


def model(seed: int = 0) -> ELMo:
    tokens = [bytes([97 + i % 26]) * (1 + i % 4) for i in range(CFG.vocab_size)]
    torch.manual_seed(seed)
    return ELMo(CFG, byte_table(tokens, CFG.max_bytes)).eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, CFG.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids, mask


def test_bilm_loss_equals_a_naive_per_direction_loop() -> None:
    m = model()
    ids, mask = padded_batch()
    fwd, bwd = m(ids, mask)
    loss, metrics = bilm_loss(fwd, bwd, ids, mask)
    f_terms, b_terms = [], []
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        for k in range(n - 1):  # forward: h→_k predicts token k+1
            f_terms.append(-torch.log_softmax(fwd[b, k], -1)[ids[b, k + 1]])
        for k in range(1, n):  # backward: h←_k predicts token k−1
            b_terms.append(-torch.log_softmax(bwd[b, k], -1)[ids[b, k - 1]])
    f_ref, b_ref = torch.stack(f_terms).mean(), torch.stack(b_terms).mean()
    torch.testing.assert_close(metrics["fwd_nll"], f_ref.detach())
    torch.testing.assert_close(metrics["bwd_nll"], b_ref.detach())
    torch.testing.assert_close(loss, (f_ref + b_ref) / 2)


def test_directions_see_only_their_side_and_never_padding() -> None:
    m = model()
    ids, mask = padded_batch()
    with torch.no_grad():
        fwd, bwd = m(ids, mask)
        changed = ids.clone()
        changed[0, 4] = (ids[0, 4] + 1) % CFG.vocab_size
        changed[1, 7] = (ids[1, 7] + 1) % CFG.vocab_size  # a padding position of row 1
        fwd2, bwd2 = m(changed, mask)
    fdiff = (fwd2 - fwd).abs().amax(-1)
    bdiff = (bwd2 - bwd).abs().amax(-1)
    assert (fdiff[0, :4] == 0).all() and (fdiff[0, 4:] > 0).all()  # forward: positions ≥ 4 see token 4
    assert (bdiff[0, 5:] == 0).all() and (bdiff[0, :5] > 0).all()  # backward: positions ≤ 4 see token 4
    assert (fdiff[1, :6] == 0).all() and (bdiff[1, :6] == 0).all()  # padding reaches no real position
    with pytest.raises(ValueError, match="right padding"):
        m(ids, mask.flip(1))


def test_layers_follow_the_residual_lstm_stack_written_out() -> None:
    m = model(1)
    ids = torch.randint(0, CFG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layers = m.layers(ids)
        x = m.token_representation(ids)

        def stack(lstms: torch.nn.ModuleList, h: torch.Tensor) -> list[torch.Tensor]:
            outs = []
            for j, lstm in enumerate(lstms):
                h = lstm(h)[0] + (h if j > 0 else 0)
                outs.append(h)
            return outs

        fwd = stack(m.forward_lstms, x)
        bwd = [h.flip(1) for h in stack(m.backward_lstms, x.flip(1))]
    assert layers.shape == (CFG.n_layer + 1, 2, 7, 2 * CFG.d_model)
    torch.testing.assert_close(layers[0], torch.cat([x, x], -1))
    for j in range(CFG.n_layer):
        torch.testing.assert_close(layers[j + 1], torch.cat([fwd[j], bwd[j]], -1))
    # one token encoder and one softmax for both directions, separate LSTMs
    names = [n for n, _ in m.named_parameters()]
    assert sum(n.startswith("softmax.") for n in names) == 2 and sum(n.startswith("forward_lstms.") for n in names) \
        == sum(n.startswith("backward_lstms.") for n in names) > 0


def test_scalar_mix_weights_sum_to_one_and_gamma_scales() -> None:
    mix = ScalarMix(3)
    with torch.no_grad():
        mix.scalar_parameters.copy_(torch.tensor([0.0, 1.0, 2.0]))
    layers = torch.randn(3, 2, 5, 4)
    torch.testing.assert_close(mix.weights.sum(), torch.tensor(1.0))
    e = torch.exp(torch.tensor([0.0, 1.0, 2.0]))
    expected = sum(e[j] / e.sum() * layers[j] for j in range(3))
    torch.testing.assert_close(mix(layers), expected)
    with torch.no_grad():
        mix.gamma.fill_(2.5)
    torch.testing.assert_close(mix(layers), 2.5 * expected)
    with pytest.raises(ValueError, match="layers"):
        mix(layers[:2])


def test_byte_table_and_tokenizer_bytes() -> None:
    assert byte_table([b"ab", b"", b"abcdef"], 5).tolist() == [[1, 100, 101, 2, 0], [1, 2, 0, 0, 0],
                                                               [1, 100, 101, 102, 2]]
    tok = Tokenizer.train(["Shall I compare thee to a summer's day?"] * 20, vocab_size=300)
    raw = tokenizer_bytes(tok, tok.vocab_size + 2)
    ids = tok.encode("compare thee")
    assert b"".join(raw[i] for i in ids) == b"compare thee" and raw[-1] == b""


def test_checkpoint_roundtrip_and_build_needs_a_tokenizer(tmp_path: Path) -> None:
    tok = Tokenizer.train(["Shall I compare thee to a summer's day?"] * 20, vocab_size=300)
    cfg = CFG.replace(vocab_size=tok.vocab_size)
    with pytest.raises(ModelConfigError, match="tokenizer"):
        build_model(cfg)
    torch.manual_seed(0)
    m = build_model(cfg, tok).eval()
    save_model(m, tmp_path / "elmo", tokenizer=tok)
    data = json.loads((tmp_path / "elmo" / "config.json").read_text())
    assert data["model_type"] == "raygpt-elmo" and (tmp_path / "elmo" / "tokenizer.json").is_file()
    back = load_model(tmp_path / "elmo").eval()
    assert back.config == cfg
    ids = torch.tensor([tok.encode("compare thee to a day")])
    with torch.no_grad():
        torch.testing.assert_close(back.layers(ids), m.layers(ids), atol=0, rtol=0)


def test_a_tiny_elmo_learns_its_corpus() -> None:
    m = model(2).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    ids = torch.arange(40).remainder(CFG.vocab_size).view(4, 10)
    losses = []
    for _ in range(30):
        loss, _ = bilm_loss(*m(ids), ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_probe_finds_the_layer_that_carries_the_label() -> None:
    g = torch.Generator().manual_seed(0)
    n, d = 400, 8
    labels = torch.randint(0, 2, (n,), generator=g)
    layer0 = torch.randn(n, d, generator=g)  # no information about the label
    layer1 = torch.randn(n, d, generator=g)
    layer1[:, 0] += 3.0 * (2 * labels - 1)  # the label is linearly readable from layer 1
    feats = torch.stack([layer0, layer1], 1)  # (N, J=2, D)
    mixed = train_probe(feats[:300], labels[:300], feats[300:], labels[300:], 2)
    alone = train_probe(feats[:300, :1], labels[:300], feats[300:, :1], labels[300:], 2)
    assert mixed.test_accuracy > 0.9 and alone.test_accuracy < 0.7
    assert mixed.mix_weights[1] > 0.5 and mixed.mix_weights.sum().item() == pytest.approx(1.0)
    mlp = train_probe(feats[:300], labels[:300], feats[300:], labels[300:], 2, hidden=16)
    assert mlp.test_accuracy > 0.9
    # pooling: the mean over real tokens only
    layers = torch.arange(12.0).view(1, 1, 3, 4).expand(2, 1, 3, 4)
    pooled = pool_layers(layers, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(pooled, torch.tensor([[[2.0, 3.0, 4.0, 5.0]] * 2]))
    with pytest.raises(ValueError, match="labels"):
        train_probe(feats[:10], labels[:10] + 5, feats[:10], labels[:10], 2)
