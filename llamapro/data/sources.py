"""Reading sources: expand a source's paths (files, directories, globs, URIs, ``demo:NAME``)
into shards, and read each shard (jsonl, parquet, text; compressed or not) into documents or
counted skips.
"""

from __future__ import annotations

import bz2
import fnmatch
import glob as globlib
import gzip
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

from llamapro.config import SourceConfig
from llamapro.data.corpora import default_out
from llamapro.errors import DataPathError

# Data extensions per format (compression suffixes are stripped first). A directory listing takes
# these, except .json unless the format is jsonl (a directory's .json is usually a manifest).
EXTENSIONS = {
    "jsonl": (".jsonl", ".json", ".ndjson"),
    "parquet": (".parquet", ".pq"),
    "text": (".txt", ".text"),
}
COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd", ".lz4": "lz4"}

# Skip reasons, documented in one place (the counts and the preview report them by these names).
SKIP_REASONS = {
    "bad_json": "line is not a JSON object",
    "missing_field": "the text/messages field is absent or null",
    "wrong_type": "the field is not a string (or a message list)",
    "bad_utf8": "bytes are not valid UTF-8",
    "empty": "document is empty or whitespace",
    "too_large": "document exceeds data.max_doc_bytes",
    "bad_messages": "conversation is not a list of role/content turns with an assistant reply",
    "template_error": "the chat template could not render the conversation (prefix-stably)",
    "no_response": "no assistant token is left to train on",
    "unreadable_file": "file could not be opened or broke off while reading (truncated/corrupt)",
}


_CHUNK = 1 << 18          # bytes per read from a text/jsonl stream (and at most lost to a cut)


# --- paths ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileRef:
    """One shard: a file in a (picklable) pyarrow filesystem, its stored size and its format."""

    fs: Any          # pyarrow.fs.FileSystem (picklable: local, S3, GCS, HDFS)
    path: str        # path inside fs
    size: int
    format: str      # jsonl | parquet | text

    @property
    def display(self) -> str:
        kind = getattr(self.fs, "type_name", "local")
        return self.path if kind == "local" else f"{kind}://{self.path}"


def _strip_compression(name: str) -> tuple[str, str | None]:
    low = name.lower()
    for ext, codec in COMPRESSION.items():
        if low.endswith(ext):
            return name[: -len(ext)], codec
    return name, None


def format_of(name: str, configured: str = "auto") -> str | None:
    """The format of a file named ``name``: the configured one, else by extension (None if
    the extension is unknown)."""
    if configured != "auto":
        return configured
    base, _ = _strip_compression(name)
    low = base.lower()
    for fmt, exts in EXTENSIONS.items():
        if low.endswith(exts):
            return fmt
    return None


def _takes_from_directory(name: str, configured: str) -> str | None:
    """Format of a file met inside a directory, or None to leave it (README, LICENSE, _SUCCESS)."""
    base = os.path.basename(name)
    if base.startswith((".", "_")):
        return None
    fmt = format_of(name, "auto")
    if fmt is None or (configured != "auto" and fmt != configured):
        return None
    if configured == "auto" and _strip_compression(name)[0].lower().endswith(".json"):
        return None  # a manifest or schema beside the shards; name .json shards with a glob
    return fmt


def demo_corpus_dir(name: str) -> str:
    """Where ``llamapro data corpora`` writes demo corpus ``name`` (what ``demo:NAME`` reads)."""
    return str(default_out() / name)


