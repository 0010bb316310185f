"""Ray Data pipeline: read sharded corpora, hold out eval documents, tokenize, pack, mix.

    ds = build_train_dataset(cfg.data, tokenizer_path)     # rows: input_ids, labels, source
    TorchTrainer(..., datasets={"train": ds})              # workers: get_dataset_shard("train")

How a block is made, top to bottom (one work unit = a few shards of one source):

1. **Read** each shard of the unit with its own parser (jsonl, parquet, plain text; gz/bz2/zst/lz4
   by extension; local disk or any pyarrow filesystem). Bad input is *skipped and counted* with a
   reason (``bad_json``, ``missing_field``, ``wrong_type``, ``bad_utf8``, ``empty``,
   ``too_large``, ``bad_messages``, ``template_error``, ``no_response``; whole files:
   ``unreadable_file``), never raised.
2. **Split**: a document is held out for evaluation when a keyed hash of its content falls under
   the source's ``eval_fraction`` (``is_held_out``): stable across runs, independent of shard
   order, and duplicates always land on the same side, so no held-out text reaches training.
3. **Tokenize** with the model's own fast tokenizer. Raw text: the tokenizer's own special tokens
   (a BOS for Llama-style models) + the text + EOS; labels are the input ids; strings that look
   like special tokens (``<|im_end|>`` inside a web page) are read as plain text, never as control
   tokens. Instruction data: rendered with the model's chat template; labels are -100 except on
   the assistant's replies, their end-of-turn token included.
4. **Pack** the documents of one source back to back (each ends with EOS) into blocks of exactly
   ``seq_len`` tokens (``Packer``). A document may continue into the next block, and attention
   is not masked at document boundaries: the usual trade of pretraining packing (no padding
   waste; a token may attend to an unrelated earlier document, separated by EOS). For training,
   the tail of a work unit shorter than one block is dropped (counted as
   ``tail_tokens_dropped``); for evaluation it is padded with labels -100 so every held-out
   token is scored exactly once.
5. **Mix**: every block is kept a number of times drawn from its source's rate by a keyed hash
   of (seed, source, unit, block index), so the set of training blocks is a pure function of the
   corpus, the config and the seed. Rates make each source's share of training *tokens* match its
   weight, from sizes estimated before the run on a sample of each source (``data.mixing``:
   downsample thins the plentiful sources, upsample repeats the scarce ones in later passes).

Steps 1-5 run inside one Ray Data actor pool (``compute=ActorPoolStrategy``): each actor loads
the tokenizer once and turns one work unit at a time into packed blocks, which stream to the
consumers (``streaming_split`` under Ray Train); nothing is materialized. Skip counts go to a
small stats actor; when the last unit of a source has been read, the pipeline raises
``DataError`` if the source yielded nothing or skipped more than ``data.max_skip_fraction`` of its
documents or files. ``preview`` runs the same pipeline without that check and reports the counts.
"""

from __future__ import annotations

import bz2
import fnmatch
import glob as globlib
import gzip
import hashlib
import itertools
import json
import logging
import math
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from llamapro.config import ConfigError, DataConfig, SourceConfig, default_cache_dir
from llamapro.errors import DataError, DataPathError  # noqa: F401

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of a token that carries no loss (prompt tokens, padding): what HF models ignore."""

# Data extensions per format (compression suffixes are stripped first). A directory listing takes
# these, except .json unless the format is jsonl (a directory's .json is usually a manifest).
EXTENSIONS = {
    "jsonl": (".jsonl", ".json", ".ndjson"),
    "parquet": (".parquet", ".pq"),
    "text": (".txt", ".text"),
}
COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd", ".lz4": "lz4"}

# Skip reasons, documented in one place (preview prints them; tests assert them).
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
_TOKENIZE_DOCS = 256      # documents per tokenizer call
_TOKENIZE_BYTES = 1 << 20  # ... or fewer when they are big
_YIELD_TOKENS = 1 << 18   # packed tokens per output batch of a work unit (4 MB of int64 pairs)
_BLOCK_BYTES = 8 << 20    # Ray Data block size cap: the stream's memory must not grow with a unit
_UNIT_MAX_BYTES = 64 << 20  # a work unit groups small shards up to about this size ...
_UNIT_MIN_BYTES = 256 << 10  # ... and down to this (tiny files would each lose a tail)
_ESTIMATE_BYTES = 2 << 20  # raw bytes sampled per source to estimate its size in tokens
_ESTIMATE_FILES = 3


# --- paths ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileRef:
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
    return str(default_cache_dir() / "corpora" / name)


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


class _Reader:
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


# --- the held-out split ---------------------------------------------------------------------------

def doc_key(doc) -> str:
    """The content a document is identified by (for the split): its text, or its turns as JSON."""
    if isinstance(doc, str):
        return doc
    return json.dumps(doc, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _unit_float(*parts) -> float:
    """A uniform number in [0, 1) that is a pure function of ``parts``."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(str(p).encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
    return int.from_bytes(h.digest(), "big") / 2.0 ** 64


