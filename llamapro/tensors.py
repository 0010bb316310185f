"""Safetensors checkpoints as bytes: headers, tensor tables, fingerprints and digests, streamed
writes, atomic directories and JSON files.

Everything works on the safetensors byte layout directly (no torch): a tensor is a byte range in a
file, copied with ``os.copy_file_range`` so the kernel moves it, and memory stays at a few MB
whatever the model size. Output directories are written to a temporary sibling and renamed into
place, so an interrupted write leaves the previous result intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from llamapro.errors import CheckpointError

METADATA_FILE = "llamapro.json"  # written by llamapro.artifacts; never copied as a side file
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
INDEX_FILE = "model.safetensors.index.json"
CHUNK = 8 << 20  # 8 MiB read/write chunk: bounds memory independent of tensor size


# --- safetensors layout ---------------------------------------------------------------------------

@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list[int]
    file: Path
    start: int  # absolute byte offset in file
    nbytes: int


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, absolute offset of the data section) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 << 20:
                raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} bytes)")
            hdr = f.read(n)
            if len(hdr) != n:
                raise CheckpointError(f"{path}: truncated safetensors header")
        header = json.loads(hdr)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    size = path.stat().st_size
    data_start = 8 + n
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        if data_start + b > size:
            raise CheckpointError(
                f"{path}: tensor {k} ends at byte {data_start + b} but the file has {size} bytes "
                "(truncated or corrupt shard)"
            )
    return header, data_start


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a checkpoint, in index order."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: corrupt index ({e})") from e
        files = sorted(set(wm.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise CheckpointError(f"{model_dir}: shards listed in the index are missing: {missing}")
        return [model_dir / f for f in files]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(p.name for p in model_dir.glob("*") if p.suffix in WEIGHT_SUFFIXES)
    stray = [o for o in others if o.endswith(".safetensors")]
    if stray:
        raise CheckpointError(
            f"{model_dir} has {stray} but neither model.safetensors nor {INDEX_FILE} naming "
            "them; restore the index file (transformers needs it too)")
    if others:
        raise CheckpointError(
            f"{model_dir} has weights in {others} but no safetensors: llamapro reads weights only "
            "from safetensors (pickle files can run code). Re-save "
            "it with save_pretrained(safe_serialization=True)."
        )
    raise CheckpointError(f"{model_dir}: no model.safetensors or {INDEX_FILE} found")


def tensor_table(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint by name: dtype, shape, and where its bytes are."""
    table: dict[str, TensorInfo] = {}
    for f in weight_files(model_dir):
        header, ds = read_header(f)
        for k, v in header.items():
            if k == "__metadata__":
                continue
            a, b = v["data_offsets"]
            table[k] = TensorInfo(k, v["dtype"], list(v["shape"]), f, ds + a, b - a)
    return table


def read_config(model_dir: Path) -> dict:
    """``config.json`` of a Hugging Face model directory, with a clear error when it is missing."""
    p = Path(model_dir) / "config.json"
    if not p.is_file():
        raise CheckpointError(f"{model_dir}: no config.json; is this a Hugging Face model directory?")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from e


def header_bytes(entries: list[tuple[str, str, list[int], int]], meta: dict | None) -> bytes:
    """The length prefix and JSON header of a safetensors file holding ``entries`` (name, dtype,
    shape, bytes) in that order."""
    header: dict = {"__metadata__": meta or {"format": "pt"}}
    off = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def copy_range(src_fd: int, dst_fd: int, offset: int, count: int, progress=None) -> None:
    """Append ``count`` bytes of ``src_fd`` from ``offset`` to ``dst_fd`` (``copy_file_range``;
    plain reads and writes where the kernel cannot)."""
    while count > 0:
        n = min(count, CHUNK * 8)
        try:
            done = os.copy_file_range(src_fd, dst_fd, n, offset)
        except OSError:
            done = 0
        if not done:  # cross-device or unsupported: plain read/write
            data = os.pread(src_fd, min(count, CHUNK), offset)
            if not data:
                raise CheckpointError("unexpected end of file while copying a tensor")
            done = os.write(dst_fd, data)
        offset += done
        count -= done
        if progress:
            progress(done)


def write_zeros(dst_fd: int, count: int, progress=None) -> None:
    """``count`` zero bytes at the current position, as a hole: the file system stores nothing
    and reads return zeros (safetensors loaders and mmap see ordinary zero tensors). The file
    gets its full length from the data after it, or from ``end_file``."""
    os.lseek(dst_fd, count, os.SEEK_CUR)
    if progress:
        progress(count)


def end_file(dst_fd: int) -> None:
    """Give the file its full length when it ends in a hole."""
    os.ftruncate(dst_fd, os.lseek(dst_fd, 0, os.SEEK_CUR))


# --- atomic directories and files ------------------------------------------------------------

