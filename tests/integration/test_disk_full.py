"""The fault catalogue's last training row: the disk fills up while a checkpoint is being written.

Simulated with a file-size limit in the Train worker (``RLIMIT_FSIZE``, with ``SIGXFSZ`` ignored: a
write past the limit then fails with EFBIG, the way a full disk fails it with ENOSPC), set by the
worker itself just before it writes the checkpoint of step 6 (through ``report_metrics``, which
every worker calls there), once step 4's is registered. The run must fail with one clear error
that names the full disk (not DeepSpeed's traceback), leave nothing of the half-written checkpoint
that a later run could take for a good one (no temporary left, nothing registered), and a rerun
under the same name must resume from step 4's checkpoint exactly as the uninterrupted run went on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llamapro.config.train import TrainConfig
from llamapro.errors import TrainingError
from llamapro.training import run_training
from tests.integration.training_helpers import (
    SEQ,
    ZERO3,
    assert_resumed_exactly,
    data,
    events,
    registered_steps,
)

pytestmark = pytest.mark.integration


def _disk_full_at_checkpoint(step: int, storage: Path, registered: int, limit: int, tmpdir: Path):
    """A ``report_metrics`` hook: the worker's checkpoint temporaries go to ``tmpdir`` (so the test
    can see what is left), and about to write the checkpoint of ``step`` (once step
    ``registered``'s is registered) no file of this process may grow past ``limit`` bytes."""

    def hook(metrics: dict) -> dict:
        import ctypes
        import json
        import resource
        import signal
        import tempfile
        import time

        tempfile.tempdir = str(tmpdir)
        if metrics.get("step") != step:
            return {}
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                snap = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
                if registered in [r["metrics"]["step"] for r in snap["checkpoint_results"]]:
                    break
            except (FileNotFoundError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        # process-wide (the train loop is not Python's main thread, where signal.signal works):
        # a write past the limit fails with EFBIG instead of killing the process
        libc = ctypes.CDLL(None)
        libc.signal.argtypes, libc.signal.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
        libc.signal(int(signal.SIGXFSZ), ctypes.c_void_p(1))  # SIG_IGN
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return {}

    return hook


def _run(ray, expanded: Path, run: Path, **kw):
    ds, ev = data(ray, ordered=True)
    return run_training(TrainConfig(**ZERO3), str(expanded / "exp"), str(run), ds, ev, seq_len=SEQ,
                        name="diskfull", storage_path=str(run / "ray"), **kw)


def test_disk_full_at_a_checkpoint_is_named_and_the_previous_checkpoint_resumes(
        ray_start_4_cpus, expanded, zero3_reference, tmp_path):
    run, tmpdir = expanded / "diskfull", tmp_path / "worker-tmp"
    tmpdir.mkdir()
    # half the largest file of the reference's step-6 checkpoint: that checkpoint cannot be written
    storage = zero3_reference / "ray" / zero3_reference.name
    largest = max(p.stat().st_size for p in storage.glob("checkpoint_*/**/*.pt"))
    hook = _disk_full_at_checkpoint(6, run / "ray" / "diskfull", registered=4, limit=largest // 2, tmpdir=tmpdir)

    with pytest.raises(TrainingError) as e:
        _run(ray_start_4_cpus, expanded, run, report_metrics=hook)
    msg = str(e.value)
    assert "worker 0:" in msg and "disk full" in msg and "checkpoint of step 6" in msg, msg
    assert "Traceback" not in msg and "resumes" in msg
    # nothing of the half-written checkpoint is left to take for a good one: its temporary is
    # gone, Ray Train registered none but steps 2 and 4, and no other checkpoint was stored
    assert not list(tmpdir.iterdir())
    assert registered_steps(run / "ray" / "diskfull") == [2, 4]
    assert len([p for p in (run / "ray" / "diskfull").glob("checkpoint_*") if p.is_dir()]) == 2
    assert not (run / "model").exists()

    # space freed (a fresh worker has no limit): the same command resumes from step 4's checkpoint
    res = _run(ray_start_4_cpus, expanded, run)
    assert res.error is None and res.metrics["final"]
    assert not events(run, "checkpoint_rejected")
    assert_resumed_exactly(zero3_reference, run, 4)
