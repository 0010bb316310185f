"""The mixture: per-source rates that make each source's share of training tokens match its weight
(from token counts estimated on a sample), and how many copies of each block the stream keeps."""

from __future__ import annotations

import math

from llamapro.config import SourceConfig
from llamapro.data.sources import Reader, read_errors
from llamapro.data.split import doc_key, is_held_out
from llamapro.data.tokens import TOKENIZE_DOCS, Encoder
from llamapro.data.units import Unit, unit_float

_ESTIMATE_BYTES = 2 << 20  # raw bytes sampled per source to estimate its size in tokens
_ESTIMATE_FILES = 3


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
    return whole + (unit_float("mix", seed, source, unit, index) < frac)


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
            reader = Reader(ref, src, max_doc_bytes)
            batch = []
            try:
                for doc, _, _ in reader.iter_docs():
                    if doc is not None and is_held_out(doc_key(doc), seed,
                                                       src.eval_fraction) == (split == "eval"):
                        batch.append(doc)
                    if len(batch) >= TOKENIZE_DOCS:
                        tokens += _count_tokens(encoder, src, batch)
                        batch = []
                        if reader.fraction * ref.size >= sample_bytes:
                            break
            except read_errors():
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
