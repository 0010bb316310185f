"""The Python API (``import llamapro``): cheap to import, every function documented, and README's
Python example runs exactly as printed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STEPS = ["expand", "verify", "strip", "train", "evaluate", "export", "fuse", "pack", "apply", "run"]


def _python(code: str, cwd=REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_import_is_cheap_and_every_step_is_documented():
    r = _python(
        "import sys, llamapro\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'transformers', 'deepspeed', 'numpy') if m in sys.modules)\n"
        "ours = sorted(m for m in sys.modules if m.startswith('llamapro.'))\n"
        "print(heavy, ours)\n"
        f"for name in {STEPS!r}:\n"
        "    fn = getattr(llamapro, name)\n"
        "    assert callable(fn), name\n"
        "    doc = fn.__doc__\n"
        "    assert doc and len(doc.split()) > 15, name\n"
        "print(llamapro.LlamaproError.__name__, llamapro.IdentityError.exit_code, llamapro.GateFailed.exit_code)\n"
        "import llamapro.expansion.api, llamapro.training.stages\n"  # importing the steps' packages
        "assert llamapro.expand.__module__ == 'llamapro' and llamapro.train.__module__ == 'llamapro'\n"
        "assert llamapro.expansion.api.__name__ == 'llamapro.expansion.api'\n"
        "assert llamapro.training.stages.__name__ == 'llamapro.training.stages'\n")
    assert r.returncode == 0, r.stderr[-3000:]
    first, second = r.stdout.splitlines()[:2]
    assert first == "[] []", f"`import llamapro` imported {first}"
    assert second == "LlamaproError 3 4"


def readme_python_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"^```python\n(.*?)^```", section, re.M | re.S).group(1)


def test_readme_python_example_runs(tmp_path):
    code = readme_python_example()
    assert "llamapro.expand(" in code and "llamapro.verify(" in code and "llamapro.strip(" in code
    r = _python(code, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    printed = re.search(r"^print\(.*\)\s+#\s*(.+)$", code, re.M).group(1)  # what README says it prints
    assert r.stdout.strip().splitlines()[-1] == printed
    assert (tmp_path / "tiny-again" / "config.json").is_file()


def test_publish_functions_on_a_run(tmp_path):
    """export, fuse, pack and apply from Python give what their commands give."""
    import llamapro
    from llamapro.tensors import content_digest
    from tests.unit.eval_support import make_run

    run = make_run(tmp_path, "run", perturb=0.02)
    exp = llamapro.export(run, tmp_path / "export")
    assert exp["num_layers"] == 6 and (tmp_path / "export" / "README.md").is_file()
    fz = llamapro.fuse(run, tmp_path / "fused", method="weighted", alpha=1.0)
    assert fz["fusion"]["alpha"] == 1.0
    assert content_digest(tmp_path / "fused") == content_digest(tmp_path / "export")  # alpha 1: as trained
    pk = llamapro.pack(run, tmp_path / "pack")
    assert pk["positions"] == json.loads((run / "model" / "llamapro.json").read_text())["new_layer_indices"]
    applied = llamapro.apply(tmp_path / "base", tmp_path / "pack", tmp_path / "applied")
    assert applied["num_layers"] == 6
    assert content_digest(tmp_path / "applied") == content_digest(run / "model")