def is_held_out(key: str, seed: int, fraction: float) -> bool:
    """Whether a document belongs to the evaluation split: blake2b(seed, content) < fraction.

    Depends only on the content and the seed (not on file names or order), so a corpus that is
    re-sharded keeps its split and duplicate documents never straddle it.
    """
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    h = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8,
                        key=f"llamapro-split-{seed}".encode())
    return int.from_bytes(h.digest(), "big") / 2.0 ** 64 < fraction


# --- tokenizing -----------------------------------------------------------------------------------

class TokenizerBundle:
    """What a Ray actor needs of the model's tokenizer, cheap to ship and to load: the Rust
    tokenizer as JSON (loading it imports only ``tokenizers``), the EOS and padding ids, and the
    pickled HF tokenizer, unpickled only when instruction data needs the chat template (importing
    transformers costs an actor seconds)."""

    def __init__(self, hf_tokenizer):
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise DataError(
                f"{type(hf_tokenizer).__name__} is not a fast tokenizer: llamapro tokenizes inside "
                "Ray Data with the Rust tokenizer (the model directory needs a tokenizer.json)")
        self.eos = hf_tokenizer.eos_token_id
        if self.eos is None:
            raise DataError("the tokenizer has no EOS token; packing needs one to separate "
                            "documents")
        self.pad = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else self.eos
        self.json = backend.to_str()
        try:
            self._hf_blob = pickle.dumps(hf_tokenizer)
        except Exception as e:  # only instruction data needs it; fail there, with the reason
            self._hf_blob, self._pickle_error = None, f"{type(e).__name__}: {e}"
        self._hf = hf_tokenizer
        self._backend = None

    def __getstate__(self):
        return {**self.__dict__, "_hf": None, "_backend": None}

    def backend(self):
        if self._backend is None:
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_str(self.json)
        return self._backend

    def hf(self):
        if self._hf is None:
            if self._hf_blob is None:
                raise DataError("the tokenizer could not be shipped to the Ray actors for chat "
                                f"templates ({self._pickle_error})")
            self._hf = pickle.loads(self._hf_blob)
        return self._hf

    def decode(self, ids) -> str:
        return self.backend().decode([int(i) for i in ids], skip_special_tokens=False)


class Encoder:
    """Token ids and labels of documents, with the model's own fast tokenizer."""

    def __init__(self, tokenizer):
        self.bundle = tokenizer if isinstance(tokenizer, TokenizerBundle) else TokenizerBundle(
            tokenizer)
        self.backend = self.bundle.backend()
        self.eos, self.pad = self.bundle.eos, self.bundle.pad

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Raw text: the tokenizer's own added tokens (BOS where the model wants one), the text,
        EOS."""
        b = self.backend
        b.encode_special_tokens = True  # "<|im_end|>" written in a document is text, not a control
        try:
            fast = getattr(b, "encode_batch_fast", b.encode_batch)
            encs = fast(texts, add_special_tokens=True)
        finally:
            b.encode_special_tokens = False
        out = []
        for e in encs:
            ids = e.ids
            if not ids or ids[-1] != self.eos:
                ids.append(self.eos)
            out.append(ids)
        return out

    def render_chat(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The conversation as the chat template writes it, and the character spans of the
        assistant's replies (each up to and including its end-of-turn marker).

        The span of reply i is what rendering messages[:i+1] adds to rendering messages[:i] with
        the generation prompt, so it works for any template without ``{% generation %}`` markers;
        a template that rewrites earlier turns (not prefix-stable) raises ValueError.
        """
        tpl = self.bundle.hf().apply_chat_template
        full = tpl(messages, tokenize=False).rstrip()
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = tpl(messages[:i], tokenize=False, add_generation_prompt=True)
            upto = tpl(messages[: i + 1], tokenize=False).rstrip()
            if not (upto.startswith(prefix) and full.startswith(upto)):
                raise ValueError("chat template is not prefix-stable")
            if len(upto) > len(prefix):
                spans.append((len(prefix), len(upto)))
        return full, spans

    def encode_chats(self, convs: list[list[dict]]) -> list[tuple[list[int], np.ndarray] | str]:
        """Instruction data: (ids, labels) per conversation, labels -100 outside the replies;
        or a skip reason."""
        rendered, idx, out = [], [], [None] * len(convs)
        for k, msgs in enumerate(convs):
            try:
                text, spans = self.render_chat(msgs)
            except Exception:  # jinja errors, a template that rejects the roles, ...
                out[k] = "template_error"
                continue
            rendered.append((text, spans, msgs[-1]["role"] == "assistant"))
            idx.append(k)
        if not rendered:
            return out
        self.backend.encode_special_tokens = False  # the template's markers are control tokens
        encs = self.backend.encode_batch([r[0] for r in rendered], add_special_tokens=False)
        for k, (text, spans, ends_with_reply), e in zip(idx, rendered, encs):
            ids = e.ids
            offs = np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)
            keep = np.zeros(len(ids), dtype=bool)
            for a, b in spans:
                keep |= (offs[:, 0] >= a) & (offs[:, 1] <= b) & (offs[:, 1] > offs[:, 0])
            labels = np.where(keep, np.asarray(ids, dtype=np.int64), IGNORE_INDEX)
            if not ids or ids[-1] != self.eos:
                ids.append(self.eos)  # the separator; learned only when it ends a reply
                labels = np.append(labels, self.eos if ends_with_reply else IGNORE_INDEX)
            if not keep.any():
                out[k] = "no_response"
                continue
            out[k] = (ids, labels)
        return out