def resolve_paths(patterns: list[str], fmt: str = "auto", where: str = "data") -> list[FileRef]:
    """Expand files, directories, globs and URIs into a sorted, de-duplicated list of shards.

    Raises DataPathError naming the first path that matches nothing.
    """
    import pyarrow.fs as pafs

    out: dict[tuple[str, str], FileRef] = {}
    for pattern in patterns:
        if pattern.startswith("demo:"):
            local = demo_corpus_dir(pattern[5:])
            if not os.path.isdir(local):
                raise DataPathError(
                    f"{where}: demo corpus {pattern!r} is not built ({local} does not exist); "
                    "run `llamapro data corpora` first")
            pattern = local
        if "://" in pattern:
            try:
                fs, path = pafs.FileSystem.from_uri(pattern)
            except Exception as e:  # unknown scheme, bad bucket name, missing credentials
                raise DataPathError(f"{where}: cannot open {pattern!r}: {e}") from e
        else:
            fs, path = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(
                os.path.expandvars(pattern)))
        found = _expand_one(fs, path, fmt)
        if not found:
            raise DataPathError(_nothing_message(fs, path, pattern, fmt, where))
        for ref in found:
            out.setdefault((ref.fs.type_name, ref.path), ref)
    return sorted(out.values(), key=lambda r: r.path)


def _nothing_message(fs, path, pattern, fmt, where) -> str:
    import pyarrow.fs as pafs

    if any(c in path for c in "*?["):
        return f"{where}: glob {pattern!r} matches no files"
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return f"{where}: path {pattern!r} does not exist"
    exts = sorted(e for f, es in EXTENSIONS.items() if fmt in ("auto", f) for e in es)
    return (f"{where}: directory {pattern!r} holds no {fmt if fmt != 'auto' else 'data'} files "
            f"(looked for {', '.join(exts)}, optionally compressed; name files with a glob to "
            "take others)")


