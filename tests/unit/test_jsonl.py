"""Metrics logs that a full disk or a kill cannot corrupt (llamapro.jsonl)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamapro.jsonl import append_record, read_records

REPO = Path(__file__).resolve().parents[2]

# Appends records of ~200 bytes until the file-size limit (RLIMIT_FSIZE, the way a full disk
# answers: EFBIG instead of ENOSPC) stops one part-way; prints how many made it.
_FILL = """
import json, os, resource, sys
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
path, how = sys.argv[1], sys.argv[2]
n = 0
try:
    while True:
        rec = {"event": "step", "step": n, "pad": "x" * 180}
        if how == "ours":
            from llamapro.jsonl import append_record
            append_record(path, rec)
        else:  # what train.py's log() did
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\\n")
        n += 1
except OSError as e:
    print(n, e.errno)
"""


def _fill(path, how, limit=4000):
    r = subprocess.run([sys.executable, "-c", _FILL, str(path), how, str(limit)], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr
    n, err = map(int, r.stdout.split())
    assert err == errno.EFBIG, f"the size limit was not what stopped the writer (errno {err})"
    return n


def test_disk_full_leaves_no_half_line_to_merge_with_the_next_record(tmp_path):
    # before: the failed write leaves half a record; the next record (disk space freed, or the
    # run resumed) lands on the same line and both are lost
    naive = tmp_path / "naive.jsonl"
    n = _fill(naive, "naive")
    assert not naive.read_bytes().endswith(b"\n")
    with open(naive, "a") as f:
        f.write(json.dumps({"event": "resume"}) + "\n")
    assert [r["step"] for r in read_records(naive) if "step" in r] == list(range(n))
    assert {"event": "resume"} not in read_records(naive)  # merged into the torn line: lost
    # after: the failed append is cut back; every record before it and after it reads back
    ours = tmp_path / "metrics.jsonl"
    n = _fill(ours, "ours")
    assert n > 0 and ours.read_bytes().endswith(b"\n")
    append_record(ours, {"event": "resume"})
    recs = read_records(ours)
    assert [r["step"] for r in recs[:-1]] == list(range(n)) and recs[-1] == {"event": "resume"}


def test_a_killed_writers_torn_line_stays_apart(tmp_path, caplog):
    p = tmp_path / "metrics.jsonl"
    append_record(p, {"step": 1})
    with open(p, "ab") as f:
        f.write(b'{"step": 2, "lo')  # the writer was killed mid-line
    assert read_records(p) == [{"step": 1}]  # a torn last line: skipped quietly
    assert not caplog.records
    append_record(p, {"step": 3})
    assert read_records(p) == [{"step": 1}, {"step": 3}]
    assert "skipped 1 unreadable line(s) ([2])" in caplog.text  # now in the middle: said
    with pytest.raises(ValueError, match="one line"):
        append_record(p, {"a": 1}, indent=2)


def test_a_real_full_disk(tmp_path):
    """ENOSPC from a 64 KiB tmpfs (needs mount rights; RLIMIT_FSIZE above covers the rest)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    try:
        p = mnt / "metrics.jsonl"
        n = 0
        with pytest.raises(OSError) as e:
            while True:
                append_record(p, {"step": n, "pad": "x" * 1000})
                n += 1
        assert e.value.errno == errno.ENOSPC
        assert [r["step"] for r in read_records(p)] == list(range(n))
        assert p.read_bytes().endswith(b"\n")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
