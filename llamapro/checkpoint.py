"""HF checkpoint directories on disk: streaming expansion, stripping, metadata and fingerprints.

Streaming works on the safetensors byte layout directly: each output file's header is computed from
the input headers, then every tensor's bytes are copied range by range (``os.copy_file_range``,
so the kernel moves them) or written as zeros for residual writers of new blocks. Memory stays at
a few MB whatever the model size; no tensor is ever materialised. Output directories are written
to a temporary sibling and renamed into place, so an interrupted run leaves the previous result
intact. No torch needed here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from llamapro.expand.families import (
    Family,
    UnsupportedModelError,
    expand_config,
    family_for,
    is_quantized,
    layers_prefix,
    num_layers_of,
    plan_keys,
    split_layer_key,
    strip_config,
)
from llamapro.expand.strategies import Placement
from llamapro.errors import CheckpointError  # noqa: F401

METADATA_FILE = "llamapro.json"
METADATA_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
INDEX_FILE = "model.safetensors.index.json"
_CHUNK = 8 << 20  # 8 MiB read/write chunk: bounds memory independent of tensor size


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
            "from safetensors (pickle files can run code). Convert with "
            "`llamapro convert` or save_pretrained(safe_serialization=True)."
        )
    raise CheckpointError(f"{model_dir}: no model.safetensors or {INDEX_FILE} found")


def tensor_table(model_dir: Path) -> dict[str, TensorInfo]:
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
    p = Path(model_dir) / "config.json"
    if not p.is_file():
        raise CheckpointError(f"{model_dir}: no config.json; is this a Hugging Face model directory?")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from e


def _header_bytes(entries: list[tuple[str, str, list[int], int]], meta: dict | None) -> bytes:
    header: dict = {"__metadata__": meta or {"format": "pt"}}
    off = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int, progress=None) -> None:
    while count > 0:
        n = min(count, _CHUNK * 8)
        try:
            done = os.copy_file_range(src_fd, dst_fd, n, offset)
        except OSError:
            done = 0
        if not done:  # cross-device or unsupported: plain read/write
            data = os.pread(src_fd, min(count, _CHUNK), offset)
            if not data:
                raise CheckpointError("unexpected end of file while copying a tensor")
            done = os.write(dst_fd, data)
        offset += done
        count -= done
        if progress:
            progress(done)


def _runs(plans, table) -> list[tuple[bool, int, int]]:
    """The output's data section, in ``plans`` order, as few operations as possible: (zero,
    source start, bytes). Tensors whose source bytes follow each other merge into one copy (a
    ``copy_file_range`` per tensor costs measurably more than one per range), zeros into one
    hole."""
    runs: list[list] = []
    for kp in plans:
        t = table[kp.src_key]
        if runs and runs[-1][0] == kp.zero and (kp.zero or runs[-1][1] + runs[-1][2] == t.start):
            runs[-1][2] += t.nbytes
        else:
            runs.append([kp.zero, t.start, t.nbytes])
    return [tuple(r) for r in runs]


def _write_zeros(dst_fd: int, count: int, progress=None) -> None:
    """``count`` zero bytes at the current position, as a hole: the file system stores nothing
    and reads return zeros (safetensors loaders and mmap see ordinary zero tensors). The file
    gets its full length from the data after it, or from ``_end_file``."""
    os.lseek(dst_fd, count, os.SEEK_CUR)
    if progress:
        progress(count)


def _end_file(dst_fd: int) -> None:
    """Give the file its full length when it ends in a hole."""
    os.ftruncate(dst_fd, os.lseek(dst_fd, 0, os.SEEK_CUR))


# --- atomic directories ---------------------------------------------------------------------------

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


# --- metadata and fingerprints --------------------------------------------------------------------

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
            b = f.read(min(left, _CHUNK))
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
        os.write(dst_fd, _header_bytes([(n, t.dtype, t.shape, t.nbytes) for n, t in entries], meta))
        for _, t in entries:
            if t.file not in fds:
                fds[t.file] = os.open(t.file, os.O_RDONLY)
            _copy_range(fds[t.file], dst_fd, t.start, t.nbytes, progress)
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
    bar, tick = _progress_bar(total, desc, progress)
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


def read_metadata(model_dir: Path) -> dict | None:
    p = Path(model_dir) / METADATA_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: corrupt llamapro metadata ({e})") from e


def write_json_atomic(p: Path, obj, **dumps_kw) -> None:
    """Replace ``p`` with ``obj`` as JSON atomically: readers see the old file or the new one,
    never a half-written one (a temporary name per process and thread, then a rename)."""
    import threading

    p = Path(p)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(json.dumps(obj, **dumps_kw) + "\n")
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no temporary beside p
        raise


def write_metadata(model_dir: Path, meta: dict) -> None:
    """Atomic replace of the metadata file (never a half-written JSON)."""
    write_json_atomic(Path(model_dir) / METADATA_FILE, meta, indent=2, sort_keys=False)


def require_metadata(model_dir: Path) -> dict:
    meta = read_metadata(model_dir)
    if meta is None:
        raise CheckpointError(
            f"{model_dir} has no {METADATA_FILE}: it was not produced by `llamapro expand`, so "
            "llamapro does not know which layers are new"
        )
    if meta.get("version") != METADATA_VERSION:
        raise CheckpointError(f"{model_dir}/{METADATA_FILE}: unsupported metadata version {meta.get('version')}")
    return meta


# --- streaming expansion --------------------------------------------------------------------------

def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None, lambda n: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)
    return bar, bar.update


def stream_expand(base_dir: Path, out_dir: Path, placement: Placement, family: Family | None = None,
                  force: bool = False, progress: bool = True, base_ref: str | None = None,
                  before_publish=None, durable: bool = True, prove=None) -> dict:
    """Expand the checkpoint at ``base_dir`` into ``out_dir`` without loading it.

    ``before_publish`` (optional) runs in a thread beside the copy; its result is recorded as
    ``structure_check`` and if it raises, nothing is published. ``prove`` (optional) is called
    as ``prove(tmp_dir, meta) -> meta`` on the complete, unpublished output; if it raises (a
    failed identity proof) nothing is published and a previous ``out_dir`` stays as it was.
    Returns the metadata written to ``out_dir/llamapro.json``.

    A base that is itself an expansion (``llamapro.json`` with new layers: an expanded, trained
    or applied model) is grown again: the metadata records ``generation`` (previous + 1) and
    ``generations``, each earlier generation's blocks at their new indices. ``new_layer_indices``
    names only this generation's blocks, so training trains them and keeps earlier ones frozen.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.resolve() == base_dir.resolve():
        raise CheckpointError("output directory is the base directory; choose a new path")
    config = read_config(base_dir)
    if is_quantized(config):
        raise UnsupportedModelError(
            "the base checkpoint is quantized (config has quantization_config): zero bytes are "
            "not zero weights in packed formats. Expand the unquantized model, then quantize."
        )
    model_type = config.get("model_type", "?")
    family = family or family_for(model_type)
    n = num_layers_of(config)
    if n != placement.num_original:
        raise CheckpointError(f"placement is for {placement.num_original} layers, {base_dir} has {n}")
    files = weight_files(base_dir)
    table = tensor_table(base_dir)
    keyplans = plan_keys(table.keys(), placement, family)
    new_config, changed = expand_config(config, placement)
    base_fp = fingerprint(base_dir)

    # Each output shard holds what its input shard held, plus the new blocks copied from it.
    per_file: dict[Path, list] = {f: [] for f in files}
    for kp in keyplans:
        per_file[table[kp.src_key].file].append(kp)
    # Keep the input's layout: an index whenever the input had one (a single
    # model-00001-of-00001.safetensors is only findable through it).
    sharded = (base_dir / INDEX_FILE).is_file() or len(files) > 1
    total = sum(table[kp.src_key].nbytes for kp in keyplans)
    zeroed = sorted({split_layer_key(kp.out_key)[2] for kp in keyplans if kp.zero})

    check_box: dict = {}
    checker = None
    if before_publish is not None:
        import threading

        def run_check():
            try:
                check_box["result"] = before_publish()
            except BaseException as e:  # re-raised in the main thread, before publishing
                check_box["error"] = e

        checker = threading.Thread(target=run_check, name="structure-check", daemon=True)
        checker.start()

    with atomic_dir(out_dir, force=force, durable=durable) as tmp:
        bar, tick = _progress_bar(total, "expand", progress)
        weight_map = {}
        for f in files:
            # The originals first, in source order: their bytes are the input's data section,
            # copied in one range as cp would. Then each new block, its tensors in source order
            # (read again while the input shard is still in the page cache).
            plans = sorted(per_file[f], key=lambda kp: (kp.new_layer is not None, kp.new_layer or 0,
                                                        table[kp.src_key].start))
            out_name = f.name
            entries = [(kp.out_key, table[kp.src_key].dtype, table[kp.src_key].shape,
                        table[kp.src_key].nbytes) for kp in plans]
            src_meta = read_header(f)[0].get("__metadata__")
            src_fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(src_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger readahead, as cp asks
            dst_fd = os.open(tmp / out_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(dst_fd, _header_bytes(entries, src_meta))
                for zero, start, nbytes in _runs(plans, table):
                    if zero:
                        _write_zeros(dst_fd, nbytes, tick)
                    else:
                        _copy_range(src_fd, dst_fd, start, nbytes, tick)
                for kp in plans:
                    weight_map[kp.out_key] = out_name
                _end_file(dst_fd)
            finally:
                os.close(src_fd)
                os.close(dst_fd)
        if bar:
            bar.close()
        if sharded:
            (tmp / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n")
        copy_side_files(base_dir, tmp)
        meta = {
            "version": METADATA_VERSION,
            "kind": "expanded",
            "base": {
                "path": base_ref or str(base_dir),
                "fingerprint": base_fp,
                "model_type": model_type,
                "num_layers": n,
                "config": config,
            },
            "family": family.name,
            **placement.to_dict(),
            "zeroed_in_new_blocks": zeroed,
            "config_keys_changed": changed,
            "created_by": "llamapro.stream_expand",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "verification": None,
        }
        meta.update(generation_lineage(read_metadata(base_dir), placement, base_fp))
        meta["zero_bytes_checked"] = check_new_blocks_zero(tmp, meta)
        if checker is not None:
            checker.join()
            if "error" in check_box:
                raise check_box["error"]
            meta["structure_check"] = check_box["result"]
        write_metadata(tmp, meta)
        if prove is not None:
            meta = prove(tmp, meta)
    return meta


def generation_lineage(prior: dict | None, placement: Placement, base_fp: str) -> dict:
    """``generation`` and ``generations`` of an expansion of a model whose metadata is ``prior``:
    each earlier generation's blocks renumbered into the new stack (they stay frozen: only
    ``new_layer_indices``, this generation's, train), then this generation."""
    earlier = []
    if prior and prior.get("new_layer_indices"):
        earlier = prior.get("generations") or [{
            "generation": int(prior.get("generation") or 1),
            "new_layer_indices": list(prior["new_layer_indices"]),
            "base_fingerprint": (prior.get("base") or {}).get("fingerprint"),
            "packs": [p.get("name") for p in prior.get("packs") or []] or None,
        }]
        for g in earlier:
            if prior.get("training") and g is earlier[-1] and "training" not in g:
                t = prior["training"]
                g["training"] = {k: t.get(k) for k in ("mode", "steps", "tokens", "originals_frozen")}
    o2e = placement.orig_to_expanded()
    gens = [{**g, "new_layer_indices": [o2e[int(i)] for i in g["new_layer_indices"]]} for g in earlier]
    gen = (max(int(g["generation"]) for g in gens) if gens else 0) + 1
    gens.append({"generation": gen, "new_layer_indices": list(placement.new_indices),
                 "base_fingerprint": base_fp})
    return {"generation": gen, "generations": gens,
            "frozen_layer_indices": sorted(i for g in gens[:-1] for i in g["new_layer_indices"])}


def _data_ranges(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The parts of [start, end) that hold data, per the file system (SEEK_DATA / SEEK_HOLE); the
    rest are holes, which read as zeros by definition. The whole range when the file system
    cannot tell."""
    import errno

    out, pos = [], start
    try:
        while pos < end:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                    break
                raise
            if d >= end:
                break
            h = min(os.lseek(fd, d, os.SEEK_HOLE), end)
            out.append((d, h))
            pos = h
    except (AttributeError, OSError):  # no SEEK_DATA here: treat it all as data, read it back
        return [(start, end)]
    return out


def check_new_blocks_zero(model_dir: Path, meta: dict) -> int:
    """Confirm every zeroed tensor of every new block is all zero bytes: holes (which the file
    system reads as zeros) are skipped, any data in the range is read back. Returns the number of
    bytes confirmed. Cheap (residual writers only) and size-independent."""
    table = tensor_table(Path(model_dir))
    prefix = layers_prefix(table.keys(), meta["num_layers"])
    checked = 0
    for j in meta["new_layer_indices"]:
        for rest in meta["zeroed_in_new_blocks"]:
            key = f"{prefix}{j}.{rest}"
            if key not in table:
                continue  # e.g. a Qwen-MoE dense layer has no experts
            t = table[key]
            with open(t.file, "rb") as f:
                for a, b in _data_ranges(f.fileno(), t.start, t.start + t.nbytes):
                    f.seek(a)
                    left = b - a
                    while left:
                        chunk = f.read(min(left, _CHUNK))
                        if not chunk:
                            raise CheckpointError(f"{model_dir}: {t.file.name} ends inside {key}")
                        if chunk.count(0) != len(chunk):
                            raise CheckpointError(f"{model_dir}: new block tensor {key} is not zero")
                        left -= len(chunk)
            checked += t.nbytes
    return checked


def stream_strip(expanded_dir: Path, out_dir: Path, force: bool = False, progress: bool = True) -> dict:
    """Remove the recorded new blocks: the base's layer numbering and config come back.

    Returns a summary including whether the result's fingerprint equals the recorded base's.
    """
    expanded_dir, out_dir = Path(expanded_dir), Path(out_dir)
    meta = require_metadata(expanded_dir)
    config = read_config(expanded_dir)
    new_idx = sorted(int(i) for i in meta["new_layer_indices"])
    n_total = num_layers_of(config)
    if n_total != meta["num_layers"]:
        raise CheckpointError(
            f"{expanded_dir}: config has {n_total} layers but the metadata says {meta['num_layers']}"
        )
    keep = [i for i in range(n_total) if i not in set(new_idx)]
    e2o = {e: o for o, e in enumerate(keep)}
    files = weight_files(expanded_dir)
    table = tensor_table(expanded_dir)
    prefix = layers_prefix(table.keys(), n_total)
    base_cfg = (meta.get("base") or {}).get("config")
    out_config = strip_config(config, base_cfg, new_idx)

    plans: dict[Path, list[tuple[str, str]]] = {f: [] for f in files}
    for k, t in table.items():
        parts = split_layer_key(k)
        if parts and parts[0] == prefix:
            if parts[1] in e2o:
                plans[t.file].append((f"{prefix}{e2o[parts[1]]}.{parts[2]}", k))
        else:
            plans[t.file].append((k, k))
    total = sum(table[s].nbytes for lst in plans.values() for _, s in lst)
    with atomic_dir(out_dir, force=force) as tmp:
        bar, tick = _progress_bar(total, "strip", progress)
        weight_map = {}
        for f in files:
            lst = sorted(plans[f])
            entries = [(o, table[s].dtype, table[s].shape, table[s].nbytes) for o, s in lst]
            src_fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(src_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            dst_fd = os.open(tmp / f.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(dst_fd, _header_bytes(entries, read_header(f)[0].get("__metadata__")))
                for o, s in lst:
                    _copy_range(src_fd, dst_fd, table[s].start, table[s].nbytes, tick)
                    weight_map[o] = f.name
            finally:
                os.close(src_fd)
                os.close(dst_fd)
        if bar:
            bar.close()
        if (expanded_dir / INDEX_FILE).is_file() or len(files) > 1:
            (tmp / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2, sort_keys=True) + "\n")
        copy_side_files(expanded_dir, tmp)
        fp = fingerprint(tmp)
    want = (meta.get("base") or {}).get("fingerprint")
    return {"out": str(out_dir), "removed_layers": new_idx, "fingerprint": fp,
            "base_fingerprint": want, "equals_base": fp == want}


def save_expanded_model(model, out_dir: Path, meta: dict, tokenizer_dir: Path | None = None,
                        force: bool = False) -> None:
    """Save an in-memory expanded model (the module path) as a standard HF dir + metadata."""
    with atomic_dir(Path(out_dir), force=force) as tmp:
        model.save_pretrained(tmp)
        if tokenizer_dir is not None:
            copy_side_files(Path(tokenizer_dir), tmp, skip=("generation_config.json",))
        write_metadata(tmp, meta)