@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False, durable: bool = True):
    """Yield a temporary sibling of ``out``; on success it replaces ``out`` in one rename.

    An exception (or a kill) leaves ``out`` as it was; a stale temporary is named ``.<out>.tmp-*``.
    ``durable`` fsyncs every file before the rename, so not even a power loss can publish a
    directory whose files are still in flight; without it the rename may reach the disk first
    (what ``cp`` gives you: faster, and fine for scratch output that is uploaded right away).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) if out.is_dir() else out.exists():
        if not force:
            raise CheckpointError(f"{out} already exists; choose another path or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if durable:
            _fsync_dir_files(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir_files(d: Path) -> None:
    for p in d.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def copy_side_files(src: Path, dst: Path, skip=()) -> list[str]:
    """Tokenizer, generation config, chat template, ...: everything that is not weights."""
    copied = []
    for p in sorted(Path(src).iterdir()):
        if p.is_dir() or p.name in skip or p.name.startswith("."):
            continue
        if p.suffix in WEIGHT_SUFFIXES or p.name in (INDEX_FILE, "config.json", METADATA_FILE):
            continue
        if p.name.endswith(".index.json"):
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied


def write_json_atomic(p: Path, obj, **dumps_kw) -> None:
    """Replace ``p`` with ``obj`` as JSON atomically: readers see the old file or the new one,
    never a half-written one (a temporary name per process and thread, then a rename)."""
    p = Path(p)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(json.dumps(obj, **dumps_kw) + "\n")
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no temporary beside p
        raise



# --- fingerprints and digests --------------------------------------------------------------------

_VOLATILE_CONFIG = ("transformers_version", "_name_or_path", "_model_name_or_path", "dtype", "torch_dtype")


def fingerprint(model_dir: Path, sample: int = 4096) -> str:
    """A stable fingerprint of a checkpoint: config (minus volatile keys), every tensor's name,
    dtype and shape, and its first and last ``sample`` bytes. Cheap at any size (a few reads per
    tensor) yet different for any two real fine-tunes of one architecture."""
    model_dir = Path(model_dir)
    return fingerprint_of(read_config(model_dir), tensor_table(model_dir), sample)


def config_digest(config: dict) -> str:
    """sha256 of a config without the keys that change on every save (versions, paths, dtype)."""
    cfg = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG}
    return "sha256:" + hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def fingerprint_of(config: dict, table: dict[str, TensorInfo], sample: int = 4096) -> str:
    """``fingerprint`` of a checkpoint described by a config and a tensor table whose entries may
    point into several files: the fingerprint a directory with exactly these tensors and this
    config would have, computed without writing it (packs check their base this way)."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG}
    h.update(json.dumps(cfg, sort_keys=True).encode())
    fds: dict[Path, int] = {}
    try:
        for name in sorted(table):
            t = table[name]
            h.update(f"{name}|{t.dtype}|{t.shape}|".encode())
            if t.file not in fds:  # (setdefault would open, and leak, a descriptor per tensor)
                fds[t.file] = os.open(t.file, os.O_RDONLY)
            fd = fds[t.file]
            h.update(os.pread(fd, min(sample, t.nbytes), t.start))
            if t.nbytes > sample:
                h.update(os.pread(fd, sample, t.start + t.nbytes - sample))
    finally:
        for fd in fds.values():
            os.close(fd)
    return "sha256:" + h.hexdigest()


def content_digest(model_dir: Path, names=None) -> dict[str, str]:
    """Full sha256 of every tensor's bytes (or of ``names``): exact, and costs a full read."""
    table = tensor_table(Path(model_dir))
    return {name: tensor_digest(table[name]) for name in sorted(names or table)}


def tensor_digest(t: TensorInfo) -> str:
    """sha256 of one tensor's bytes (dtype and shape included), read in chunks."""
    h = hashlib.sha256()
    with open(t.file, "rb") as f:
        f.seek(t.start)
        left = t.nbytes
        while left:
            b = f.read(min(left, CHUNK))
            if not b:
                raise CheckpointError(f"{t.file}: ends inside tensor {t.name}")
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def write_tensor_file(path: Path, entries: list[tuple[str, TensorInfo]], meta: dict | None = None,
                      progress=None) -> int:
    """Write a safetensors file holding ``entries`` (output name, source tensor) in that order,
    copying each tensor's bytes from wherever it lives (``copy_file_range``); memory stays at a
    few MB whatever the sizes. Returns the bytes of tensor data written."""
    fds: dict[Path, int] = {}
    dst_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    total = 0
    try:
        os.write(dst_fd, header_bytes([(n, t.dtype, t.shape, t.nbytes) for n, t in entries], meta))
        for _, t in entries:
            if t.file not in fds:
                fds[t.file] = os.open(t.file, os.O_RDONLY)
            copy_range(fds[t.file], dst_fd, t.start, t.nbytes, progress)
            total += t.nbytes
    finally:
        os.close(dst_fd)
        for fd in fds.values():
            os.close(fd)
    return total


def write_tensor_dir(tmp: Path, table: dict[str, TensorInfo], config: dict, side_files_from: Path | None,
                     max_shard_bytes: int = 2 << 30, progress: bool = False, desc: str = "write") -> dict:
    """A standard HF checkpoint in ``tmp`` (an ``atomic_dir``): ``table``'s tensors, streamed into
    shards of at most ``max_shard_bytes`` (an index when more than one), ``config.json`` and the
    side files (tokenizer, chat template, generation config) of ``side_files_from``."""
    names = sorted(table)
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        if shards[-1] and size + table[n].nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += table[n].nbytes
    total = sum(t.nbytes for t in table.values())
    bar, tick = progress_bar(total, desc, progress)
    weight_map = {}
    for i, group in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_tensor_file(tmp / fname, [(n, table[n]) for n in group], {"format": "pt"}, tick)
        weight_map.update({n: fname for n in group})
    if bar:
        bar.close()
    if len(shards) > 1:
        (tmp / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
            indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if side_files_from is not None:
        copy_side_files(Path(side_files_from), tmp)
    return {"shards": len(shards), "bytes": total}


def progress_bar(total: int, desc: str, enabled: bool):
    """(tqdm bar or None, a callback taking bytes done)."""
    if not enabled:
        return None, lambda n: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)
    return bar, bar.update
