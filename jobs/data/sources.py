"""Corpus files: listing (local paths, directories, globs, or any pyarrow filesystem URI) and streaming readers.

One document naming rule for every engine (`load_documents`, `raygpt prepare` local or on Ray Data), so the
held-out split — which hashes the names — is the same whichever reads the files:

- `.txt`: one document per file, named by the file; a file longer than `MAX_DOC_CHARS` characters is cut at
  paragraph breaks into parts `name#0`, `name#1`, … (so one big file can still be split). Read with universal
  newlines (`\\r\\n` → `\\n`), `MAX_DOC_CHARS + 1` characters at a time: memory O(MAX_DOC_CHARS), not O(file).
- `.jsonl`: one document per line, the string field `text_field` of the line's JSON object, named `name#i`
  (i = 0-based line index; blank lines are skipped but counted).
- `.parquet`: one document per row of the string column `text_field`, named `name#row` (nulls skipped but
  counted); read one record batch at a time.

Documents whose text is empty or whitespace only are dropped (their index still counts). Errors name the file and,
where there is one, the line or row (`path:LINE: …`, `path#ROW: …`).

`name` is the path as listed (`str(Path)` of the glob/directory match, relative if the pattern was) or the full
URI (`s3://bucket/key.txt`); `open` resolves local paths to absolute ones so Ray workers with another working
directory read the same file. Local paths on a multi-node cluster must be on a filesystem every node mounts.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob as _glob
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq

from models.config import ConfigError
import pyarrow.fs as pafs

MAX_DOC_CHARS = 200_000  # .txt files longer than this are cut into parts (so one big file can still be split)
KINDS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}  # directory listings pick these suffixes
_GLOB_CHARS = re.compile(r"[*?\[]")


class DataError(ConfigError):
    """Bad corpus or dataset input (missing file, empty corpus, missing column). The message names the file.

    A ConfigError so `raygpt prepare` reports it as a one-line error instead of a traceback. (Defined here, the
    lowest module of jobs/data; jobs.data.corpus re-exports it with `Document`.)"""


@dataclass(frozen=True)
class Document:
    name: str  # stable identifier: decides the split and fills the `doc` column
    text: str


@dataclass(frozen=True)
class InputFile:
    """One corpus file: `name` (document names derive from it), `path` to open (absolute local path, or the URI),
    `kind` ("txt" | "jsonl" | "parquet") and `size` in bytes."""

    name: str
    path: str
    kind: str
    size: int

    @property
    def is_uri(self) -> bool:
        return "://" in self.path

    def open_binary(self) -> IO[bytes]:
        if self.is_uri:

            fs, p = pafs.FileSystem.from_uri(self.path)
            return fs.open_input_file(p)  # seekable: Parquet needs it; text readers only read forward
        return open(self.path, "rb")


def _kind(name: str) -> str:
    # As before this module: a listed file that is not .parquet/.jsonl is read as text.
    return KINDS.get(Path(name.split("?")[0]).suffix, "txt")


def _list_uri(pattern: str) -> list[InputFile]:

    scheme, _, rest = pattern.partition("://")
    m = _GLOB_CHARS.search(rest)
    base_rest = rest if m is None else rest[:rest.rfind("/", 0, m.start()) + 1 or 0]
    try:
        fs, base = pafs.FileSystem.from_uri(f"{scheme}://{base_rest}")
    except (pa.ArrowInvalid, OSError, ValueError) as e:
        raise DataError(f"corpus {pattern!r}: not a readable filesystem URI ({e})") from None
    prefix = pattern[:len(pattern) - len(rest)] + base_rest  # "s3://bucket/dir/"
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File and m is None:
        return [InputFile(pattern, pattern, _kind(pattern), info.size or 0)]
    if info.type != pafs.FileType.Directory:
        return []
    out = []
    for f in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if f.type != pafs.FileType.File:
            continue
        rel = f.path[len(base.rstrip("/")) + 1:] if f.path.startswith(base.rstrip("/") + "/") else f.base_name
        uri = prefix.rstrip("/") + "/" + rel
        wanted = fnmatch.fnmatchcase(uri, pattern) if m is not None else Path(rel).suffix in KINDS
        if wanted:
            out.append(InputFile(uri, uri, _kind(uri), f.size or 0))
    return sorted(out, key=lambda x: x.name)


def list_inputs(source: str) -> list[InputFile]:
    """The files of `source` (comma-separated paths / directories / globs / URIs), each pattern's matches sorted,
    patterns in the order given. DataError naming the pattern if one matches nothing."""
    files: list[InputFile] = []
    for pattern in (s.strip() for s in source.split(",")):
        if not pattern:
            continue
        if "://" in pattern:
            found = _list_uri(pattern)
        else:
            p = Path(pattern)
            if p.is_dir():
                paths = sorted(q for q in p.rglob("*") if q.suffix in KINDS and q.is_file())
            else:
                paths = sorted(Path(q) for q in _glob.glob(pattern, recursive=True) if Path(q).is_file())
            found = [InputFile(str(q), str(q.resolve()), _kind(str(q)), q.stat().st_size) for q in paths]
        if not found:
            raise DataError(f"corpus {pattern!r}: no file matches (expected 'shakespeare', 'pydoc', or paths/globs/"
                            "URIs of .txt, .jsonl or .parquet files)")
        files.extend(found)
    return files


# --- readers ----------------------------------------------------------------------------------------------------
def read_documents(f: InputFile, text_field: str = "text") -> Iterator[Document]:
    """The non-blank documents of one file, in file order, streamed (see the module docstring)."""
    if f.kind == "parquet":
        yield from _parquet_docs(f, text_field)
    elif f.kind == "jsonl":
        yield from _jsonl_docs(f, text_field)
    else:
        yield from _txt_docs(f)


def _open_text(f: InputFile) -> io.TextIOWrapper:
    try:
        raw = f.open_binary()
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{f.name}: cannot open ({e})") from None
    # newline=None: universal newlines, as Path.read_text (the reader before streaming) gave.
    return io.TextIOWrapper(raw, encoding="utf-8", newline=None)  # type: ignore[arg-type]


def _bad_utf8(f: InputFile) -> DataError:
    """The error for a file that failed to decode, with the line and byte of the first invalid sequence."""
    dec = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with f.open_binary() as raw:
        while chunk := raw.read(1 << 20):
            pending = len(dec.getstate()[0])
            try:
                dec.decode(chunk)
            except UnicodeDecodeError as e:
                at = max(0, e.start - pending)
                line += chunk[:at].count(b"\n")
                return DataError(f"{f.name}:{line}: not UTF-8 text (invalid byte at offset {offset + at}: {e.reason})")
            line += chunk.count(b"\n")
            offset += len(chunk)
    return DataError(f"{f.name}: not UTF-8 text (truncated multi-byte sequence at the end)")


def _txt_docs(f: InputFile) -> Iterator[Document]:
    """A text file as one document, or as parts cut at paragraph breaks: part boundaries are those of cutting
    the whole text at once — a part ends at the last blank line in its second half, else at MAX_DOC_CHARS."""
    try:
        with _open_text(f) as t:
            buf = t.read(MAX_DOC_CHARS + 1)
            if len(buf) <= MAX_DOC_CHARS:
                if buf.strip():
                    yield Document(f.name, buf)
                return
            part = 0
            while buf:
                if len(buf) > MAX_DOC_CHARS:  # more text follows this part
                    cut = buf.rfind("\n\n", MAX_DOC_CHARS // 2, MAX_DOC_CHARS)
                    end = cut + 2 if cut >= 0 else MAX_DOC_CHARS
                else:
                    end = len(buf)
                text, buf = buf[:end], buf[end:]
                if text.strip():
                    yield Document(f"{f.name}#{part}", text)
                part += 1
                buf += t.read(MAX_DOC_CHARS + 1 - len(buf))
    except UnicodeDecodeError:
        raise _bad_utf8(f) from None


def _jsonl_docs(f: InputFile, text_field: str) -> Iterator[Document]:
    i = -1
    try:
        with _open_text(f) as t:
            for i, line in enumerate(t):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{f.name}:{i + 1}: not valid JSON ({e})") from None
                if not isinstance(obj, dict) or text_field not in obj:
                    keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
                    raise DataError(f"{f.name}:{i + 1}: no field {text_field!r} (found: {keys})")
                text = obj[text_field]
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise DataError(f"{f.name}:{i + 1}: field {text_field!r} must be a string, is "
                                    f"{type(text).__name__}")
                if text.strip():
                    yield Document(f"{f.name}#{i}", text)
    except UnicodeDecodeError:
        raise _bad_utf8(f) from None


def parquet_text_file(f: InputFile, text_field: str) -> pq.ParquetFile:
    """The opened Parquet file, its `text_field` column checked to be a string column; DataError naming the file."""
    try:
        pf = pq.ParquetFile(f.open_binary())
        schema = pf.schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{f.name}: not a readable Parquet file ({e})") from None
    if text_field not in schema.names:
        raise DataError(f"{f.name}: Parquet file has no column {text_field!r} (columns: {', '.join(schema.names)})")
    typ = schema.field(text_field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise DataError(f"{f.name}: column {text_field!r} must be a string column, is {typ}")
    return pf


def _parquet_docs(f: InputFile, text_field: str) -> Iterator[Document]:
    pf = parquet_text_file(f, text_field)
    row = 0
    batches = pf.iter_batches(batch_size=1024, columns=[text_field])
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{f.name}#{row}: unreadable Parquet data at row {row} ({e})") from None
        for t in batch.column(0).to_pylist():
            if t and t.strip():
                yield Document(f"{f.name}#{row}", t)
            row += 1