def _expand_one(fs, path: str, fmt: str) -> list[FileRef]:
    import pyarrow.fs as pafs

    if any(c in path for c in "*?["):
        if fs.type_name == "local":
            names = globlib.glob(path, recursive=True)
            infos = [i for i in fs.get_file_info(sorted(names)) if i.type == pafs.FileType.File]
        else:  # list below the glob's fixed prefix, then match
            parts = path.split("/")
            fixed = []
            for p in parts:
                if any(c in p for c in "*?["):
                    break
                fixed.append(p)
            base = "/".join(fixed) or "/"
            sel = pafs.FileSelector(base, recursive=True, allow_not_found=True)
            infos = [i for i in fs.get_file_info(sel)
                     if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
        return [FileRef(fs, i.path, i.size, format_of(i.path, fmt) or "text") for i in infos]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [FileRef(fs, info.path, info.size, format_of(info.path, fmt) or "text")]
    if info.type == pafs.FileType.Directory:
        out = []
        for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
            if i.type != pafs.FileType.File:
                continue
            rel = i.path[len(path):].lstrip("/")
            if any(part.startswith((".", "_")) for part in rel.split("/")[:-1]):
                continue  # hidden or _temporary directories of a writer
            f = _takes_from_directory(i.path, fmt)
            if f:
                out.append(FileRef(fs, i.path, i.size, f))
        return out
    return []


# --- parsing --------------------------------------------------------------------------------------
# A reader yields (doc, None, loc) for a document or (None, reason, loc) for a skipped one, where
# loc is "path:line" (or "path#row") so a preview can point at the bad record.

def _open_stream(ref: FileRef):
    """(decompressed stream, raw stream) so progress can be measured in stored bytes."""
    import pyarrow as pa

    raw = ref.fs.open_input_stream(ref.path, compression=None)
    _, codec = _strip_compression(ref.path)
    if codec is None:
        return raw, raw
    if codec in ("gzip", "bz2"):
        # Python's decoders read concatenated members and report truncation as EOFError.
        if codec == "gzip":
            return gzip.GzipFile(fileobj=raw, mode="rb"), raw
        return bz2.BZ2File(raw, mode="rb"), raw
    return pa.CompressedInputStream(raw, codec), raw


class Reader:
    """Reads one shard; ``iter_docs()`` yields docs or skips, ``fraction`` tells how much of the
    stored file has been consumed (for size estimates)."""

    def __init__(self, ref: FileRef, src: SourceConfig, max_doc_bytes: int):
        self.ref, self.src, self.max_doc_bytes = ref, src, max_doc_bytes
        self._raw = None
        self._read = 0       # decompressed bytes read from the stream
        self._consumed = 0   # decompressed bytes handed out as lines
        self._rows = self._total_rows = 0
        self._done = False

    @property
    def fraction(self) -> float:
        if self._done:
            return 1.0
        if self.ref.format == "parquet":
            return self._rows / max(1, self._total_rows)
        try:  # consumed bytes, scaled by the stream's compression ratio so far
            stored = self._raw.tell() if self._raw is not None else 0
        except Exception:
            return 0.0
        return min(1.0, self._consumed * (stored / max(1, self._read)) / max(1, self.ref.size))

    def iter_docs(self):
        fmt = self.ref.format
        if fmt == "parquet":
            yield from self._parquet()
        else:
            stream, self._raw = _open_stream(self.ref)
            try:
                yield from (self._jsonl(stream) if fmt == "jsonl" else self._text(stream))
            finally:
                stream.close()
                if self._raw is not stream:
                    self._raw.close()
        self._done = True

    def _lines(self, stream) -> Iterator[bytes | None]:
        """Lines without their newline; None stands for a line longer than max_doc_bytes, which
        is skipped without ever being held in memory."""
        limit = self.max_doc_bytes
        pending, skipping = b"", False
        while True:
            chunk = stream.read(_CHUNK)
            if not chunk:
                break
            self._read += len(chunk)
            pieces = chunk.split(b"\n")
            if len(pieces) == 1:  # no newline in this chunk: the current line goes on
                if not skipping:
                    pending += chunk
                    if len(pending) > limit:
                        pending, skipping = b"", True
                self._consumed += len(chunk)
                continue
            if skipping:
                skipping = False
                self._consumed += len(pieces[0]) + 1
                yield None
            else:
                line = pending + pieces[0]
                self._consumed += len(pieces[0]) + 1
                yield line if len(line) <= limit else None
            for line in pieces[1:-1]:
                self._consumed += len(line) + 1
                yield line if len(line) <= limit else None
            pending = pieces[-1]
            self._consumed += len(pending)
            if len(pending) > limit:
                pending, skipping = b"", True
        if skipping:
            yield None
        elif pending:
            yield pending

    def _jsonl(self, stream):
        name = self.ref.display
        for n, line in enumerate(self._lines(stream), 1):
            loc = f"{name}:{n}"
            if line is None:
                yield None, "too_large", loc
                continue
            if not line.strip():
                continue  # a blank line is no document (trailing newlines, separators)
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                yield None, "bad_utf8", loc
                continue
            try:
                rec = json.loads(text)
            except ValueError:
                yield None, "bad_json", loc
                continue
            if not isinstance(rec, dict):
                yield None, "bad_json", loc
                continue
            doc, reason = extract(rec, self.src)
            yield doc, reason, loc

    def _text(self, stream):
        name = self.ref.display
        unit = self.src.text_unit
        if unit == "file":
            data = stream.read(self.max_doc_bytes + 1)
            self._read = self._consumed = len(data)
            if len(data) > self.max_doc_bytes:
                yield None, "too_large", name
            else:
                yield from _text_doc(data, name)
            return
        if unit == "line":
            for n, line in enumerate(self._lines(stream), 1):
                if line is None:
                    yield None, "too_large", f"{name}:{n}"
                elif line.strip():
                    yield from _text_doc(line, f"{name}:{n}")
            return
        # paragraphs: runs of non-blank lines
        para: list[bytes] = []
        size, start, too_large = 0, 1, False
        for n, line in enumerate(self._lines(stream), 1):
            if line is not None and not line.strip():
                if too_large:
                    yield None, "too_large", f"{name}:{start}"
                elif para:
                    yield from _text_doc(b"\n".join(para), f"{name}:{start}")
                para, size, start, too_large = [], 0, n + 1, False
                continue
            if too_large:
                continue
            if line is None or size + len(line) + 1 > self.max_doc_bytes:
                para, size, too_large = [], 0, True
                continue
            para.append(line)
            size += len(line) + 1
        if too_large:
            yield None, "too_large", f"{name}:{start}"
        elif para:
            yield from _text_doc(b"\n".join(para), f"{name}:{start}")

    def _parquet(self):
        import pyarrow.parquet as pq

        src, name = self.src, self.ref.display
        f = self.ref.fs.open_input_file(self.ref.path)
        try:
            pf = pq.ParquetFile(f)
            self._total_rows = pf.metadata.num_rows
            names = set(pf.schema_arrow.names)
            if src.kind == "text":
                cols = [src.text_field] if src.text_field in names else []
            else:
                cols = [c for c in (src.messages_field, "conversations", "instruction", "input",
                                    "output", "system") if c in names]
            if not cols:
                # The whole shard lacks the field: each of its rows is a skipped document.
                field_ = src.text_field if src.kind == "text" else src.messages_field
                for row in range(1, self._total_rows + 1):
                    self._rows = row
                    yield None, "missing_field", f"{name}#{row} (no column {field_!r})"
                return
            for batch in pf.iter_batches(columns=cols, batch_size=1024):
                for rec in batch.to_pylist():
                    self._rows += 1
                    doc, reason = extract(rec, src, max_bytes=self.max_doc_bytes)
                    yield doc, reason, f"{name}#{self._rows}"
        finally:
            f.close()


def _text_doc(data: bytes, loc: str):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        yield None, "bad_utf8", loc
        return
    if not text.strip():
        yield None, "empty", loc
        return
    yield text, None, loc


def extract(rec: dict, src: SourceConfig, max_bytes: int | None = None):
    """The document of one record: (text or message list, None) or (None, skip reason)."""
    if src.kind == "text":
        v = rec.get(src.text_field)
        if v is None:
            return None, "missing_field"
        if isinstance(v, (bytes, bytearray)):  # a binary parquet column
            try:
                v = bytes(v).decode("utf-8")
            except UnicodeDecodeError:
                return None, "bad_utf8"
        if not isinstance(v, str):
            return None, "wrong_type"
        if max_bytes is not None and len(v) > max_bytes:
            return None, "too_large"
        if not v.strip():
            return None, "empty"
        return v, None
    return conversation(rec, src.messages_field)


_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
          "bot": "assistant", "model": "assistant", "system": "system"}