# --- packing --------------------------------------------------------------------------------------

class Packer:
    """Concatenates documents (each already ending in EOS) into blocks of exactly ``seq_len``.

    ``add`` appends a document; ``pop_blocks`` returns every complete block so far as two
    (n, seq_len) int64 arrays and keeps the remainder for the next documents. The remainder at
    the end is either dropped (training: ``tail``) or padded (evaluation: ``pad_tail``).
    """

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self._ids: list = []
        self._labels: list = []
        self.pending = 0

    def add(self, ids, labels=None):
        """labels None means labels = ids (raw text)."""
        self._ids.append(ids)
        self._labels.append(labels)
        self.pending += len(ids)

    def _concat(self):
        ids = np.fromiter(itertools.chain.from_iterable(self._ids), dtype=np.int64,
                          count=self.pending)
        if all(lab is None for lab in self._labels):
            labels = ids.copy()
        else:
            labels = np.concatenate([np.asarray(i, dtype=np.int64) if lab is None else
                                     np.asarray(lab, dtype=np.int64)
                                     for i, lab in zip(self._ids, self._labels)])
        return ids, labels

    def pop_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.pending // self.seq_len
        if n == 0:
            return (np.empty((0, self.seq_len), np.int64),) * 2
        ids, labels = self._concat()
        cut = n * self.seq_len
        self._ids, self._labels = [ids[cut:]], [labels[cut:]]
        self.pending -= cut
        return ids[:cut].reshape(n, self.seq_len), labels[:cut].reshape(n, self.seq_len)

    def tail(self) -> int:
        """Drop the remainder (shorter than one block); return how many tokens that was."""
        n = self.pending
        self._ids, self._labels, self.pending = [], [], 0
        return n

    def pad_tail(self, pad_id: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The remainder as one block padded with ``pad_id`` (labels -100 on the padding)."""
        if self.pending == 0:
            return None
        ids, labels = self._concat()
        pad = self.seq_len - len(ids)
        self._ids, self._labels, self.pending = [], [], 0
        ids = np.concatenate([ids, np.full(pad, pad_id, np.int64)])
        labels = np.concatenate([labels, np.full(pad, IGNORE_INDEX, np.int64)])
        return ids[None, :], labels[None, :]


# --- mixture --------------------------------------------------------------------------------------

def mixture_rates(tokens: dict[str, float], weights: dict[str, float],
                  mode: str = "downsample") -> dict[str, float]:
    """How many times each source's blocks are used on average so that its share of the
    training tokens equals its normalized weight.

    downsample: the source with the fewest tokens per unit of weight gets rate 1 and the others
    rates <= 1; upsample: the one with the most gets rate 1 and the others >= 1. A source with
    weight 0 gets rate 0.
    """
    total_w = sum(w for w in weights.values() if w > 0)
    live = {n: tokens.get(n, 0.0) for n, w in weights.items() if w > 0}
    if not live:
        return {n: 0.0 for n in weights}
    if any(t <= 0 for t in live.values()):
        # A source estimated empty: keep everything; the empty-source check will name it.
        return {n: (1.0 if w > 0 else 0.0) for n, w in weights.items()}
    per_weight = {n: live[n] / (weights[n] / total_w) for n in live}
    target = min(per_weight.values()) if mode == "downsample" else max(per_weight.values())
    return {n: (target * (w / total_w) / live[n] if w > 0 else 0.0) for n, w in weights.items()}


def block_copies(rate: float, seed: int, source: str, unit: str, index: int) -> int:
    """How many times block ``index`` of ``unit`` appears in the training stream:
    floor(rate), plus one with probability frac(rate), drawn from a keyed hash."""
    whole = math.floor(rate)
    frac = rate - whole
    if frac <= 0:
        return whole
    return whole + (_unit_float("mix", seed, source, unit, index) < frac)


# --- work units -----------------------------------------------------------------------------------

@dataclass
class Unit:
    """A few shards of one source that one actor reads, tokenizes and packs in one go."""

    source: int            # index in data.sources
    uid: str               # stable id: "<source>/<n>"
    files: list[FileRef]
    passes: int = 1        # upsampling replays the unit; pass k keeps blocks with copies > k
    nbytes: int = 0

    def row(self, p: int) -> dict:
        return {"unit": self.uid, "source": self.source, "pass": p}


def plan_units(src_index: int, src: SourceConfig, files: list[FileRef], seed: int,
               actors: int) -> list[Unit]:
    """Shuffle a source's shards (seeded: sorted dumps are often sorted by topic) and group small
    ones so every unit has enough tokens to pack, while leaving about four units per actor so
    the pool stays balanced."""
    order = sorted(files, key=lambda r: _unit_float("order", seed, src.name, r.path))
    total = sum(r.size for r in order)
    target = min(_UNIT_MAX_BYTES, max(_UNIT_MIN_BYTES, total // max(1, 4 * actors)))
    units, cur, size = [], [], 0
    for ref in order:
        cur.append(ref)
        size += ref.size
        if size >= target:
            units.append(cur)
            cur, size = [], 0
    if cur:
        units.append(cur)
    return [Unit(src_index, f"{src.name}/{k}", u, nbytes=sum(r.size for r in u))
            for k, u in enumerate(units)]


def interleave(units_by_source: list[list[Unit]]) -> list[tuple[Unit, int]]:
    """(unit, pass) work items ordered so that every source progresses at the same relative pace:
    the stream is mixed from its first blocks on, not source after source."""
    items = []
    for units in units_by_source:
        if not units:
            continue
        total = sum(max(1, u.nbytes) for u in units) * max(u.passes for u in units)
        done = 0
        for p in range(max(u.passes for u in units)):
            for u in units:
                if p < u.passes:
                    items.append(((done + max(1, u.nbytes) / 2) / total, u.uid, p, u))
                    done += max(1, u.nbytes)
    items.sort(key=lambda t: (t[0], t[1], t[2]))
    return [(u, p) for _, _, p, u in items]


# --- processing one unit (runs in a Ray Data actor) -----------------------------------------------

def _new_counts() -> dict:
    return {"docs_read": 0, "docs_used": 0, "docs_held_out": 0, "skipped": {}, "examples": {},
            "files": 0, "files_skipped": {}, "tokens": 0, "loss_tokens": 0, "blocks_packed": 0,
            "blocks_emitted": 0, "tail_tokens_dropped": 0, "pad_tokens": 0}


def _skip(counts: dict, reason: str, loc: str, files: bool = False):
    key = "files_skipped" if files else "skipped"
    counts[key][reason] = counts[key].get(reason, 0) + 1
    ex = counts["examples"].setdefault(reason, [])
    if len(ex) < 3:
        ex.append(loc)


def _read_errors() -> tuple:
    import zlib

    import pyarrow as pa

    # What a missing, truncated or corrupt shard raises (not what a bug in llamapro raises).
    return (OSError, EOFError, ValueError, zlib.error, pa.ArrowException)


def _read_guarded(ref: FileRef, src: SourceConfig, max_doc_bytes: int, counts: dict):
    """The documents of one shard; a shard that cannot be opened or breaks off while being read
    is counted as ``unreadable_file`` (its documents read so far are kept)."""
    errors = _read_errors()
    it = _Reader(ref, src, max_doc_bytes).iter_docs()
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except errors as e:
            _skip(counts, "unreadable_file", f"{ref.display}: {type(e).__name__}: {e}"[:300],
                  files=True)
            return
        yield item


def process_unit(unit: Unit, src: SourceConfig, encoder: Encoder, *, seq_len: int, split: str,
                 seed: int, rate: float, pass_index: int, max_doc_bytes: int,
                 counts: dict) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Read, split, tokenize and pack one unit; yield (ids, labels) arrays of kept blocks.

    Pure except for reading the shards: the same unit always gives the same blocks. ``counts``
    is filled in as a side effect (documents, skips with reasons, tokens, blocks).
    """
    packer = Packer(seq_len)
    block_index = 0
    pending_docs: list = []
    pending_bytes = 0
    out_ids: list[np.ndarray] = []
    out_labels: list[np.ndarray] = []
    out_tokens = 0

    def flush_docs():
        nonlocal pending_docs, pending_bytes
        if not pending_docs:
            return
        if src.kind == "text":
            for ids in encoder.encode_texts([d for d, _ in pending_docs]):
                packer.add(ids)
                counts["tokens"] += len(ids)
                counts["loss_tokens"] += len(ids)
                counts["docs_used"] += 1
        else:
            for res, (_, loc) in zip(encoder.encode_chats([d for d, _ in pending_docs]),
                                     pending_docs):
                if isinstance(res, str):
                    _skip(counts, res, loc)
                    continue
                ids, labels = res
                packer.add(ids, labels)
                counts["tokens"] += len(ids)
                counts["loss_tokens"] += int((labels != IGNORE_INDEX).sum())
                counts["docs_used"] += 1
        pending_docs, pending_bytes = [], 0

    def take_blocks():
        nonlocal block_index, out_tokens
        ids, labels = packer.pop_blocks()
        if not len(ids):
            return
        counts["blocks_packed"] += len(ids)
        keep = []
        for i in range(len(ids)):
            copies = 1 if split == "eval" else block_copies(rate, seed, src.name, unit.uid,
                                                             block_index)
            block_index += 1
            if copies > pass_index:
                keep.append(i)
        if keep:
            sel = np.asarray(keep)
            out_ids.append(ids[sel])
            out_labels.append(labels[sel])
            out_tokens += len(sel) * seq_len
            counts["blocks_emitted"] += len(sel)

    def drain():
        nonlocal out_ids, out_labels, out_tokens
        if out_ids:
            res = (np.concatenate(out_ids), np.concatenate(out_labels))
            out_ids, out_labels, out_tokens = [], [], 0
            return res
        return None

    for ref in unit.files:
        counts["files"] += 1
        for doc, reason, loc in _read_guarded(ref, src, max_doc_bytes, counts):
            counts["docs_read"] += 1
            if doc is None:
                _skip(counts, reason, loc)
                continue
            held = is_held_out(doc_key(doc), seed, src.eval_fraction)
            if held:
                counts["docs_held_out"] += 1
            if held != (split == "eval"):
                continue
            pending_docs.append((doc, loc))
            pending_bytes += len(doc) if isinstance(doc, str) else 256
            if len(pending_docs) >= _TOKENIZE_DOCS or pending_bytes >= _TOKENIZE_BYTES:
                flush_docs()
                take_blocks()
                if out_tokens >= _YIELD_TOKENS:
                    yield drain()
    flush_docs()
    take_blocks()
    if split == "eval":
        padded = packer.pending
        last = packer.pad_tail(encoder.pad)
        if last is not None:
            counts["pad_tokens"] += seq_len - padded
            counts["blocks_packed"] += 1
            counts["blocks_emitted"] += 1
            out_ids.append(last[0])
            out_labels.append(last[1])
    else:
        counts["tail_tokens_dropped"] += packer.tail()
    res = drain()
    if res is not None:
        yield res


# --- skip budget ----------------------------------------------------------------------------------

def merge_counts(parts) -> dict:
    total = _new_counts()
    for c in parts:
        for k, v in c.items():
            if k in ("skipped", "files_skipped"):
                for r, n in v.items():
                    total[k][r] = total[k].get(r, 0) + n
            elif k == "examples":
                for r, ex in v.items():
                    have = total[k].setdefault(r, [])
                    have.extend(ex[: max(0, 3 - len(have))])
            else:
                total[k] += v
    return total


def _reasons(counts: dict) -> str:
    parts = []
    for key in ("skipped", "files_skipped"):
        for r, n in sorted(counts[key].items(), key=lambda kv: -kv[1]):
            ex = counts["examples"].get(r) or []
            unit = " files" if key == "files_skipped" else ""
            parts.append(f"{r} {n}{unit}" + (f" (e.g. {ex[0]})" if ex else ""))
    return "; ".join(parts) or "nothing skipped"


def check_source(name: str, counts: dict, *, files_total: int, max_skip_fraction: float,
                 seq_len: int, split: str = "train") -> str | None:
    """The verdict on a fully read source: None if it can feed a run, else why not."""
    skipped = sum(counts["skipped"].values())
    bad_files = sum(counts["files_skipped"].values())
    seen = counts["docs_read"]
    if counts["docs_used"] == 0:
        what = "training" if split == "train" else "held-out"
        held = (f", {counts['docs_held_out']} held out for evaluation"
                if split == "train" and counts["docs_held_out"] else "")
        return (f"source {name!r} yielded no {what} documents: read {seen} from "
                f"{files_total} files, skipped {skipped}{held} ({_reasons(counts)})")
    if counts["blocks_packed"] == 0:
        return (f"source {name!r} yielded no full block: {counts['docs_used']} documents hold "
                f"{counts['tokens']} tokens, fewer than data.seq_len={seq_len} per work unit; "
                "lower data.seq_len or add data")
    doc_share = skipped / max(1, seen)
    file_share = bad_files / max(1, files_total)
    if doc_share > max_skip_fraction or file_share > max_skip_fraction:
        return (f"source {name!r} skipped {skipped} of {seen} documents ({doc_share:.1%}) and "
                f"{bad_files} of {files_total} files ({file_share:.1%}), over "
                f"data.max_skip_fraction={max_skip_fraction:g}: {_reasons(counts)}")
    return None


class _Stats:
    """Collects per-unit counts (a Ray actor). Keyed by unit and pass, so a re-run epoch or a
    retried task replaces its counts instead of adding to them."""

    def __init__(self, files_per_source: dict[int, int], units_per_source: dict[int, int]):
        self.files = files_per_source
        self.units = units_per_source
        self.by_unit: dict[tuple, dict] = {}

    def report(self, source: int, uid: str, pass_index: int, counts: dict):
        self.by_unit[(source, uid, pass_index)] = counts
        return self.totals(source)

    def totals(self, source: int):
        """(reading counts of pass 0, blocks emitted by all passes, every unit read?)."""
        first = [c for (s, _, p), c in self.by_unit.items() if s == source and p == 0]
        total = merge_counts(first)
        total["blocks_emitted"] = sum(c["blocks_emitted"] for (s, _, _), c in self.by_unit.items()
                                      if s == source)
        return total, len(first) >= self.units.get(source, 0)

    def snapshot(self):
        return {s: self.totals(s)[0] for s in self.units}


class _UnitProcessor:
    """The Ray Data actor: owns a tokenizer, turns one work unit per call into packed blocks."""

    def __init__(self, tokenizer, sources: list[SourceConfig], units: dict[str, Unit], *,
                 seq_len: int, split: str, seed: int, rates: dict[str, float], max_doc_bytes: int,
                 max_skip_fraction: float, stats, enforce: bool):
        self.encoder = Encoder(tokenizer)
        self.sources, self.units = sources, units
        self.seq_len, self.split, self.seed, self.rates = seq_len, split, seed, rates
        self.max_doc_bytes, self.max_skip = max_doc_bytes, max_skip_fraction
        self.stats, self.enforce = stats, enforce
        self.files_per_source: dict[int, int] = {}
        for u in units.values():
            self.files_per_source[u.source] = self.files_per_source.get(u.source, 0) + len(u.files)

    def __call__(self, batch: dict) -> Iterator[dict]:
        import ray

        for uid, p in zip(batch["unit"], batch["pass"]):
            unit = self.units[str(uid)]
            src = self.sources[unit.source]
            counts = _new_counts()
            for ids, labels in process_unit(
                    unit, src, self.encoder, seq_len=self.seq_len, split=self.split,
                    seed=self.seed, rate=self.rates.get(src.name, 1.0), pass_index=int(p),
                    max_doc_bytes=self.max_doc_bytes, counts=counts):
                yield {"input_ids": ids, "labels": labels,
                       "source": np.full(len(ids), unit.source, dtype=np.int32)}
            totals, complete = ray.get(self.stats.report.remote(unit.source, unit.uid, int(p),
                                                                counts))
            if self.enforce and complete:
                problem = check_source(src.name, totals,
                                       files_total=self.files_per_source[unit.source],
                                       max_skip_fraction=self.max_skip, seq_len=self.seq_len,
                                       split=self.split)
                if problem:
                    raise DataError(problem)


# --- building datasets ----------------------------------------------------------------------------

def load_tokenizer(tokenizer) -> TokenizerBundle:
    """A model directory or hub id (loaded with AutoTokenizer), a loaded fast tokenizer, or a
    bundle; checked here on the driver, so an unusable tokenizer fails before any actor starts."""
    if isinstance(tokenizer, TokenizerBundle):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    return TokenizerBundle(tokenizer)


def estimate_tokens(src: SourceConfig, units: list[Unit], encoder: Encoder, *, seed: int,
                    split: str = "train", max_doc_bytes: int = 16 << 20,
                    sample_bytes: int = _ESTIMATE_BYTES) -> float:
    """Tokens the source will contribute to ``split``, extrapolated from a sample: per storage
    format (compression differs), tokens per stored byte on the first shards of the shuffled
    units, times the source's stored bytes in that format."""
    files = [r for u in units for r in u.files]
    estimate = 0.0
    for fmt in sorted({r.format for r in files}):
        group = [r for r in files if r.format == fmt]
        seen_bytes, tokens = 0.0, 0
        for ref in group[:_ESTIMATE_FILES]:
            reader = _Reader(ref, src, max_doc_bytes)
            batch = []
            try:
                for doc, _, _ in reader.iter_docs():
                    if doc is not None and is_held_out(doc_key(doc), seed,
                                                       src.eval_fraction) == (split == "eval"):
                        batch.append(doc)
                    if len(batch) >= _TOKENIZE_DOCS:
                        tokens += _count_tokens(encoder, src, batch)
                        batch = []
                        if reader.fraction * ref.size >= sample_bytes:
                            break
            except _read_errors():
                pass  # an unreadable shard; the pipeline will count it
            tokens += _count_tokens(encoder, src, batch)
            seen_bytes += reader.fraction * ref.size
            if seen_bytes >= sample_bytes:
                break
        if seen_bytes > 0:
            estimate += tokens / seen_bytes * sum(r.size for r in group)
    return estimate


def _count_tokens(encoder: Encoder, src: SourceConfig, docs) -> int:
    if not docs:
        return 0
    if src.kind == "text":
        return sum(len(x) for x in encoder.encode_texts(docs))
    return sum(len(r[0]) for r in encoder.encode_chats(docs) if not isinstance(r, str))


@dataclass
class Plan:
    """What a dataset will read: resolved shards, units, rates and the stats actor."""

    cfg: DataConfig
    split: str
    source_indices: list[int]
    files: dict[int, list[FileRef]] = field(default_factory=dict)
    units: dict[int, list[Unit]] = field(default_factory=dict)
    estimates: dict[str, float] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    stats: Any = None


def _build(cfg: DataConfig, tokenizer_path, split: str, names: list[str] | None,
           enforce: bool, max_files: int | None = None):
    import ray

    if not cfg.sources:
        raise ConfigError("data.sources is empty: configure at least one source")
    if split == "train":
        indices = [i for i, s in enumerate(cfg.sources)
                   if s.weight > 0 or (names is not None and s.name in names)]
    else:
        indices = [cfg.source_names().index(n) for n in names]
    plan = Plan(cfg, split, indices)
    tok = load_tokenizer(tokenizer_path)
    for i in indices:
        src = cfg.sources[i]
        files = resolve_paths(src.paths, src.format, f"data.sources[{i}] ({src.name})")
        if max_files:
            files = files[:max_files]
        plan.files[i] = files
        plan.units[i] = plan_units(i, src, files, cfg.seed, cfg.actors)

    weights = {cfg.sources[i].name: cfg.sources[i].weight for i in indices}
    if split == "train" and sum(1 for w in weights.values() if w > 0) > 1:
        enc = Encoder(tok)
        for i in indices:
            src = cfg.sources[i]
            if src.weight > 0:
                plan.estimates[src.name] = estimate_tokens(
                    src, plan.units[i], enc, seed=cfg.seed, max_doc_bytes=cfg.max_doc_bytes)
        plan.rates = mixture_rates(plan.estimates, weights, cfg.mixing)
    else:
        plan.rates = {n: (1.0 if (w > 0 or split == "eval") else 0.0) for n, w in weights.items()}
    for i in indices:
        name = cfg.sources[i].name
        passes = max(1, math.ceil(plan.rates[name] - 1e-9))
        for u in plan.units[i]:
            u.passes = passes
        log.info("data %s source %s: %d files in %d units, estimated %.0f tokens, rate %.3f",
                 split, name, len(plan.files[i]), len(plan.units[i]),
                 plan.estimates.get(name, float("nan")), plan.rates[name])

    work = interleave([plan.units[i] for i in indices])
    by_uid = {u.uid: u for i in indices for u in plan.units[i]}
    # Pinned (hard) to the node of the process building the dataset, which lives as long as the
    # job does: a 0-CPU actor may otherwise land on any node, and losing that node would kill it
    # (it holds state, so it is not restarted) and with it every later unit, in every restarted
    # worker group. A soft pin was seen to spill over to a worker node while the head was busy
    # starting processes.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    stats_cls = ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False))(_Stats)
    plan.stats = stats_cls.remote({i: len(plan.files[i]) for i in indices},
                                  {i: len(plan.units[i]) for i in indices})
    rows = [u.row(p) for u, p in work]
    pool = min(cfg.actors, max(1, len(rows)))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    ds = ds.map_batches(
        _UnitProcessor,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool, initial_size=pool),
        num_cpus=cfg.cpus_per_actor,
        **({"resources": dict(cfg.actor_resources)} if cfg.actor_resources else {}),
        fn_constructor_kwargs=dict(
            tokenizer=tok, sources=cfg.sources, units=by_uid, seq_len=cfg.seq_len, split=split,
            seed=cfg.seed, rates=plan.rates, max_doc_bytes=cfg.max_doc_bytes,
            max_skip_fraction=cfg.max_skip_fraction, stats=plan.stats, enforce=enforce),
    )
    # This dataset's own context (from_items copied the global one): by default an actor buffers
    # up to 128 MB of output per call before emitting a block, so memory would grow with the
    # size of a work unit; small blocks keep it flat and get the first blocks out early.
    ds.context.target_max_block_size = _BLOCK_BYTES
    if cfg.preserve_order:
        ds.context.execution_options.preserve_order = True
    return ds, plan, tok


