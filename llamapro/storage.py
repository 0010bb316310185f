"""Run directories behind a URI (``s3://``, ``gs://``, ``hdfs://``, ``file://``): what lets the steps
of one run execute on different nodes (or different jobs) and still share every artifact.

A step works in a local copy of the run directory and moves only what it reads and writes
through ``pyarrow.fs`` (the same filesystems Ray Data and Ray Train use)::

    with synced(cfg.run.run_dir(), pull=["expanded"], push=["model", "metrics.jsonl"]) as run:
        ...                      # read run/expanded, write run/model; uploaded when the block succeeds

A plain local path (a laptop, or an NFS / PVC mount shared by every node) is used in place and
nothing is copied. Ray Train checkpoints never take this detour: ``train_storage_path`` hands
Train the URI itself, so every worker on every node persists to, and resumes from, shared storage.
Importing this module imports neither ray nor torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from .config import default_cache_dir

_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(path) -> bool:
    """True for ``scheme://...`` (anything pyarrow.fs may open), False for local paths."""
    return bool(_URI_RE.match(str(path)))


def _fs(uri: str):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # unknown scheme, bad bucket, missing credentials
        raise OSError(f"cannot open {uri!r}: {e}") from e


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a URI or a local path."""
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts if p)])


def local_dir(path) -> Path:
    """Where a step works on ``path``: the path itself when local; for a URI, a stable directory
    in the llamapro cache (``$LLAMAPRO_CACHE/storage/<scheme>/<host/path>-<hash>``)."""
    path = str(path)
    if not is_uri(path):
        return Path(os.path.expanduser(path))
    scheme, rest = path.split("://", 1)
    safe = re.sub(r"[^A-Za-z0-9._/-]", "_", rest).strip("/") or "root"
    tag = hashlib.sha256(path.encode()).hexdigest()[:8]
    return default_cache_dir() / "storage" / scheme / f"{safe}-{tag}"


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, p = _fs(uri)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def _listing(fs, p: str) -> dict[str, int]:
    """{relative path: size} of a file or of every file below a directory."""
    import pyarrow.fs as pafs

    info = fs.get_file_info(p)
    if info.type == pafs.FileType.File:
        return {"": info.size}
    sel = pafs.FileSelector(p, recursive=True)
    return {i.path[len(p):].lstrip("/"): i.size for i in fs.get_file_info(sel)
            if i.type == pafs.FileType.File}


_SMALL = 1 << 20  # files up to this size are compared by content, larger ones by size


def _same(fs_a, a: str, fs_b, b: str) -> bool:
    """Whether two trees hold the same files: same relative paths and sizes, and byte-equal small
    files. The small files (config, ``llamapro.json`` with its fingerprint, steps and timings,
    metrics, safetensors indexes) tell two versions of a model apart even when every shard has
    the same size, e.g. the same shapes trained twice or expanded with another strategy."""
    la, lb = _listing(fs_a, a), _listing(fs_b, b)
    if la != lb:
        return False
    for rel, size in la.items():
        if size <= _SMALL:
            pa, pb = (a + "/" + rel if rel else a), (b + "/" + rel if rel else b)
            with fs_a.open_input_stream(pa) as fa, fs_b.open_input_stream(pb) as fb:
                if fa.read() != fb.read():
                    return False
    return True


@contextlib.contextmanager
def _locked(dest: Path):
    """One writer per local copy: several Train workers on one node localize the same model."""
    from filelock import FileLock

    locks = default_cache_dir() / "locks"  # not beside dest: a run directory stays clean
    locks.mkdir(parents=True, exist_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / (hashlib.sha256(str(dest).encode()).hexdigest()[:16] + ".lock"))):
        yield


def download(uri: str, dest) -> bool:
    """Copy a file or directory tree at ``uri`` to local ``dest``, unless ``dest`` already holds
    the same files (see ``_same``). The copy lands beside ``dest`` and replaces it in one rename,
    under a lock, so a reader never sees half a tree. False when ``uri`` does not exist."""
    import pyarrow.fs as pafs

    fs, p = _fs(uri)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        return False
    dest = Path(dest).absolute()
    local = pafs.LocalFileSystem()
    with _locked(dest):
        if dest.exists() and _same(fs, p, local, str(dest.resolve())):
            return True
        tmp = dest.parent / f".{dest.name}.part-{os.getpid()}"
        if tmp.is_dir():
            shutil.rmtree(tmp)
        if info.type == pafs.FileType.Directory:
            tmp.mkdir(parents=True)
        pafs.copy_files(p, str(tmp), source_filesystem=fs, destination_filesystem=local)
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    return True


def upload(src, uri: str) -> None:
    """Copy local file or directory ``src`` to ``uri``; a directory replaces what was there, so
    no stale shard of an older version survives beside the new one. Nothing is copied when
    ``uri`` already holds the same files (e.g. rank 0 uploaded them, the driver pushes again)."""
    import pyarrow.fs as pafs

    src = Path(src)
    fs, p = _fs(uri)
    if (fs.get_file_info(p).type != pafs.FileType.NotFound
            and _same(pafs.LocalFileSystem(), str(src.resolve()), fs, p)):
        return
    if src.is_dir():
        if fs.get_file_info(p).type != pafs.FileType.NotFound:
            fs.delete_dir(p)
        fs.create_dir(p, recursive=True)
    else:
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(str(src.resolve()), p, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def localize(path: str) -> str:
    """A local path for something to read (e.g. a base model at ``s3://...``): URIs are
    downloaded into the cache (again only when the remote copy changed); anything else is
    returned unchanged."""
    if not is_uri(path):
        return path
    dest = local_dir(path)
    if not download(path, dest):
        raise FileNotFoundError(f"{path} does not exist")
    return str(dest)


def train_storage_path(run_dir: str, sub: str = "ray") -> str | None:
    """Ray Train's ``storage_path`` for a run: the URI itself (checkpoints shared by every node),
    or None for a local run (Train then uses ``<run dir>/ray``)."""
    return join(run_dir, sub) if is_uri(run_dir) else None


@contextlib.contextmanager
def synced(run_dir: str, pull: Iterable[str] = (), push: Iterable[str] = ()) -> Iterator[Path]:
    """Yield the local working directory of ``run_dir``. For a URI, first download the ``pull``
    entries that exist there (files or directories, relative to the run) and, when the block
    finishes without an exception, upload the ``push`` entries that exist locally."""
    local = local_dir(run_dir)
    local.mkdir(parents=True, exist_ok=True)
    remote = is_uri(run_dir)
    if remote:
        for rel in pull:
            download(join(run_dir, rel), local / rel)
    yield local
    if remote:
        for rel in push:
            if (local / rel).exists():
                upload(local / rel, join(run_dir, rel))