def conversation(rec: dict, messages_field: str = "messages"):
    """Normalize a messages list, a ShareGPT conversation or an alpaca record to role/content
    turns: (messages, None) or (None, skip reason)."""
    turns = rec.get(messages_field)
    if turns is None and messages_field != "conversations":
        turns = rec.get("conversations")
    if turns is None:
        instr, out = rec.get("instruction"), rec.get("output")
        if instr is None or out is None:
            return None, "missing_field"
        if not isinstance(instr, str) or not isinstance(out, str) or not isinstance(
                rec.get("input") or "", str) or not isinstance(rec.get("system") or "", str):
            return None, "wrong_type"
        if not instr.strip() or not out.strip():
            return None, "empty"
        user = instr if not (rec.get("input") or "").strip() else f"{instr}\n\n{rec['input']}"
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
        if (rec.get("system") or "").strip():
            msgs.insert(0, {"role": "system", "content": rec["system"]})
        return msgs, None
    if not isinstance(turns, list):
        return None, "wrong_type"
    if not turns:
        return None, "empty"
    msgs = []
    for t in turns:
        if not isinstance(t, dict):
            return None, "bad_messages"
        role = t.get("role", t.get("from"))
        content = t.get("content", t.get("value"))
        role = _ROLES.get(role) if isinstance(role, str) else None
        if role is None or not isinstance(content, str):
            return None, "bad_messages"
        msgs.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        return None, "bad_messages"
    return msgs, None


def read_errors() -> tuple:
    """What a missing, truncated or corrupt shard raises (not what a bug in llamapro raises)."""
    import zlib

    import pyarrow as pa

    return (OSError, EOFError, ValueError, zlib.error, pa.ArrowException)