def build_train_dataset(cfg: DataConfig, tokenizer_path) -> "ray.data.Dataset":  # noqa: F821
    """The training stream: rows ``input_ids`` and ``labels`` (int64, length ``cfg.seq_len``;
    labels -100 where no loss is taken) and ``source`` (int32 index into ``cfg.sources``).

    Lazy: nothing is read until a consumer iterates; each epoch re-runs the pipeline and yields
    the same set of blocks. Raises DataPathError now for a path that matches nothing, and
    DataError during iteration when a source yields nothing or breaks the skip budget.
    ``tokenizer_path`` is a model directory/hub id, or an already loaded fast tokenizer.
    """
    ds, _, _ = _build(cfg, tokenizer_path, "train", None, enforce=True)
    return ds


def build_eval_dataset(cfg: DataConfig, tokenizer_path,
                       source_name: str) -> "ray.data.Dataset":  # noqa: F821
    """Held-out blocks of one source (same columns as training; the last block of each work unit
    is padded with labels -100, so every held-out token is scored exactly once)."""
    src = cfg.source(source_name)
    if src.eval_fraction <= 0:
        raise ConfigError(f"data source {source_name!r} has eval_fraction 0: it holds nothing out")
    ds, _, _ = _build(cfg, tokenizer_path, "eval", [source_name], enforce=True)
    return ds


