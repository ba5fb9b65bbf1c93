"""Byte-level BPE tokenizer (GPT-2, Radford et al. 2019 §2.2) on the Hugging Face `tokenizers` library.

GPT-2's scheme: text → UTF-8 bytes → each byte mapped to a printable stand-in character (so the 256 byte
values form the base vocabulary and any string is representable: no <unk>) → BPE merges learned greedily from
pair frequencies. Before merging, text is split by GPT-2's pre-tokenisation regex
(`'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`) and merges happen only inside a
piece, so a token never mixes letters, digits, punctuation and whitespace (except an optional leading space
and the English contractions). GPT-2 §2.2 motivates this: without it BPE wastes vocabulary on `dog.`, `dog!`,
`dog?`.

`<|endoftext|>` separates documents. A vocabulary trained here puts it at id 0 (the tiny model presets rely on
eos_token_id = 0); the official GPT-2 vocabulary has it at 50256.

Pure Python + `tokenizers`; never imports ray or torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

EOS_TOKEN = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or not a byte-level BPE with `<|endoftext|>`; names the file."""


def _configure(tok: _HFTokenizer) -> _HFTokenizer:
    # add_prefix_space=False: GPT-2 encodes "Hello" and " Hello" differently and never invents a space;
    # use_regex=True: GPT-2's pre-tokenisation regex (merges never cross character categories).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets byte-exact; ids are unaffected either way.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


class Tokenizer:
    """A byte-level BPE tokenizer with `<|endoftext|>` as end-of-text / document separator.

    Construct with `Tokenizer.train`, `Tokenizer.from_file` (tokenizer.json) or `Tokenizer.from_gpt2_files`.
    """

    def __init__(self, tok: _HFTokenizer, source: str = "<memory>") -> None:
        eos = tok.token_to_id(EOS_TOKEN)
        if eos is None:
            raise TokenizerError(f"{source}: vocabulary has no {EOS_TOKEN!r} token")
        self._tok = tok
        self._eos = int(eos)
        self.source = source

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Learn a byte-level BPE vocabulary of `vocab_size` tokens from `texts`.

        The vocabulary = `<|endoftext|>` (id 0) + the 256 byte symbols + learned merges, so `vocab_size` must be
        at least 257. Fewer tokens result if the corpus has no more pairs of frequency ≥ `min_frequency`.
        """
        if vocab_size < 257:
            raise ValueError(f"vocab_size: must be ≥ 257 (1 special + 256 bytes), got {vocab_size}")
        if min_frequency < 1:
            raise ValueError(f"min_frequency: must be ≥ 1, got {min_frequency}")
        tok = _configure(_HFTokenizer(models.BPE()))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS_TOKEN],  # special tokens are numbered first → id 0
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        out = cls(tok, source="<trained>")
        if out.eos_id != 0:  # guaranteed by BpeTrainer's ordering; checked because the presets depend on it
            raise AssertionError(f"trained tokenizer put {EOS_TOKEN!r} at id {out.eos_id}, expected 0")
        return out

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a `tokenizer.json` written by `save` (or any byte-level BPE tokenizer.json with `<|endoftext|>`)."""
        p = Path(path)
        if not p.is_file():
            raise TokenizerError(f"{p}: no such tokenizer file")
        try:
            tok = _HFTokenizer.from_str(p.read_text(encoding="utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception with a serde message
            raise TokenizerError(f"{p}: not a valid tokenizer.json ({e})") from None
        return cls(tok, source=str(p))

    @classmethod
    def from_gpt2_files(cls, vocab_json: str | os.PathLike[str], merges_txt: str | os.PathLike[str]) -> Tokenizer:
        """Load the official GPT-2 files: `vocab.json` (a.k.a. `encoder.json`) and `merges.txt` (`vocab.bpe`)."""
        vp, mp = Path(vocab_json), Path(merges_txt)
        for p in (vp, mp):
            if not p.is_file():
                raise TokenizerError(f"{p}: no such file")
        try:
            vocab = json.loads(vp.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{vp}: not valid JSON ({e})") from None
        if not isinstance(vocab, dict) or not vocab or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()
        ):
            raise TokenizerError(f"{vp}: expected a JSON object mapping token strings to integer ids")
        try:
            lines = mp.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{mp}: not UTF-8 text ({e})") from None
        merges: list[tuple[str, str]] = []
        for n, line in enumerate(lines, 1):
            if not line.strip() or (n == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab or parts[0] + parts[1] not in vocab:
                raise TokenizerError(f"{mp}:{n}: not a merge of two vocabulary tokens: {line!r}")
            merges.append((parts[0], parts[1]))
        tok = _HFTokenizer(models.BPE(vocab=vocab, merges=merges))
        _configure(tok)
        if EOS_TOKEN not in vocab:
            raise TokenizerError(f"{vp}: vocabulary has no {EOS_TOKEN!r} token")
        tok.add_special_tokens([EOS_TOKEN])  # already in the vocab (50256): marks it special, keeps its id
        return cls(tok, source=f"{vp} + {mp}")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `tokenizer.json` atomically (tmp file in the same directory, then rename)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self._tok.to_str(pretty=True))
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return p

    # --- use ---------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. A literal `<|endoftext|>` in the text is encoded as the special token."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` and each token's [start, end) character offsets in `text` (for loss masks over
        character spans, e.g. the assistant turns of models.chat)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, [(int(s), int(e)) for s, e in enc.offsets]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Exact inverse of `encode` (special tokens are kept). Ids that end inside a multi-byte UTF-8
        character decode the partial bytes to U+FFFD."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def decode_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (may be a partial UTF-8 sequence)."""
        tok = self._tok.id_to_token(int(token_id))
        if tok is None:
            raise IndexError(f"token id {token_id} out of range [0, {self.vocab_size})")
        if tok == EOS_TOKEN:
            return EOS_TOKEN.encode()
        inv = _byte_decoder()
        return bytes(inv[c] for c in tok)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def to_str(self) -> str:
        return self._tok.to_str()

    def sha256(self) -> str:
        """Hash of the serialized tokenizer: identifies the vocabulary a dataset was tokenised with."""
        return hashlib.sha256(self._tok.to_str().encode()).hexdigest()

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, source={self.source!r})"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte ↔ printable-character table, inverted (`bytes_to_unicode` in GPT-2's encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}
