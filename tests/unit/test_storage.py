"""Run directories behind a URI: pyarrow's filesystems on file:// URIs (no network, no mocks)."""

from pathlib import Path

import pytest

from llamapro import storage


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAPRO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _tree(root):
    """Files under root, without the upload manifest (bookkeeping, checked by its own tests)."""
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != storage.MANIFEST}


def test_uris_and_local_paths():
    assert storage.is_uri("s3://bucket/runs") and storage.is_uri("file:///tmp/x")
    assert not storage.is_uri("runs/demo") and not storage.is_uri("/abs/path")
    assert storage.join("s3://b/runs/", "demo", "ray") == "s3://b/runs/demo/ray"
    assert storage.train_storage_path("gs://b/runs/demo") == "gs://b/runs/demo/ray"
    assert storage.train_storage_path("runs/demo") is None  # Train's default: <run dir>/ray
    assert str(storage.local_dir("runs/demo")) == "runs/demo"


def test_a_step_on_another_node_sees_what_the_previous_one_wrote(tmp_path, cache, monkeypatch):
    shared = tmp_path / "bucket"
    uri = f"file://{shared}/runs/demo"
    with storage.synced(uri, push=["expanded"]) as run:  # the expand job, node A
        assert cache in run.parents
        (run / "expanded" / "sub").mkdir(parents=True)
        (run / "expanded" / "llamapro.json").write_text("{}")
        (run / "expanded" / "sub" / "w.safetensors").write_text("weights")
        (run / "scratch.tmp").write_text("never uploaded")
    assert _tree(shared / "runs" / "demo") == {"expanded/llamapro.json": "{}",
                                               "expanded/sub/w.safetensors": "weights"}

    monkeypatch.setenv("LLAMAPRO_CACHE", str(tmp_path / "node-b"))  # the train job, node B
    with storage.synced(uri, pull=["expanded", "metrics.jsonl"], push=["model"]) as run:
        assert _tree(run) == {"expanded/llamapro.json": "{}", "expanded/sub/w.safetensors": "weights"}
        (run / "model").mkdir()
        (run / "model" / "config.json").write_text("trained")
    assert (shared / "runs" / "demo" / "model" / "config.json").read_text() == "trained"


def test_nothing_is_uploaded_when_the_step_fails(tmp_path, cache):
    uri = f"file://{tmp_path}/bucket/run"
    with pytest.raises(RuntimeError):
        with storage.synced(uri, push=["model"]) as run:
            (run / "model").mkdir()
            raise RuntimeError("training failed")
    assert not storage.exists(storage.join(uri, "model"))