def preview(cfg: DataConfig, tokenizer_path, max_files: int | None = None) -> dict:
    """Run the training pipeline once over every configured source and report what it saw.

    Returns a JSON-able dict: per source the documents read, skipped (by reason, with examples),
    held out, used, tokens, blocks packed and kept in the mixture, its target and actual share and
    a verdict; the stream's first block decoded; and ``ok`` (whether a training run would pass).
    ``max_files`` limits the shards read per source (a quick look at a huge corpus).
    """
    ds, plan, tok = _build(cfg, tokenizer_path, "train", cfg.source_names(), enforce=False,
                           max_files=max_files)
    import ray

    blocks: dict[int, int] = {}
    first = None
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        if first is None and len(batch["source"]):
            first = (int(batch["source"][0]), batch["input_ids"][0], batch["labels"][0])
        for s, n in zip(*np.unique(batch["source"], return_counts=True)):
            blocks[int(s)] = blocks.get(int(s), 0) + int(n)
    snap = ray.get(plan.stats.snapshot.remote())
    total_blocks = sum(blocks.values())
    total_w = sum(s.weight for s in cfg.sources)
    report = {"seq_len": cfg.seq_len, "seed": cfg.seed, "mixing": cfg.mixing,
              "max_skip_fraction": cfg.max_skip_fraction, "sources": [], "errors": [],
              "warnings": []}
    for i in plan.source_indices:
        src, c = cfg.sources[i], snap.get(i) or _new_counts()
        if src.weight > 0:
            problem = check_source(src.name, c, files_total=len(plan.files[i]),
                                   max_skip_fraction=cfg.max_skip_fraction, seq_len=cfg.seq_len)
        else:  # evaluation-only: judged by what it holds out (its blocks are not in the mix)
            problem = check_source(src.name, {**c, "docs_used": c["docs_held_out"],
                                              "blocks_packed": 1},
                                   files_total=len(plan.files[i]),
                                   max_skip_fraction=cfg.max_skip_fraction, seq_len=cfg.seq_len,
                                   split="eval")
        if problem:
            report["errors"].append(problem)
        if src.eval_fraction > 0 and c["docs_read"] and not c["docs_held_out"]:
            report["warnings"].append(
                f"source {src.name!r}: eval_fraction={src.eval_fraction:g} held out none of its "
                f"{c['docs_read']} documents; build_eval_dataset({src.name!r}) will fail")
        report["sources"].append({
            "name": src.name, "index": i, "kind": src.kind, "files": len(plan.files[i]),
            "units": len(plan.units[i]), "weight": src.weight,
            "target_share": src.weight / total_w if total_w else 0.0,
            "estimated_tokens": round(plan.estimates.get(src.name, 0.0)),
            "rate": plan.rates.get(src.name, 0.0),
            "docs_read": c["docs_read"], "docs_skipped": sum(c["skipped"].values()),
            "skipped": c["skipped"], "files_skipped": c["files_skipped"],
            "skip_examples": c["examples"], "docs_held_out": c["docs_held_out"],
            "docs_used": c["docs_used"], "tokens": c["tokens"], "loss_tokens": c["loss_tokens"],
            "blocks_packed": c["blocks_packed"], "blocks_in_mix": blocks.get(i, 0),
            "share": blocks.get(i, 0) / total_blocks if total_blocks else 0.0,
            "tail_tokens_dropped": c["tail_tokens_dropped"],
            "status": problem or "ok",
        })
    report["total_blocks"] = total_blocks
    report["total_tokens"] = total_blocks * cfg.seq_len
    if first is not None:
        s, ids, labels = first
        report["first_block"] = {
            "source": cfg.sources[s].name, "tokens": int(len(ids)),
            "loss_tokens": int((labels != IGNORE_INDEX).sum()),
            "text": tok.decode(ids)}
    else:
        report["first_block"] = None
    report["ok"] = not report["errors"] and total_blocks > 0
    return report
