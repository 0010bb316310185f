"""Append-only JSON-lines logs (``metrics.jsonl``, ``scheduler_stops.jsonl``) that survive a full
disk and a kill without losing the records around the failure.

``append_record`` writes one record as one line: a write that fails part-way (ENOSPC, EFBIG) is cut
back to where the file ended, so no half line is left to fuse with the next record; a torn last
line that a killed writer left behind is closed with a newline first, so it stays a line of its
own. ``read_records`` skips what cannot be parsed (such torn lines), never the records around it.
One writer per file (rank 0, the Tune driver): the cut-back assumes nobody appended meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def append_record(path, rec: dict, **dumps_kw) -> None:
    """Append ``rec`` as one JSON line to ``path`` (created if missing), all or nothing."""
    data = (json.dumps(rec, **dumps_kw) + "\n").encode()
    if b"\n" in data[:-1]:
        raise ValueError("dumps_kw must keep a record on one line (no indent)")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # a killed writer's torn line: keep it apart from this record
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.ftruncate(fd, size)  # no partial line stays behind
            raise
    finally:
        os.close(fd)


def read_records(path) -> list[dict]:
    """Every record of a JSON-lines file; lines that do not parse as a JSON object (a torn line
    from a killed writer) are skipped, and counted in a warning unless it is only the last one."""
    p = Path(path)
    if not p.is_file():
        return []
    out, bad = [], []
    lines = p.read_bytes().split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        else:
            bad.append(i + 1)
    if bad and bad != [len(lines)]:  # a torn final line is what a kill leaves: expected
        log.warning("%s: skipped %d unreadable line(s) (%s)", p, len(bad), bad[:5])
    return out
