"""Work units: a source's shards shuffled (seeded) and grouped into units one actor processes in one
go, and the order in which the units of all sources are streamed."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from llamapro.config import SourceConfig
from llamapro.data.sources import FileRef

_UNIT_MAX_BYTES = 64 << 20  # a work unit groups small shards up to about this size ...
_UNIT_MIN_BYTES = 256 << 10  # ... and down to this (tiny files would each lose a tail)


def unit_float(*parts) -> float:
    """A uniform number in [0, 1) that is a pure function of ``parts``."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(str(p).encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
    return int.from_bytes(h.digest(), "big") / 2.0 ** 64


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
    order = sorted(files, key=lambda r: unit_float("order", seed, src.name, r.path))
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
