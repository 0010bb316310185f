"""The held-out split: which documents are kept for evaluation, by a keyed hash of their content."""

from __future__ import annotations

import hashlib
import json


def doc_key(doc) -> str:
    """The content a document is identified by (for the split): its text, or its turns as JSON."""
    if isinstance(doc, str):
        return doc
    return json.dumps(doc, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


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
