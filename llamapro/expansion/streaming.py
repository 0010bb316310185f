"""Streaming expansion and stripping of a safetensors checkpoint, without loading it.

Each output file's header is computed from the input headers, then every tensor's bytes are copied
range by range (``os.copy_file_range``, so the kernel moves them) or written as holes (zeros) for
the residual writers of new blocks. Memory stays at a few MB whatever the model size; no tensor is
ever materialised. Outputs are published with ``tensors.atomic_dir``. No torch needed here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from llamapro.artifacts import METADATA_VERSION, read_metadata, require_metadata, write_metadata
from llamapro.errors import CheckpointError, UnsupportedModelError
from llamapro.expansion.families import (
    Family,
    expand_config,
    family_for,
    is_quantized,
    layers_prefix,
    num_layers_of,
    plan_keys,
    split_layer_key,
    strip_config,
)
from llamapro.expansion.strategies import Placement
from llamapro.tensors import (
    CHUNK,
    INDEX_FILE,
    atomic_dir,
    copy_range,
    copy_side_files,
    end_file,
    fingerprint,
    header_bytes,
    progress_bar,
    read_config,
    read_header,
    tensor_table,
    weight_files,
    write_zeros,
)


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
        bar, tick = progress_bar(total, "expand", progress)
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
                os.write(dst_fd, header_bytes(entries, src_meta))
                for zero, start, nbytes in _runs(plans, table):
                    if zero:
                        write_zeros(dst_fd, nbytes, tick)
                    else:
                        copy_range(src_fd, dst_fd, start, nbytes, tick)
                for kp in plans:
                    weight_map[kp.out_key] = out_name
                end_file(dst_fd)
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
                        chunk = f.read(min(left, CHUNK))
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
        bar, tick = progress_bar(total, "strip", progress)
        weight_map = {}
        for f in files:
            lst = sorted(plans[f])
            entries = [(o, table[s].dtype, table[s].shape, table[s].nbytes) for o, s in lst]
            src_fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(src_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            dst_fd = os.open(tmp / f.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(dst_fd, header_bytes(entries, read_header(f)[0].get("__metadata__")))
                for o, s in lst:
                    copy_range(src_fd, dst_fd, table[s].start, table[s].nbytes, tick)
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
