"""One work unit into packed blocks: read its shards, split off held-out documents, tokenize,
pack, and keep each block as many times as the mixture says (the same unit gives the same blocks).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from llamapro.config import SourceConfig
from llamapro.data.counts import record_skip
from llamapro.data.mixture import block_copies
from llamapro.data.sources import FileRef, Reader, read_errors
from llamapro.data.split import doc_key, is_held_out
from llamapro.data.tokens import IGNORE_INDEX, TOKENIZE_BYTES, TOKENIZE_DOCS, Encoder, Packer
from llamapro.data.units import Unit

_YIELD_TOKENS = 1 << 18   # packed tokens per output batch of a work unit (4 MB of int64 pairs)


def read_guarded(ref: FileRef, src: SourceConfig, max_doc_bytes: int, counts: dict):
    """The documents of one shard; a shard that cannot be opened or breaks off while being read
    is counted as ``unreadable_file`` (its documents read so far are kept)."""
    errors = read_errors()
    it = Reader(ref, src, max_doc_bytes).iter_docs()
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except errors as e:
            record_skip(counts, "unreadable_file", f"{ref.display}: {type(e).__name__}: {e}"[:300],
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
                    record_skip(counts, res, loc)
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
        for doc, reason, loc in read_guarded(ref, src, max_doc_bytes, counts):
            counts["docs_read"] += 1
            if doc is None:
                record_skip(counts, reason, loc)
                continue
            held = is_held_out(doc_key(doc), seed, src.eval_fraction)
            if held:
                counts["docs_held_out"] += 1
            if held != (split == "eval"):
                continue
            pending_docs.append((doc, loc))
            pending_bytes += len(doc) if isinstance(doc, str) else 256
            if len(pending_docs) >= TOKENIZE_DOCS or pending_bytes >= TOKENIZE_BYTES:
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
