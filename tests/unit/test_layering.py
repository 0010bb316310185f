import subprocess
import sys


def test_expansion_core_imports_neither_ray_nor_deepspeed():
    code = (
        "import sys\n"
        "import llamapro.config, llamapro.strategies, llamapro.families, llamapro.checkpoint, "
        "llamapro.expansion, llamapro.steps, llamapro.cli\n"
        "bad = [m for m in ('ray', 'deepspeed') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_config_and_strategies_import_no_torch():
    code = ("import sys, llamapro.config, llamapro.strategies, llamapro.families, llamapro.checkpoint\n"
            "assert 'torch' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
