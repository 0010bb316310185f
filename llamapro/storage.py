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
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from llamapro.config import default_cache_dir
from llamapro.errors import IncompleteUploadError  # noqa: F401

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


MANIFEST = ".llamapro-manifest.json"
"""Written last into an uploaded directory: every file and its size. A directory with a manifest
that its files match is complete; ``download`` refuses anything else of ours."""
INCOMPLETE = ".llamapro-incomplete"
"""Written first where a directory is replaced in place (object stores cannot rename a directory):
its presence means an upload there started and did not finish."""
_META = (MANIFEST, INCOMPLETE)


def _listing(fs, p: str) -> dict[str, int]:
    """{relative path: size} of a file or of every file below a directory, without our
    manifest and marker."""
    import pyarrow.fs as pafs

    info = fs.get_file_info(p)
    if info.type == pafs.FileType.File:
        return {"": info.size}
    sel = pafs.FileSelector(p, recursive=True)
    return {i.path[len(p):].lstrip("/"): i.size for i in fs.get_file_info(sel)
            if i.type == pafs.FileType.File and i.base_name not in _META}


def _read(fs, path: str) -> bytes | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (FileNotFoundError, OSError):
        return None


def check_complete(uri: str, require_manifest: bool = True) -> None:
    """Raise ``IncompleteUploadError`` unless the directory at ``uri`` is a complete upload: its
    manifest lists exactly the files that are there, with their sizes. Without
    ``require_manifest`` a directory nobody uploaded through llamapro (a base model someone put
    in a bucket) passes, but one we started and did not finish still does not."""
    import pyarrow.fs as pafs

    fs, p = _fs(uri)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return
    how = ("upload it again (rerun the step that writes it); a partial copy is never used")
    if fs.get_file_info(p + "/" + INCOMPLETE).type != pafs.FileType.NotFound:
        raise IncompleteUploadError(f"{uri} is incomplete: an upload to it started and did not "
                                    f"finish ({INCOMPLETE} is there); {how}")
    raw = _read(fs, p + "/" + MANIFEST)
    if raw is None:
        if require_manifest:
            raise IncompleteUploadError(
                f"{uri} has no {MANIFEST}: it is not a complete llamapro upload (interrupted, or "
                f"written by something else); {how}")
        return
    try:
        want = json.loads(raw)["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise IncompleteUploadError(f"{uri}: corrupt {MANIFEST} ({e}); {how}") from None
    have = _listing(fs, p)
    if have != want:
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        size = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        raise IncompleteUploadError(
            f"{uri} does not match its {MANIFEST}: missing {missing[:5]}, unexpected {extra[:5]}, "
            f"wrong size {size[:5]}; {how}")


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


def download(uri: str, dest, require_manifest: bool = True) -> bool:
    """Copy a file or directory tree at ``uri`` to local ``dest``, unless ``dest`` already holds
    the same files (see ``_same``). A directory must be a complete upload (``check_complete``;
    ``require_manifest=False`` for directories llamapro did not upload). The copy lands beside
    ``dest``, is checked against the manifest, and replaces ``dest`` in one rename, under a
    lock, so a reader never sees half a tree. False when ``uri`` does not exist."""
    import pyarrow.fs as pafs

    fs, p = _fs(uri)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        return False
    check_complete(uri, require_manifest)
    dest = Path(dest).absolute()
    local = pafs.LocalFileSystem()
    with _locked(dest):
        if dest.exists() and _same(fs, p, local, str(dest.resolve())):
            return True
        tmp = dest.parent / f".{dest.name}.part-{os.getpid()}"
        _remove_local(tmp)
        try:
            if info.type == pafs.FileType.Directory:
                tmp.mkdir(parents=True)
            pafs.copy_files(p, str(tmp), source_filesystem=fs, destination_filesystem=local)
            if info.type == pafs.FileType.Directory:
                # what arrived is what the manifest promised (the tree may have been replaced
                # while we copied); the local copy stays clean of our bookkeeping
                if (tmp / MANIFEST).is_file():
                    want = json.loads((tmp / MANIFEST).read_text())["files"]
                    if _listing(local, str(tmp)) != want:
                        raise IncompleteUploadError(
                            f"{uri} changed while it was downloaded; try again")
                for m in [q for q in tmp.rglob("*") if q.name in _META]:
                    m.unlink()
            if dest.is_dir() and _exchange(str(tmp), str(dest)):
                shutil.rmtree(tmp)  # the previous copy, swapped out in the same step
            else:
                if dest.is_dir():
                    shutil.rmtree(dest)
                os.replace(tmp, dest)
        except BaseException:
            _remove_local(tmp)
            raise
    return True


def _remove_local(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _copy_tree(src: Path, files: list[str], fs, dst: str) -> None:
    """Our copy loop, file by file (never our manifest or marker: a stale one downloaded with a
    tree must not vouch for the new one)."""
    import pyarrow.fs as pafs

    local = pafs.LocalFileSystem()
    made = set()
    for rel in files:
        parent = (dst + "/" + rel).rsplit("/", 1)[0]
        if parent not in made:
            fs.create_dir(parent, recursive=True)
            made.add(parent)
        pafs.copy_files(str(src / rel), dst + "/" + rel, source_filesystem=local,
                        destination_filesystem=fs)


def _write_manifests(fs, root: str, files: dict[str, int]) -> None:
    """A manifest in every directory of the tree, deepest first and the root's last: a step may
    pull one entry of an uploaded run (``run/model``) as well as the whole run."""
    dirs = {""}
    for rel in files:
        parts = rel.split("/")[:-1]
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    for d in sorted(dirs, key=lambda d: (-d.count("/") - bool(d), d)):
        sub = {k[len(d) + 1:] if d else k: v for k, v in files.items() if not d or k.startswith(d + "/")}
        with fs.open_output_stream("/".join(x for x in (root, d, MANIFEST) if x)) as f:
            f.write(json.dumps({"version": 1, "files": sub}, indent=1, sort_keys=True).encode())


def _renames_dirs(fs) -> bool:
    """Whether ``fs.move`` renames a directory in one step (object stores copy object by object,
    or refuse)."""
    return fs.type_name in ("local", "hdfs")


def _exchange(a: str, b: str) -> bool:
    """Swap two local paths in one step (Linux renameat2 RENAME_EXCHANGE); False if unavailable."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        f = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return f(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def upload(src, uri: str) -> None:
    """Copy local file or directory ``src`` to ``uri``; a directory replaces what was there, so
    no stale shard of an older version survives beside the new one. Nothing is copied when
    ``uri`` already holds the same files (e.g. rank 0 uploaded them, the driver pushes again).

    Never half a model where a good one was: a directory is copied into a hidden staging
    sibling, its manifest written last, then swapped into place in one rename (file systems),
    or, where directories cannot be renamed (object stores), replaced in place under an
    ``INCOMPLETE`` marker that only the finished manifest clears. A file is copied beside its
    target and moved over it. A crash leaves either the previous version or a directory that
    ``download`` refuses; an exception removes the staging copy."""
    import pyarrow.fs as pafs

    src = Path(src).resolve()
    fs, p = _fs(uri)
    p = p.rstrip("/")
    target = fs.get_file_info(p)
    if target.type != pafs.FileType.NotFound and _same(pafs.LocalFileSystem(), str(src), fs, p):
        try:
            check_complete(uri)
            return
        except IncompleteUploadError:
            pass  # same files but unfinished: finish it
    parent, name = p.rsplit("/", 1) if "/" in p else ("", p)
    fs.create_dir(parent or "/", recursive=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if not src.is_dir():
        part = f"{parent}/.{name}.part-{tag}"
        try:
            pafs.copy_files(str(src), part, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
            fs.move(part, p)
        except BaseException:
            _delete_quietly(fs, part)
            raise
        return
    files = _listing(pafs.LocalFileSystem(), str(src))
    if _renames_dirs(fs):
        stage = f"{parent}/.{name}.staging-{tag}"
        try:
            fs.create_dir(stage, recursive=True)
            _copy_tree(src, sorted(files), fs, stage)
            _write_manifests(fs, stage, files)
            if fs.get_file_info(p).type == pafs.FileType.NotFound:
                fs.move(stage, p)
            elif fs.type_name == "local" and _exchange(stage, p):
                pass  # stage now holds the old version, deleted below
            else:
                old = f"{parent}/.{name}.old-{tag}"
                fs.move(p, old)
                try:
                    fs.move(stage, p)
                except BaseException:
                    fs.move(old, p)
                    raise
                stage = old
        finally:
            _delete_quietly(fs, stage)
        return
    # object stores: in place, marked incomplete until the manifest is written
    fs.create_dir(p, recursive=True)
    with fs.open_output_stream(p + "/" + INCOMPLETE) as f:
        f.write(b"an upload is in progress or was interrupted\n")
    for i in fs.get_file_info(pafs.FileSelector(p, recursive=True)):
        if i.base_name == MANIFEST:  # no part of the tree vouches for itself until the end
            fs.delete_file(i.path)
    for rel in _listing(fs, p):
        if rel not in files:
            fs.delete_file(p + "/" + rel)
    _copy_tree(src, sorted(files), fs, p)
    _write_manifests(fs, p, files)
    fs.delete_file(p + "/" + INCOMPLETE)


def _delete_quietly(fs, path: str) -> None:
    import pyarrow.fs as pafs

    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError:
        pass


def localize(path: str, require_manifest: bool = False) -> str:
    """A local path for something to read (e.g. a base model at ``s3://...``): URIs are
    downloaded into the cache (again only when the remote copy changed); anything else is
    returned unchanged. A directory someone put there without llamapro (no manifest) is
    accepted unless ``require_manifest``; an interrupted or mismatched upload of ours never is."""
    if not is_uri(path):
        return path
    dest = local_dir(path)
    if not download(path, dest, require_manifest=require_manifest):
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
