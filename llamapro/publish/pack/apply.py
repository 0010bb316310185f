"""``llamapro apply BASE PACK [PACK ...] OUT`` and ``llamapro strip MODEL OUT --pack NAME``: a
standard checkpoint streamed from a base and packs (no tensor materialised), proven to be the base
with the packs' blocks skipped before it is published."""

from __future__ import annotations

import time
from pathlib import Path

from llamapro.artifacts import METADATA_VERSION, ExpansionMetadata, require_metadata, write_metadata
from llamapro.errors import PackError
from llamapro.expansion.api import resolve_local
from llamapro.expansion.families import num_layers_of
from llamapro.expansion.strategies import Placement
from llamapro.publish.pack.compose import Composition, compose, table_of
from llamapro.publish.pack.sources import Base, PackSource, read_base, read_pack, split_layers
from llamapro.tensors import (
    atomic_dir,
    config_digest,
    fingerprint,
    read_config,
    tensor_digest,
    tensor_table,
    write_tensor_dir,
)


def _meta_for(base: Base, comp: Composition, packs_note: dict | None = None) -> ExpansionMetadata:
    """The ``llamapro.json`` of an applied model: the base, every pack's blocks as new layers, the
    packs' records and the layout (where each layer came from)."""
    new = comp.all_new()
    pl = Placement(base.num_layers, tuple(new), "packs")
    return ExpansionMetadata({"version": METADATA_VERSION, "kind": "applied",
            "base": {"path": base.path, "fingerprint": base.fingerprint,
                     "model_type": base.config.get("model_type"), "num_layers": base.num_layers,
                     "config": base.config},
            **pl.to_dict(), "zeroed_in_new_blocks": [], "config_keys_changed": [],
            "packs": comp.records, "layout": [list(t) for t in comp.layout],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(packs_note or {})})


def prove_base(model_dir: Path, base: Base, meta: dict) -> dict:
    """With every pack block removed, the model at ``model_dir`` is the base: every remaining
    tensor equal byte for byte (full sha256 of both), the config the base's. Tensors equal and
    config equal is stronger than equal logits: the same code computes the same function."""
    meta = ExpansionMetadata.of(meta)
    table = tensor_table(model_dir)
    n = num_layers_of(read_config(model_dir))
    prefix, layers, other = split_layers(table, n)
    new = set(meta.new_layer_indices)
    stripped = dict(other)
    for o, i in enumerate(i for i in range(n) if i not in new):
        stripped.update({f"{prefix}{o}.{rest}": t for rest, t in layers[i]})
    want = table_of(base, [], [("base", o) for o in range(base.num_layers)])
    bad = sorted(set(stripped) ^ set(want))
    bad += [k for k in sorted(set(stripped) & set(want))
            if (stripped[k].dtype, stripped[k].shape) != (want[k].dtype, want[k].shape)
            or tensor_digest(stripped[k]) != tensor_digest(want[k])]
    cfg_ok = config_digest(meta.base.config) == config_digest(base.config)
    return {"ok": not bad and cfg_ok, "kind": "tensors", "reference": base.path,
            "statement": "with every pack's blocks skipped, each tensor equals the base's byte for byte "
                         f"({len(want)} tensors, {sum(t.nbytes for t in want.values()) / 1e6:.1f} MB compared) "
                         "and the config is the base's",
            "tensors_compared": len(want), "differing": bad[:8],
            "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _write_composed(base: Base, packs: list[PackSource], comp: Composition, out: Path, force: bool,
                    progress: bool, side_from: Path, meta_extra: dict | None = None) -> dict:
    """Stream the composed model to ``out``; with packs, prove it is the base with their blocks
    skipped before publishing. Without packs it is the base itself (no llamapro.json)."""
    meta = _meta_for(base, comp, meta_extra)
    with atomic_dir(out, force=force) as tmp:
        write_tensor_dir(tmp, table_of(base, packs, comp.layout), comp.config, side_from,
                         progress=progress, desc="apply")
        if packs:
            meta.verification = v = prove_base(tmp, base, meta)
            if not v["ok"]:  # only if a file changed under us: never publish it
                raise PackError(f"the written model minus its packs is not the base (tensors "
                                f"{v['differing']}); nothing was published")
            last = comp.records[-1]
            meta["equals_trained_model"] = (
                last["mode"] == "stacked"
                and fingerprint(tmp) == (last["pack"].get("trained") or {}).get("fingerprint"))
            write_metadata(tmp, meta)
        fp = fingerprint(tmp)
    return {"out": str(out), "fingerprint": fp, "num_layers": len(comp.layout),
            "packs": [{k: r[k] for k in ("name", "mode", "positions")} for r in comp.records],
            "verification": meta.verification if packs else None,
            "equals_trained_model": meta.get("equals_trained_model"),
            "equals_base": fp == base.fingerprint}


