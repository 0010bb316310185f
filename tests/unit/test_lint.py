"""ruff (pyproject's [tool.ruff]: pycodestyle, pyflakes, line length 120) finds nothing in
llamapro/, tests/, jobs/ and benchmarks/. ruff is in the dev extras (scripts/setup.sh installs it)."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PATHS = ["llamapro", "tests", "jobs", "benchmarks"]


def _ruff() -> list[str]:
    exe = Path(sys.executable).parent / "ruff"
    if exe.is_file():
        return [str(exe)]
    if shutil.which("ruff"):
        return ["ruff"]
    return [sys.executable, "-m", "ruff"]


def test_ruff_finds_nothing():
    try:
        r = subprocess.run([*_ruff(), "check", "--no-cache", "--output-format", "concise", *PATHS],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        r = None
    assert r is not None and "No module named ruff" not in r.stderr, \
        "ruff is not installed: bash scripts/setup.sh (or pip install -e '.[dev]')"
    assert r.returncode == 0, f"ruff findings (fix them, or `ruff check --fix` for the [*] ones):\n{r.stdout}{r.stderr}"
