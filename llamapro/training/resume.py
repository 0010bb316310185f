"""Checkpoints that are safe to resume from: every rank's files listed with their sizes and SHA-256
in a manifest written last, the kept checkpoints tried newest first (a corrupt or incomplete one is
named and skipped), and DeepSpeed's state loaded without ever unpickling code (``weights_only``).

Checkpoints live on shared storage that other people and jobs can write: a pickle there is code. So
no file of a checkpoint is loaded with a full unpickler: :func:`safe_torch_load` allows tensors,
plain containers and the three DeepSpeed classes its ZeRO state holds (:data:`DEEPSPEED_SAFE_GLOBALS`),
and :func:`deepspeed_safe_loading` routes DeepSpeed's own loader (and any ``torch.load`` it calls
while restoring) through it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from llamapro.errors import CheckpointError, TrainingError

STATE_FILE = "trainer_state.json"
TRAINED_FILE = "trained.safetensors"
MANIFEST = "manifest-rank{rank}.json"
_MANIFEST_RE = re.compile(r"manifest-rank(\d+)\.json")
_HASH_CHUNK = 1 << 22

# The classes (besides tensors and plain data) in DeepSpeed 0.19's ZeRO optimizer state, found with
# torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-0/1/2/3 checkpoints, fp32 and bf16.
# Unpickling them only sets attributes (no __reduce__ to arbitrary callables, no __setstate__ code).
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # fp16 (a user's deepspeed_config)
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _safe_globals() -> list:
    import importlib

    out = []
    for qual in DEEPSPEED_SAFE_GLOBALS:
        mod, _, name = qual.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):  # another DeepSpeed: its files are refused instead
            continue
    return out


_TORCH_LOAD = torch.load  # the real one, whatever deepspeed_safe_loading patches in meanwhile


def safe_torch_load(path, map_location=None, mmap: bool = False):
    """``torch.load(path, weights_only=True)`` with only :data:`DEEPSPEED_SAFE_GLOBALS` added;
    anything else in the pickle (a callable, an unknown class) raises :class:`CheckpointError`
    before it is touched."""
    import pickle

    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
            what = f"global {found.group(1)}" if found else (lines[0] if lines else "an object")
            raise CheckpointError(
                f"refused to load {path}: it holds {what}, not only tensors and plain data "
                "(a checkpoint is never unpickled: it could run code)") from e


@contextmanager
def deepspeed_safe_loading(engine):
    """While DeepSpeed restores ``engine``, its checkpoint engine's ``load`` is
    :func:`safe_torch_load`, and so is any ``torch.load`` it calls directly."""

    class _SafeLoads:
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def load(self, path, map_location=None):
            return safe_torch_load(path, map_location=map_location)

    def _forced(f, map_location=None, *args, **kwargs):  # weights_only=False is not honoured
        return safe_torch_load(f, map_location=map_location)

    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _SafeLoads(inner)
    torch.load = _forced
    try:
        yield
    finally:
        torch.load = _TORCH_LOAD
        engine.checkpoint_engine = inner


# --- manifests --------------------------------------------------------------------------------------

def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(d: Path, rank: int, world: int, step: int) -> Path:
    """List every file this rank wrote under ``d`` (size, SHA-256): written last, so a checkpoint
    with every rank's manifest is complete, and each file can be checked against it."""
    files = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and not _MANIFEST_RE.fullmatch(p.name):
            files[p.relative_to(d).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    out = d / MANIFEST.format(rank=rank)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rank": rank, "world": world, "global_step": step, "files": files}))
    os.replace(tmp, out)
    return out


def _read_manifest(d: Path, rank: int) -> dict:
    p = d / MANIFEST.format(rank=rank)
    if not p.is_file():
        raise CheckpointError(f"no {p.name}: incomplete (rank {rank} never finished writing it)")
    try:
        m = json.loads(p.read_text())
        if isinstance(m["files"], dict) and int(m["world"]) >= 1:
            return m
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{p.name} is unreadable ({type(e).__name__})") from e
    raise CheckpointError(f"{p.name} is malformed")


def validate(d: Path, rank: int) -> None:
    """Raise :class:`CheckpointError` (saying why) unless ``d`` is a complete, intact checkpoint
    that this rank can resume from: every rank's manifest, every file at its size, the files this
    rank reads (rank 0's and its own) at their SHA-256, the state readable, and every ``.pt`` it
    reads made of tensors and plain data only."""
    first = _read_manifest(d, 0)
    world = int(first["world"])
    manifests = {0: first, **{r: _read_manifest(d, r) for r in range(1, world)}}
    for r, m in manifests.items():
        for rel, info in m["files"].items():
            p = d / rel
            if not p.is_file():
                raise CheckpointError(f"{rel} (rank {r}) is missing")
            if p.stat().st_size != info["size"]:
                raise CheckpointError(f"{rel} (rank {r}) has {p.stat().st_size} bytes, "
                                      f"the manifest says {info['size']}")
    mine = {rel: info for r in sorted({0, rank} & set(manifests)) for rel, info in manifests[r]["files"].items()}
    for rel, info in mine.items():
        if _sha256(d / rel) != info["sha256"]:
            raise CheckpointError(f"{rel} does not match its SHA-256 in the manifest")
    if STATE_FILE not in first["files"]:
        raise CheckpointError(f"rank 0 wrote no {STATE_FILE}")
    try:
        state = json.loads((d / STATE_FILE).read_text())
        int(state["stage"]), int(state["global_step"]), int(state["step_in_stage"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{STATE_FILE} is unreadable ({type(e).__name__}: {e})") from e
    for rel in mine:
        if rel.endswith(".pt"):  # the pickle stream is scanned; mmap leaves the tensors unread
            safe_torch_load(d / rel, map_location="cpu", mmap=zipfile.is_zipfile(d / rel))


# --- choosing the checkpoint to resume from ---------------------------------------------------------

@dataclass
class Resumed:
    """The checkpoint resumed from: its local copy, where it is stored, and the newer ones
    skipped (``(storage path, reason)``, newest first)."""

    local_dir: Path
    source: str
    rejected: list[tuple[str, str]] = field(default_factory=list)


def _gather_reasons(reason: str | None) -> list[str | None]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [reason]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, reason)
    return out


def first_valid(candidates: Iterable[tuple[str, Callable[[Path], None]]], rank: int,
                gather: Callable[[str | None], list] = _gather_reasons) -> Resumed:
    """The newest of ``candidates`` (``(source, fetch into a local dir)``, newest first) that every
    rank finds valid (``gather`` shares each rank's verdict, so all ranks pick the same one);
    :class:`CheckpointError` naming each one and why when none is."""
    rejected: list[tuple[str, str]] = []
    for source, fetch in candidates:
        local = Path(tempfile.mkdtemp(prefix="llamapro-resume-"))
        try:
            fetch(local)
            validate(local, rank)
            reason = None
        except CheckpointError as e:
            reason = str(e)
        except Exception as e:  # unreadable storage, a torn zip, ...: the same verdict
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        verdicts = gather(reason)
        bad = [(r, v) for r, v in enumerate(verdicts) if v is not None]
        if not bad:
            return Resumed(local, source, rejected)
        shutil.rmtree(local, ignore_errors=True)
        r, why = bad[0]
        rejected.append((source, why if r == rank else f"rank {r}: {why}"))
    if not rejected:
        raise CheckpointError("no checkpoint to resume from")
    raise CheckpointError(
        f"no usable checkpoint among the {len(rejected)} kept: "
        + "; ".join(f"{s}: {why}" for s, why in rejected)
        + ". Move them away (or train under a new run name) to start over")


def kept_checkpoints(latest) -> list:
    """Ray Train's kept checkpoints of this run, newest first: ``latest`` (what
    ``ray.train.get_checkpoint`` returned), then the older ones its checkpoint manager's snapshot
    (beside them) still lists; just ``latest`` when the snapshot cannot be read."""
    import ray.train

    fs, parent = latest.filesystem, os.path.dirname(latest.path.rstrip("/"))
    try:
        with fs.open_input_stream(f"{parent}/checkpoint_manager_snapshot.json") as f:
            snap = json.loads(f.read())
        results = snap["checkpoint_results"]
        order = snap.get("checkpoint_report_indices") or list(range(len(results)))
        names = [r["checkpoint_dir_name"] for _, r in sorted(zip(order, results), key=lambda t: -t[0])]
    except Exception:  # no snapshot (another layout): only the latest is known
        names = []
    out, seen = [latest], {os.path.basename(latest.path.rstrip("/"))}
    for name in names:
        if name not in seen:
            seen.add(name)
            out.append(ray.train.Checkpoint(path=f"{parent}/{name}", filesystem=fs))
    return out


def resume_from_ray(rank: int) -> Resumed | None:
    """The checkpoint this worker resumes from (the same on every rank), fetched to a local
    directory: Ray Train's latest if intact, else the newest intact older one kept; None on a
    fresh run."""
    import ray.train

    latest = ray.train.get_checkpoint()
    if latest is None:
        return None
    # rank 0's list for everyone: a rank that could not read the snapshot must not try fewer
    kept = {c.path: c for c in kept_checkpoints(latest)}
    paths = _from_rank0(list(kept))
    fs = latest.filesystem
    return first_valid(((p, lambda d, c=kept.get(p) or ray.train.Checkpoint(path=p, filesystem=fs):
                         c.to_directory(str(d))) for p in paths), rank)


def _from_rank0(obj):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- writing one: a full disk is named, not a traceback -----------------------------------------------

# errno of a write that found no room: the file system is full, the user's quota is spent, or the
# process's file-size limit (RLIMIT_FSIZE) is reached
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# what the same failure reads as where the errno is lost on the way up: pyarrow's copy keeps the
# strerror text; torch.save's C++ writer only says it stopped short ("unexpected pos", "file write
# failed"), which is what a full disk does to it
_NO_ROOM_TEXT = re.compile(r"no space left|disk quota|file too large", re.IGNORECASE)
_SHORT_WRITE = re.compile(r"unexpected pos [\d]+ vs [\d]+|file write failed", re.IGNORECASE)
_LOW_SPACE = 1 << 30


def _no_room(e: BaseException | None) -> tuple[str, bool] | None:
    """Why ``e`` (or an exception it was raised from) looks like a write that found no room, and
    whether that is certain (an errno or its text) rather than a write that stopped short."""
    seen, short = set(), None
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_ROOM:
            return f"[Errno {e.errno}] {os.strerror(e.errno)}", True
        for ln in str(e).splitlines():
            if _NO_ROOM_TEXT.search(ln):
                return ln.strip()[:200], True
            if short is None and (m := _SHORT_WRITE.search(ln)):
                short = f"torch.save's writer stopped short ({m.group(0)})"
        e = e.__cause__ or e.__context__
    return (short, False) if short else None


def _room(where: Path) -> tuple[str, bool]:
    """The free space of the file system holding ``where`` and the file-size limit, if any; and
    whether either is small enough to explain a write that stopped short."""
    import resource

    p = Path(where)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
        text, low = f"{free / 2**20:,.0f} MiB free on the file system of {p}", free < _LOW_SPACE
    except OSError:
        text, low = f"free space of {p} unknown", False
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        text, low = text + f", file-size limit (RLIMIT_FSIZE) {soft:,} bytes", True
    return text, low


@contextmanager
def writing_checkpoint(where: Path, step: int):
    """Around writing (and reporting) the checkpoint of ``step`` whose files go to ``where``: a
    write that finds no room (disk full, quota, file-size limit) becomes one :class:`TrainingError`
    that says so, what was lost and how to go on, instead of DeepSpeed's, torch's or pyarrow's
    traceback. Nothing of that checkpoint is kept (the caller removes its temporary; Ray Train
    registers a checkpoint only when every rank reported it, and resume validates each against its
    manifests), so the run resumes from the previous one."""
    try:
        yield
    except Exception as e:
        found = _no_room(e)
        if found is None:
            raise
        why, certain = found
        room, low = _room(where)
        what = "disk full" if certain or low else "a write failed (is the disk full?)"
        raise TrainingError(
            f"{what}: the checkpoint of step {step} could not be written to {where} ({why}; {room}). "
            "Nothing of it is kept: free space (or lower train.keep_checkpoints) and rerun the same "
            "command, it resumes from the previous checkpoint") from e