def apply_packs(base, packs, out, force: bool = False, progress: bool = False) -> dict:
    """``llamapro apply BASE PACK [PACK ...] OUT``: a standard HF checkpoint of the base with the
    packs' blocks inserted, streamed; every pack's base checked by fingerprint first, and the
    result proven to be the base with the blocks skipped before it is published."""
    if not packs:
        raise PackError("give at least one pack: llamapro apply BASE PACK [PACK ...] OUT")
    out = Path(out)
    b = read_base(resolve_local(str(base)))
    if out.resolve() == Path(b.path).resolve():
        raise PackError("OUT is the base directory; choose a new path")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise PackError(f"{out} already exists; choose another path or pass --force to replace it")
    srcs = [read_pack(p) for p in packs]
    names = [s.name for s in srcs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PackError(f"packs named {dup} given more than once; each pack can be applied once")
    comp = compose(b, srcs)
    return _write_composed(b, srcs, comp, out, force, progress, Path(b.path))


def strip_pack(applied, out, pack: str, force: bool = False, progress: bool = False) -> dict:
    """Remove one pack (by name or position in the stack, 0 first) from an applied model: the
    result is exactly what ``apply`` of the other packs to the base writes."""
    src = Path(applied)
    if Path(out).resolve() == src.resolve():
        raise PackError("OUT is the model being stripped; choose a new path")
    meta = require_metadata(src)
    if meta.kind != "applied" or not meta.packs:
        raise PackError(f"{src} was not made by `llamapro apply` (no packs recorded); use `llamapro strip` "
                        "without --pack to remove all inserted blocks")
    records = meta.packs
    names = [r["name"] for r in records]
    if pack in names:
        k = names.index(pack)
    elif pack.isdigit() and int(pack) < len(records):
        k = int(pack)
    else:
        raise PackError(f"{src} has no pack {pack!r}; its packs, in stack order: {names}")
    base_meta = meta.base
    config = read_config(src)
    n = num_layers_of(config)
    table = tensor_table(src)
    prefix, layers, other = split_layers(table, n)
    layout = [tuple(t) for t in meta["layout"]]
    if len(layout) != n:
        raise PackError(f"{src}: llamapro.json records {len(layout)} layers, the config {n}")
    base_layers = {t[1]: layers[i] for i, t in enumerate(layout) if t[0] == "base"}
    base = Base(base_meta.path, base_meta.config, base_meta.fingerprint, prefix, base_layers, other)
    keep = [j for j in range(len(records)) if j != k]
    srcs = []
    for j in keep:
        ls = {t[2]: layers[i] for i, t in enumerate(layout) if t[0] == "pack" and t[1] == j}
        srcs.append(PackSource(records[j]["pack"], ls, f"{src} (pack {records[j]['name']})"))
    try:
        comp = compose(base, srcs)
    except PackError as e:
        raise PackError(f"cannot remove pack {names[k]} alone: a pack after it was grown on top of it "
                        f"({e}). Remove the packs stacked on it first.") from e
    # the base's tensors live in this model itself: the proof compares with them
    res = _write_composed(base, srcs, comp, Path(out), force, progress, src, {"stripped_from": str(src)})
    res["removed"] = names[k]
    return res