def test_upload_replaces_a_directory_and_download_refreshes_a_stale_copy(tmp_path, cache):
    uri = f"file://{tmp_path}/bucket/export"
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    (old / "model-00001-of-00002.safetensors").write_text("a")
    (old / "model-00002-of-00002.safetensors").write_text("b")
    (new / "model.safetensors").write_text("ab")
    storage.upload(old, uri)
    local = storage.localize(uri)
    assert sorted(_tree(storage.local_dir(uri))) == sorted(_tree(old))
    storage.upload(new, uri)  # no stale shard survives beside the new single file
    assert _tree(tmp_path / "bucket" / "export") == {"model.safetensors": "ab"}
    assert storage.download(uri, local) and _tree(storage.local_dir(uri)) == {"model.safetensors": "ab"}
    assert not storage.download(uri + "-missing", tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        storage.localize(uri + "-missing")


def test_same_sized_new_version_is_not_mistaken_for_the_cached_one(tmp_path, cache):
    """A model re-expanded with another strategy (or trained again) has shards of the same sizes;
    its small files (llamapro.json, config) differ, and that is enough to refresh the copy."""
    uri = f"file://{tmp_path}/bucket/expanded"
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_text("A" * 64)
    (src / "llamapro.json").write_text('{"strategy": "even"}')
    storage.upload(src, uri)
    local = storage.localize(uri)
    (src / "model.safetensors").write_text("B" * 64)  # same size
    (src / "llamapro.json").write_text('{"strategy": "top!"}')  # same size, other bytes
    storage.upload(src, uri)
    assert storage.localize(uri) == local
    assert _tree(storage.local_dir(uri)) == _tree(src)


def test_upload_of_what_is_already_there_copies_nothing(tmp_path, cache):
    """Rank 0 uploads the trained model; the driver's push of the same files is then free."""
    import os

    uri = f"file://{tmp_path}/bucket/model"
    src = tmp_path / "model"
    src.mkdir()
    (src / "model.safetensors").write_bytes(os.urandom(2 << 20))  # large: compared by size
    (src / "config.json").write_text("{}")
    storage.upload(src, uri)
    remote = tmp_path / "bucket" / "model" / "model.safetensors"
    before = remote.stat().st_ino, remote.stat().st_mtime_ns
    storage.upload(src, uri)
    assert (remote.stat().st_ino, remote.stat().st_mtime_ns) == before
    (src / "config.json").write_text('{"x": 1}')
    storage.upload(src, uri)  # a changed small file: uploaded again
    assert (tmp_path / "bucket" / "model" / "config.json").read_text() == '{"x": 1}'


def _job(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"job_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_export_job_reads_and_writes_a_run_behind_a_uri(tmp_path, cache, capsys):
    """jobs/export.py on another machine: the trained model comes down from the URI, the export
    goes up beside it; nothing is written to the bucket but the export."""
    import json

    import yaml

    from tests.unit.eval_support import make_run

    run = make_run(tmp_path / "trainer")
    bucket = tmp_path / "bucket"
    storage.upload(run, f"file://{bucket}/runs/demo")
    cfg = tmp_path / "export.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"name": "demo", "output_dir": f"file://{bucket}/runs"}}))
    assert _job("export").main(["--config", str(cfg)]) == 0
    export = bucket / "runs" / "demo" / "export"
    assert json.loads((export / "llamapro.json").read_text())["kind"] == "exported"
    assert (export / "config.json").is_file() and (export / "README.md").is_file()
    assert storage.local_dir(f"file://{bucket}/runs/demo") != bucket / "runs" / "demo"


# --- interrupted uploads, disk full: the fault catalogue's storage rows ---------------------------

def _model(d, payload: bytes, n: int = 6):
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (d / f"model-{i:05d}.safetensors").write_bytes(payload)
    (d / "config.json").write_text('{"v": %d}' % payload[0])
    return d


def _bytes_tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in (storage.MANIFEST, storage.INCOMPLETE)}


_SLOW_UPLOAD = """
import sys, time
import pyarrow.fs as pafs
from llamapro import storage
if sys.argv[3] == "in-place":
    storage._renames_dirs = lambda fs: False   # the object-store path, on a real file system
real = pafs.copy_files
def slow(*a, **k):
    real(*a, **k)
    print("copied", flush=True)
    time.sleep(30)                             # the parent kills us here, after the first file
pafs.copy_files = slow
storage.upload(sys.argv[1], sys.argv[2])
"""


def _kill_mid_upload(src, uri, how):
    import signal
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", _SLOW_UPLOAD, str(src), uri, how],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "copied", "the upload never started copying"
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, f"the upload was not killed mid-copy (exit {p.returncode})"


def test_upload_killed_mid_copy_leaves_the_previous_version(tmp_path, cache):
    """File systems (file://, hdfs://): the new tree is staged beside the old one and swapped in
    with its manifest; a SIGKILL mid-copy changes nothing a reader sees."""
    uri = f"file://{tmp_path}/bucket/model"
    old = _model(tmp_path / "v1", b"\x01" * 4096)
    storage.upload(old, uri)
    _kill_mid_upload(_model(tmp_path / "v2", b"\x02" * 4096), uri, "staged")
    remote = tmp_path / "bucket" / "model"
    assert _bytes_tree(remote) == _bytes_tree(old)
    storage.check_complete(uri)
    local = storage.localize(uri, require_manifest=True)
    assert _bytes_tree(Path(local)) == _bytes_tree(old)
    # the next upload finishes, and the killed one's staging copy is not mistaken for anything
    storage.upload(tmp_path / "v2", uri)
    assert _bytes_tree(remote) == _bytes_tree(tmp_path / "v2")
    assert storage.download(uri, local) and _bytes_tree(Path(local)) == _bytes_tree(tmp_path / "v2")


def test_upload_killed_mid_copy_in_place_is_refused_by_download(tmp_path, cache, monkeypatch):
    """Object stores cannot rename a directory: the tree is replaced in place under a marker,
    and what a kill leaves there is refused with a clear error until an upload finishes."""
    uri = f"file://{tmp_path}/bucket/model"
    storage.upload(_model(tmp_path / "v1", b"\x01" * 4096), uri)
    new = _model(tmp_path / "v2", b"\x02" * 4096)
    _kill_mid_upload(new, uri, "in-place")
    with pytest.raises(storage.IncompleteUploadError, match="started and did not finish"):
        storage.download(uri, tmp_path / "local")
    with pytest.raises(storage.IncompleteUploadError):  # not even as a foreign base model
        storage.localize(uri)
    assert not (tmp_path / "local").exists()
    monkeypatch.setattr(storage, "_renames_dirs", lambda fs: False)
    storage.upload(new, uri)  # the same path, finished
    assert storage.download(uri, tmp_path / "local") and _bytes_tree(tmp_path / "local") == _bytes_tree(new)
    assert not list((tmp_path / "local").rglob(".llamapro-*"))  # bookkeeping stays remote


def test_download_refuses_a_directory_without_a_complete_manifest(tmp_path, cache):
    uri = f"file://{tmp_path}/bucket/run"
    storage.upload(_model(tmp_path / "run" / "model", b"\x01" * 64, n=2).parent, uri)
    # an entry of an uploaded tree carries its own manifest: a step pulls run/model alone
    assert storage.download(storage.join(uri, "model"), tmp_path / "m")
    remote = tmp_path / "bucket" / "run" / "model"
    (remote / "model-00001.safetensors").unlink()  # a shard lost after the upload
    with pytest.raises(storage.IncompleteUploadError,
                       match=r"does not match its .* missing \['model-00001.safetensors'\]"):
        storage.download(storage.join(uri, "model"), tmp_path / "m2")
    # a directory nobody uploaded through llamapro: refused for run artifacts, fine as a base
    foreign = tmp_path / "bucket" / "hf-model"
    _model(foreign, b"\x03" * 64, n=1)
    with pytest.raises(storage.IncompleteUploadError, match="no .llamapro-manifest.json.*upload it again"):
        storage.download(f"file://{foreign}", tmp_path / "f")
    assert _bytes_tree(Path(storage.localize(f"file://{foreign}"))) == _bytes_tree(foreign)
    from llamapro.errors import CheckpointError

    assert issubclass(storage.IncompleteUploadError, CheckpointError)  # the CLI's exit 2


_FSIZE_LIMITED = """
import resource, sys
from llamapro import storage
limit = 1 << 20
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))   # no file may grow past 1 MiB
try:
    getattr(storage, sys.argv[1])(sys.argv[2], sys.argv[3])
except OSError as e:
    print("OSError", e.errno, flush=True)
    sys.exit(0)
sys.exit("no error: the file-size limit was not hit")
"""


def test_disk_full_during_upload_and_download_loses_nothing_and_leaks_nothing(tmp_path, cache):
    """A file-size limit (RLIMIT_FSIZE: writes past it fail with EFBIG, as on a full disk) hits
    the copy of a 2 MiB shard; the previous version stays and no staging or part copy is left."""
    import errno
    import os
    import subprocess
    import sys

    uri = f"file://{tmp_path}/bucket/model"
    old = _model(tmp_path / "v1", b"\x01" * 4096, n=2)
    storage.upload(old, uri)
    big = _model(tmp_path / "v2", b"\x02" * 4096, n=2)
    (big / "model-00001.safetensors").write_bytes(os.urandom(2 << 20))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))

    def limited(*args):
        r = subprocess.run([sys.executable, "-c", _FSIZE_LIMITED, *map(str, args)], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and f"OSError {errno.EFBIG}" in r.stdout, r.stdout + r.stderr

    limited("upload", big, uri)
    bucket = tmp_path / "bucket"
    assert _bytes_tree(bucket / "model") == _bytes_tree(old)
    assert sorted(p.name for p in bucket.iterdir()) == ["model"]  # no .model.staging-* left
    local = tmp_path / "node" / "model"
    storage.download(uri, local)
    storage.upload(big, uri)
    limited("download", uri, local)  # the new version cannot come down: the old local copy stays
    assert _bytes_tree(local) == _bytes_tree(old)
    assert sorted(p.name for p in local.parent.iterdir()) == ["model"]  # no .model.part-* left
