"""Bad input gets a clear error and loses nothing."""

import json
import os

import pytest

from llamapro.expansion import api as steps
from llamapro.errors import CheckpointError
from llamapro.tensors import atomic_dir, content_digest
from llamapro.expansion.families import UnsupportedModelError
from llamapro.expansion.strategies import PlacementError
from tests.tiny_models import tiny_model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    tiny_model("llama").save_pretrained(d)
    return d


def test_impossible_positions(base_dir, tmp_path):
    with pytest.raises(PlacementError, match="out of range"):
        steps.expand(str(base_dir), str(tmp_path / "o"), positions=[9], progress=False)
    with pytest.raises(PlacementError, match="duplicate"):
        steps.expand(str(base_dir), str(tmp_path / "o"), positions=[1, 1], progress=False)
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=4, vocab_size=128)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported.*--residual-writers"):
        steps.expand(str(tmp_path / "gpt2"), str(tmp_path / "o"), blocks=1, progress=False)
    # naming the writers makes it work, and the proof confirms it
    meta = steps.expand(str(tmp_path / "gpt2"), str(tmp_path / "o"), blocks=1, progress=False,
                        residual_writers=["attn.c_proj", "mlp.c_proj"])
    assert meta["verification"]["ok"]


def test_wrong_user_writers_fail_the_proof(base_dir, tmp_path):
    # zeroing only the attention output leaves the MLP writing into the stream: not an identity
    with pytest.raises(steps.IdentityError, match="NOT an identity"):
        steps.expand(str(base_dir), str(tmp_path / "o"), blocks=1, progress=False,
                     residual_writers=["self_attn.o_proj"])
    assert not (tmp_path / "o").exists()  # a failed proof is never published


def test_misnamed_writer_is_refused(base_dir, tmp_path):
    with pytest.raises(UnsupportedModelError, match="no attention output projection"):
        steps.expand(str(base_dir), str(tmp_path / "o"), blocks=1, progress=False,
                     residual_writers=["self_attn.out_proj"])


def test_quantized_checkpoint_is_refused(base_dir, tmp_path):
    q = tmp_path / "q"
    q.mkdir()
    for f in base_dir.iterdir():
        (q / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="quantized"):
        steps.expand(str(q), str(tmp_path / "o"), blocks=1, progress=False)


def test_corrupt_and_truncated_shards(base_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in base_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    st = bad / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt shard"):
        steps.expand(str(bad), str(tmp_path / "o"), blocks=1, progress=False)
    st.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="safetensors"):
        steps.expand(str(bad), str(tmp_path / "o"), blocks=1, progress=False)
    assert not (tmp_path / "o").exists()


def test_pickle_only_checkpoint_is_refused(tmp_path):
    d = tmp_path / "pt"
    d.mkdir()
    tiny_model("llama").save_pretrained(d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only from safetensors"):
        steps.expand(str(d), str(tmp_path / "o"), blocks=1, progress=False)


def test_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        steps.expand(str(tmp_path / "nope"), str(tmp_path / "o"), blocks=1, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        steps.expand(str(tmp_path / "empty"), str(tmp_path / "o"), blocks=1, progress=False)


def test_existing_output_needs_force_and_failure_keeps_it(base_dir, tmp_path):
    out = tmp_path / "out"
    steps.expand(str(base_dir), str(out), blocks=1, progress=False)
    before = content_digest(out)
    with pytest.raises(CheckpointError, match="--force"):
        steps.expand(str(base_dir), str(out), blocks=2, progress=False)
    # a failing replacement (bad positions are caught before writing; force a failure mid-write)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert content_digest(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    steps.expand(str(base_dir), str(out), blocks=2, progress=False, force=True)
    assert json.loads((out / "llamapro.json").read_text())["num_new_layers"] == 2


def test_killed_expansion_leaves_previous_output_intact(base_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    steps.expand(str(base_dir), str(out), blocks=1, progress=False)
    before = content_digest(out)
    # a big enough base that the child is still writing when killed
    big = tmp_path / "big"
    tiny_model("llama", num_layers=4).save_pretrained(big)
    code = (
        "import time, llamapro.expansion.streaming as c\n"
        "orig = c.copy_range\n"
        "def slow(*a, **k):\n    time.sleep(0.2); return orig(*a, **k)\n"
        "c.copy_range = slow\n"
        "from llamapro.expansion import api as steps\n"
        f"steps.expand({str(big)!r}, {str(out)!r}, blocks=3, force=True, progress=False)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)

    def staging():
        return [q for q in tmp_path.iterdir() if q.name.startswith(".out.tmp")]

    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not staging():
        time.sleep(0.05)
    time.sleep(0.3)
    # the kill must land while the child is writing: a child that failed, finished or never
    # started writing proves nothing about an interrupted expansion
    assert p.poll() is None, f"the expansion ended before the kill (exit {p.returncode}): {p.stderr.read()[-2000:]}"
    assert staging(), "the expansion never started writing within 120 s"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert staging(), "a kill mid-write leaves its temporary beside OUT (named .out.tmp-*)"
    assert content_digest(out) == before


def test_disk_full_during_expansion_keeps_the_previous_output_and_leaks_nothing(base_dir, tmp_path):
    """A file-size limit (RLIMIT_FSIZE: writes past it fail with EFBIG, as a full disk fails them
    with ENOSPC) hits the checkpoint write of a replacing expansion: the previous OUT stays, and
    neither its temporary directory nor a temporary metadata file is left beside it."""
    import errno
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "out"
    steps.expand(str(base_dir), str(out), blocks=1, progress=False)
    before = content_digest(out)
    shard = max(f.stat().st_size for f in out.glob("*.safetensors"))
    code = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({shard // 2}, {shard // 2}))\n"
        "from llamapro.expansion import api as steps\n"
        "try:\n"
        f"    steps.expand({str(base_dir)!r}, {str(out)!r}, blocks=3, force=True, progress=False)\n"
        "except OSError as e:\n"
        "    print('OSError', e.errno); sys.exit(0)\n"
        "sys.exit('no error: the file-size limit was not hit')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    assert r.returncode == 0 and f"OSError {errno.EFBIG}" in r.stdout, r.stdout + r.stderr[-2000:]
    assert content_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "a temporary was left behind"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
