"""Run directories behind a URI: pyarrow's filesystems on file:// URIs (no network, no mocks)."""

import pytest

from llamapro import storage


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAPRO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _tree(root):
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


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
