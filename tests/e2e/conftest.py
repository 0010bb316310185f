"""The e2e tier's one SmolLM2 training run.

Training the real SmolLM2-135M-Instruct (Ray Train + DeepSpeed, 2 workers) is the slowest thing the
e2e tests do, so it happens once per session: ``quick_run`` is ``llamapro run --quick`` on the demo
config (expand + proof, train, eval + gate + report, export, pack, fuse at alpha 0.5, serve) and
every test that needs a trained run reads that run directory: test_pipeline_quick.py (each step's
artifacts) and test_eval_smollm2.py (the evaluation's numbers, the report, `llamapro export` +
`llamapro strip`, `llamapro fuse --alpha auto`). Tests that write leave the run directory as the
pipeline left it (they write to their own tmp_path, or to a view of the run; see
test_eval_smollm2.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# what the fixture adds to `--quick` (llamapro.pipeline.QUICK): the optional fuse step, with a
# fixed strength (alpha auto is tested on this run by test_eval_smollm2.py, and on tiny models)
QUICK_RUN_OVERRIDES = ["fuse.enabled=true", "fuse.method=weighted", "fuse.alpha=0.5"]


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """``(run directory, CompletedProcess)`` of ``llamapro run --quick`` on jobs/configs/demo.yaml."""
    out = tmp_path_factory.mktemp("pipeline")
    r = subprocess.run([sys.executable, "-m", "llamapro.cli", "run", "--config",
                        str(ROOT / "jobs/configs/demo.yaml"), "--quick", f"run.output_dir={out}",
                        "run.name=quick", *QUICK_RUN_OVERRIDES],
                       capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert r.returncode in (0, 4), r.stdout[-3000:] + r.stderr[-3000:]  # 4: the gate failed (checked in the tests)
    for step in ("[1/7]", "[2/7]", "[4/7]", "[5/7]", "[6/7]", "[7/7]"):
        assert step in r.stdout  # progress for each step
    return out / "quick", r
