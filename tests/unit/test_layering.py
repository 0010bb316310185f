import subprocess
import sys


def test_expansion_core_imports_neither_ray_nor_deepspeed():
    code = (
        "import sys\n"
        "import llamapro.config, llamapro.expand.strategies, llamapro.expand.families, llamapro.checkpoint, "
        "llamapro.expand.surgery, llamapro.expand.api, llamapro.cli\n"
        "bad = [m for m in ('ray', 'deepspeed') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_config_and_strategies_import_no_torch():
    code = ("import sys, llamapro.config, llamapro.expand.strategies, llamapro.expand.families, llamapro.checkpoint\n"
            "assert 'torch' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
