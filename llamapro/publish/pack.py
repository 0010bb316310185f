"""Expansion packs: what a llamapro run learned, as a small artifact of its own.

With the originals frozen, a trained expansion differs from its base only in the inserted blocks.
A pack holds exactly those: ``blocks.safetensors`` (the blocks' tensors, named as in the trained
model), ``pack.json`` (insertion map, the base's fingerprint and config digest, the trained
model's config and fingerprint, the training lineage) and a model card ``README.md``.

``apply BASE PACK [PACK ...] OUT`` streams a standard HF checkpoint from the base and the packs
(no tensor is materialised). Each pack must fit where it goes, by fingerprint:

* **stacked**: its recorded base is the model built so far (the first pack on its base; a
  generation-2 pack on the generation-1 model it was grown from). Its blocks go exactly where
  they were trained, and the config is the trained model's: one pack on its base gives back the
  trained model, tensors and config.
* **sibling**: its recorded base is BASE itself, while other packs are already applied. Each of
  its blocks goes into the same gap between original layers it was trained in, after the blocks
  already there (so the order of the command line decides).

The output's ``llamapro.json`` keeps every pack (its positions in the final model, its own
positions, its config), so ``strip --pack NAME`` removes any one of them and writes exactly what
``apply`` of the others would have written. A pack that another was stacked on cannot be removed
under it.

Adapters (LoRA on the new blocks): training merges them into the blocks when the run ends, and a
checkpoint that still carries a PEFT adapter is merged before packing, so a pack always holds
plain block weights (one format to apply, stack and serve; the blocks are small either way).

No torch at module level (only the merge of an adapter and :func:`load_packs_into` need it).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from llamapro.checkpoint import (
    METADATA_VERSION,
    CheckpointError,
    TensorInfo,
    atomic_dir,
    config_digest,
    fingerprint,
    fingerprint_of,
    read_config,
    read_metadata,
    require_metadata,
    tensor_digest,
    tensor_table,
    write_json_atomic,
    write_metadata,
    write_tensor_dir,
    write_tensor_file,
)
from llamapro.expand.families import expand_config, layers_prefix, num_layers_of, split_layer_key
from llamapro.expand.strategies import Placement
from llamapro.errors import PackError  # noqa: F401

PACK_FILE = "pack.json"
BLOCKS_FILE = "blocks.safetensors"
CARD_FILE = "README.md"
PACK_FORMAT = "llamapro-pack"
PACK_VERSION = 1


# --- sources: a base or a pack as layers of tensors ------------------------------------------------

Layers = dict[int, list[tuple[str, TensorInfo]]]  # layer index -> (name inside the layer, tensor)


def _split(table: dict[str, TensorInfo], num_layers: int) -> tuple[str, Layers, dict[str, TensorInfo]]:
    """(layers prefix, tensors per layer, tensors outside the layers) of a checkpoint's table."""
    prefix = layers_prefix(table.keys(), num_layers)
    layers: Layers = {}
    other = {}
    for k, t in table.items():
        parts = split_layer_key(k)
        if parts and parts[0] == prefix:
            layers.setdefault(parts[1], []).append((parts[2], t))
        else:
            other[k] = t
    for v in layers.values():
        v.sort(key=lambda rt: rt[0])
    return prefix, layers, other


@dataclass
class Base:
    path: str
    config: dict
    fingerprint: str
    prefix: str
    layers: Layers
    other: dict[str, TensorInfo]

    @property
    def num_layers(self) -> int:
        return num_layers_of(self.config)


@dataclass
class PackSource:
    """A pack to compose: its ``pack.json`` (``info``) and where its blocks' tensors are."""

    info: dict
    layers: Layers
    path: str = ""

    @property
    def name(self) -> str:
        return self.info["name"]

    @property
    def positions(self) -> list[int]:
        return sorted(int(i) for i in self.info["positions"])


@dataclass
class Composition:
    layout: list[tuple]  # ("base", original index) or ("pack", k, index in pack k's trained model)
    config: dict
    records: list[dict] = field(default_factory=list)
    fingerprints: list[str] = field(default_factory=list)  # of the model after each pack

    def positions(self, k: int) -> list[int]:
        return [i for i, t in enumerate(self.layout) if t[0] == "pack" and t[1] == k]

    def all_new(self) -> list[int]:
        return [i for i, t in enumerate(self.layout) if t[0] == "pack"]


def read_base(model_dir) -> Base:
    d = Path(model_dir)
    config = read_config(d)
    table = tensor_table(d)
    prefix, layers, other = _split(table, num_layers_of(config))
    return Base(str(d), config, fingerprint(d), prefix, layers, other)


def read_pack(pack_dir) -> PackSource:
    """A pack directory, checked: format, version, and blocks that are exactly the recorded ones."""
    d = Path(pack_dir)
    f = d / PACK_FILE
    if not f.is_file():
        raise PackError(f"{d} is not a llamapro pack (no {PACK_FILE}); make one with `llamapro pack RUN OUT`")
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise PackError(f"{f}: not readable JSON ({e})") from e
    if not isinstance(info, dict) or info.get("format") != PACK_FORMAT:
        raise PackError(f"{f}: not a llamapro pack (format {info.get('format') if isinstance(info, dict) else None!r})")
    if info.get("version") != PACK_VERSION:
        raise PackError(f"{f}: pack version {info.get('version')!r}; this llamapro reads version {PACK_VERSION}")
    if not (d / BLOCKS_FILE).is_file():
        raise PackError(f"{d}: {BLOCKS_FILE} is missing")
    from llamapro.checkpoint import read_header

    header, ds = read_header(d / BLOCKS_FILE)
    table = {}
    for k, v in header.items():
        if k != "__metadata__":
            a, b = v["data_offsets"]
            table[k] = TensorInfo(k, v["dtype"], list(v["shape"]), d / BLOCKS_FILE, ds + a, b - a)
    layers: Layers = {}
    for k, t in table.items():
        parts = split_layer_key(k)
        if not parts or parts[0] != info.get("layers_prefix"):
            raise PackError(f"{d / BLOCKS_FILE}: tensor {k} is not a layer under {info.get('layers_prefix')!r}")
        layers.setdefault(parts[1], []).append((parts[2], t))
    for v in layers.values():
        v.sort(key=lambda rt: rt[0])
    pos = sorted(int(i) for i in info.get("positions") or [])
    if not pos or sorted(layers) != pos:
        raise PackError(f"{d}: the blocks file holds layers {sorted(layers)} but {PACK_FILE} records "
                        f"positions {pos}; the pack is damaged, make it again")
    return PackSource(info, layers, str(d))


def table_of(base: Base, packs: list[PackSource], layout: list[tuple]) -> dict[str, TensorInfo]:
    """The tensor table of the model ``layout`` describes (tensors left where they are)."""
    out = dict(base.other)
    for i, tag in enumerate(layout):
        items = base.layers[tag[1]] if tag[0] == "base" else packs[tag[1]].layers[tag[2]]
        for rest, t in items:
            out[f"{base.prefix}{i}.{rest}"] = t
    return out


def compose(base: Base, packs: list[PackSource]) -> Composition:
    """Where every layer of base + packs goes, the config, and each pack's record; refuses a pack
    made for another base, naming both fingerprints."""
    L = base.num_layers
    comp = Composition([("base", o) for o in range(L)], base.config)
    cur_fp = base.fingerprint
    for k, p in enumerate(packs):
        want = (p.info.get("base") or {}).get("fingerprint")
        pos = p.positions
        n_pack = int(p.info["num_layers"])
        if p.info.get("layers_prefix") != base.prefix:
            raise PackError(f"pack {p.name}: its layers live under {p.info.get('layers_prefix')!r}, the "
                            f"base's under {base.prefix!r}: not a pack for this kind of model")
        if want == cur_fp:
            mode = "stacked"
            if n_pack != len(comp.layout) + len(pos):
                raise PackError(f"pack {p.name}: made for a model of {n_pack - len(pos)} layers, "
                                f"this one has {len(comp.layout)}")
            rest = iter(comp.layout)
            want_set = set(pos)
            layout = [("pack", k, i) if i in want_set else next(rest) for i in range(n_pack)]
            config = p.info["config"]
        elif want == base.fingerprint:
            mode = "sibling"
            if n_pack != L + len(pos):
                raise PackError(f"pack {p.name}: made for a model of {n_pack - len(pos)} layers, "
                                f"the base has {L}")
            layout = list(comp.layout)
            for j in pos:  # the gap it was trained in: after this many originals
                gap = j - sum(1 for q in pos if q < j)
                at = layout.index(("base", gap)) if gap < L else len(layout)
                layout.insert(at, ("pack", k, j))
            new = tuple(i for i, t in enumerate(layout) if t[0] == "pack" and t[1] == k)
            config = expand_config(comp.config, Placement(len(comp.layout), new, "pack"))[0]
        else:
            here = (f"BASE {base.path} has fingerprint {base.fingerprint}" if cur_fp == base.fingerprint
                    else f"neither BASE {base.path} (fingerprint {base.fingerprint}) nor the model "
                         f"built from the packs before it ({cur_fp}) is")
            same_cfg = (p.info.get("base") or {}).get("config_digest") == config_digest(base.config)
            raise PackError(
                f"pack {p.name} was made for the base with fingerprint {want}, but {here}"
                + (" (same config: the weights differ)" if same_cfg and cur_fp == base.fingerprint else "")
                + ". Apply it to the model it was trained from (its card names it: "
                f"{(p.info.get('base') or {}).get('path')}), or stack it after the packs it was grown on.")
        comp.layout, comp.config = layout, config
        cur_fp = fingerprint_of(config, table_of(base, packs[:k + 1], layout))
        comp.fingerprints.append(cur_fp)
        comp.records.append({"name": p.name, "id": p.info.get("id"), "mode": mode,
                             "base_fingerprint": want, "pack": p.info})
    for k, r in enumerate(comp.records):
        r["positions"] = comp.positions(k)
    return comp


# --- pack -----------------------------------------------------------------------------------------

def make_pack(src, out, force: bool = False, name: str | None = None, trust_remote_code: bool = False,
              say=None) -> dict:
    """``llamapro pack RUN_OR_MODEL OUT``: the inserted blocks of a trained (or just expanded)
    model as a pack. Refused when the original layers are not the base's (trained norms,
    embeddings, original_lr > 0, another dtype): the blocks alone would not give the model back."""
    from llamapro.publish.export import find_adapter, locate_source

    say = say or (lambda m: None)
    run, ckpt = locate_source(src)
    out = Path(out)
    if out.resolve() in (ckpt.resolve(), *ckpt.resolve().parents):
        raise PackError(f"{out} is (or contains) the model being packed; choose another OUT")
    meta = require_metadata(ckpt)
    new = sorted(int(i) for i in meta.get("new_layer_indices") or [])
    base = meta.get("base") or {}
    if not new or not base.get("fingerprint") or not isinstance(base.get("config"), dict):
        raise PackError(f"{ckpt}: its {Path('llamapro.json')} records no inserted layers or no base "
                        "(fingerprint and config): only a model made by `llamapro expand` (and trained) "
                        "can be packed")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise PackError(f"{out} already exists; choose another path or pass --force to replace it")
    merged_dir = None
    adapter = find_adapter(ckpt)
    try:
        weights = ckpt
        if adapter is not None:  # merge first: a pack holds plain block weights
            from llamapro.publish.export import load_merged

            say(f"merging adapter {adapter} before packing")
            model, _ = load_merged(ckpt, "auto", trust_remote_code, say)
            merged_dir = Path(tempfile.mkdtemp(prefix="llamapro-pack-merge-"))
            model.save_pretrained(merged_dir)
            del model
            weights = merged_dir
        config = read_config(weights)
        n = num_layers_of(config)
        if n != meta.get("num_layers"):
            raise PackError(f"{ckpt}: config has {n} layers but llamapro.json records {meta.get('num_layers')}")
        table = tensor_table(weights)
        prefix, layers, other = _split(table, n)
        keep = [i for i in range(n) if i not in set(new)]
        stripped = dict(other)
        for o, i in enumerate(keep):
            stripped.update({f"{prefix}{o}.{rest}": t for rest, t in layers[i]})
        if fingerprint_of(base["config"], stripped) != base["fingerprint"]:
            raise PackError(
                f"{ckpt}: without its inserted layers {new} it is not its base (fingerprint "
                f"{base['fingerprint']}): the original layers, norms, embeddings, config or dtype "
                "changed in training. The blocks alone would not give this model back; ship the fused "
                "model (`llamapro export`) instead, or train with the originals frozen "
                "(train.original_lr 0, no train_norms/train_embeddings/train_lm_head).")
        blocks = [(f"{prefix}{i}.{rest}", t) for i in new for rest, t in layers[i]]
        training = meta.get("training") or {}
        with atomic_dir(out, force=force) as tmp:
            nbytes = write_tensor_file(tmp / BLOCKS_FILE, blocks, {"format": "pt"})
            import hashlib

            h = hashlib.sha256()
            for k, t in blocks:
                h.update(f"{k}|{t.dtype}|{t.shape}|{tensor_digest(t)}\n".encode())
            info = {
                "format": PACK_FORMAT, "version": PACK_VERSION,
                "name": name or out.name,
                "id": "sha256:" + h.hexdigest(),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "base": {"fingerprint": base["fingerprint"], "config_digest": config_digest(base["config"]),
                         "model_type": base.get("model_type"), "num_layers": base.get("num_layers"),
                         "path": base.get("path")},
                "layers_prefix": prefix,
                "num_layers": n,
                "positions": new,
                "sources": meta.get("new_layer_sources"),
                "config": config,
                "trained": {"fingerprint": fingerprint(weights), "path": str(ckpt.resolve()),
                            "run": str(run.resolve()) if run else None},
                "lineage": {
                    "kind": meta.get("kind"), "strategy": meta.get("strategy"),
                    "generation": meta.get("generation", 1), "generations": meta.get("generations"),
                    "training": {k: training.get(k) for k in ("mode", "steps", "tokens", "originals_frozen",
                                                              "best_eval_loss", "trained_from")} or None,
                    "data": (training.get("config") or {}).get("data") if training else None,
                    "merged_adapter": str(adapter) if adapter else None,
                    "verification_ok": (meta.get("verification") or {}).get("ok"),
                },
                "blocks": {"file": BLOCKS_FILE, "tensors": len(blocks), "bytes": nbytes},
            }
            write_json_atomic(tmp / PACK_FILE, info, indent=2)
            (tmp / CARD_FILE).write_text(pack_card(info), encoding="utf-8")
    finally:
        if merged_dir is not None:
            shutil.rmtree(merged_dir, ignore_errors=True)
    return {"out": str(out), **{k: info[k] for k in ("name", "id", "positions", "num_layers", "blocks")},
            "base_fingerprint": base["fingerprint"]}


def pack_card(info: dict) -> str:
    b, lin, tr = info["base"], info["lineage"], info["lineage"].get("training") or {}
    return "\n".join([
        "---", "library_name: transformers", "tags:", "- llamapro", "- llama-pro", "- expansion-pack", "---", "",
        f"# {info['name']} (llamapro expansion pack)", "",
        f"{len(info['positions'])} decoder blocks trained with LLaMA-Pro block expansion, without the "
        f"{b.get('num_layers')} frozen original layers they were trained between: "
        f"{info['blocks']['bytes'] / 1e6:.1f} MB. Apply to the base to get the trained model back, "
        "tensor for tensor:", "",
        "```", f"llamapro apply BASE {info['name']} OUT", "```", "",
        "| | |", "|---|---|",
        f"| base | `{b.get('path')}` ({b.get('model_type')}, {b.get('num_layers')} layers) |",
        f"| base fingerprint | `{b['fingerprint']}` |",
        f"| base config digest | `{b['config_digest']}` |",
        f"| positions in the trained model | {info['positions']} of {info['num_layers']} layers |",
        f"| each copied from original layer | {info.get('sources')} |",
        f"| generation | {lin.get('generation')} |",
        f"| training | {tr.get('mode', 'not trained')}, {tr.get('steps', '?')} steps, originals frozen: "
        f"{tr.get('originals_frozen', '?')} |",
        f"| trained model fingerprint | `{info['trained']['fingerprint']}` |",
        f"| pack id | `{info['id']}` |", "",
        "`apply` refuses a base with another fingerprint. Several packs stack in command-line order; "
        "`llamapro strip MODEL OUT --pack NAME` removes any one of them again.", ""])


# --- apply ----------------------------------------------------------------------------------------

def _meta_for(base: Base, comp: Composition, packs_note: dict | None = None) -> dict:
    new = comp.all_new()
    pl = Placement(base.num_layers, tuple(new), "packs")
    return {"version": METADATA_VERSION, "kind": "applied",
            "base": {"path": base.path, "fingerprint": base.fingerprint,
                     "model_type": base.config.get("model_type"), "num_layers": base.num_layers,
                     "config": base.config},
            **pl.to_dict(), "zeroed_in_new_blocks": [], "config_keys_changed": [],
            "packs": comp.records, "layout": [list(t) for t in comp.layout],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(packs_note or {})}


def prove_base(model_dir: Path, base: Base, meta: dict) -> dict:
    """With every pack block removed, the model at ``model_dir`` is the base: every remaining
    tensor equal byte for byte (full sha256 of both), the config the base's. Tensors equal and
    config equal is stronger than equal logits: the same code computes the same function."""
    table = tensor_table(model_dir)
    n = num_layers_of(read_config(model_dir))
    prefix, layers, other = _split(table, n)
    new = set(meta["new_layer_indices"])
    stripped = dict(other)
    for o, i in enumerate(i for i in range(n) if i not in new):
        stripped.update({f"{prefix}{o}.{rest}": t for rest, t in layers[i]})
    want = table_of(base, [], [("base", o) for o in range(base.num_layers)])
    bad = sorted(set(stripped) ^ set(want))
    bad += [k for k in sorted(set(stripped) & set(want))
            if (stripped[k].dtype, stripped[k].shape) != (want[k].dtype, want[k].shape)
            or tensor_digest(stripped[k]) != tensor_digest(want[k])]
    cfg_ok = config_digest(meta["base"]["config"]) == config_digest(base.config)
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
            meta["verification"] = v = prove_base(tmp, base, meta)
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
            "verification": meta.get("verification") if packs else None,
            "equals_trained_model": meta.get("equals_trained_model"),
            "equals_base": fp == base.fingerprint}


def apply_packs(base, packs, out, force: bool = False, progress: bool = False) -> dict:
    """``llamapro apply BASE PACK [PACK ...] OUT``: a standard HF checkpoint of the base with the
    packs' blocks inserted, streamed; every pack's base checked by fingerprint first, and the
    result proven to be the base with the blocks skipped before it is published."""
    from llamapro.expand.api import resolve_local

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
    if meta.get("kind") != "applied" or not meta.get("packs"):
        raise PackError(f"{src} was not made by `llamapro apply` (no packs recorded); use `llamapro strip` "
                        "without --pack to remove all inserted blocks")
    records = meta["packs"]
    names = [r["name"] for r in records]
    if pack in names:
        k = names.index(pack)
    elif pack.isdigit() and int(pack) < len(records):
        k = int(pack)
    else:
        raise PackError(f"{src} has no pack {pack!r}; its packs, in stack order: {names}")
    base_meta = meta["base"]
    config = read_config(src)
    n = num_layers_of(config)
    table = tensor_table(src)
    prefix, layers, other = _split(table, n)
    layout = [tuple(t) for t in meta["layout"]]
    if len(layout) != n:
        raise PackError(f"{src}: llamapro.json records {len(layout)} layers, the config {n}")
    base_layers = {t[1]: layers[i] for i, t in enumerate(layout) if t[0] == "base"}
    base = Base(base_meta["path"], base_meta["config"], base_meta["fingerprint"], prefix, base_layers, other)
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


# --- in memory: one base, several packs, per-request selection -------------------------------------

@dataclass
class PackedModel:
    """A loaded base with every pack's blocks inserted once (what a Serve replica holds).

    ``pack_layers`` maps each pack's name to the indices of its blocks in ``model``; ``needs``
    maps it to the packs it runs with (itself, plus for a stacked pack the packs it was grown
    on). Run a request for pack NAME (or ``"base"``) inside
    ``expansion.skip_layers(packed.model, packed.skip_for(NAME))``: the skipped blocks are bypassed
    and the model computes what ``apply BASE <NAME's packs>`` computes (for ``base``: the base,
    exactly)."""

    model: object
    pack_layers: dict[str, list[int]]
    needs: dict[str, list[str]]
    composition: Composition

    @property
    def names(self) -> list[str]:
        return ["base", *self.pack_layers]

    def skip_for(self, name: str) -> list[int]:
        if name != "base" and name not in self.pack_layers:
            raise PackError(f"no pack {name!r} is loaded; loaded: {self.names}")
        active = set() if name == "base" else set(self.needs[name])
        return sorted(i for n, idx in self.pack_layers.items() if n not in active for i in idx)


def load_packs_into(model, base_dir, packs) -> PackedModel:
    """Insert the blocks of ``packs`` (pack directories, applied in order as by ``apply``) into
    ``model``, the base loaded from ``base_dir`` (any dtype or device), in place. Each pack is
    checked against the base by fingerprint exactly as ``apply`` checks it. Returns the model with
    the per-pack layer lists a caller needs to select a pack per request."""
    import copy

    from safetensors import safe_open

    from llamapro.expand.surgery import _set_module, _sync_sub_configs, find_layers, renumber_layers

    base = read_base(base_dir)
    srcs = [read_pack(p) for p in packs]
    comp = compose(base, srcs)
    path, layers = find_layers(model)
    if len(layers) != base.num_layers:
        raise PackError(f"the loaded model has {len(layers)} layers, {base_dir} has {base.num_layers}: "
                        "load the base the packs are applied to")
    src_of = Placement(base.num_layers, tuple(comp.all_new()), "packs").source_of()
    param = next(model.parameters())
    new_layers = []
    for i, tag in enumerate(comp.layout):
        if tag[0] == "base":
            new_layers.append(layers[tag[1]])
            continue
        k, j = tag[1], tag[2]
        blk = copy.deepcopy(layers[src_of[i]])
        items = srcs[k].layers[j]
        with safe_open(str(items[0][1].file), framework="pt") as f:
            sd = {rest: f.get_tensor(t.name) for rest, t in items}
        blk.load_state_dict(sd, strict=True)
        new_layers.append(blk.to(device=param.device))
    import torch

    ml = torch.nn.ModuleList(new_layers)
    renumber_layers(ml)
    _set_module(model, path, ml)
    for key, val in comp.config.items():  # depth and the per-layer lists follow the layout
        if isinstance(val, (list, int)) and not isinstance(val, bool) and hasattr(model.config, key):
            if getattr(model.config, key) != val and (isinstance(val, list) or key in
                                                      ("num_hidden_layers", "n_layer", "num_layers",
                                                       "decoder_sparse_step")):
                setattr(model.config, key, val)
    _sync_sub_configs(model, model.config)
    pack_layers = {r["name"]: comp.positions(k) for k, r in enumerate(comp.records)}
    needs = {}
    for k, r in enumerate(comp.records):
        earlier = [q["name"] for q in comp.records[:k]] if r["mode"] == "stacked" else []
        needs[r["name"]] = [*earlier, r["name"]]
    return PackedModel(model, pack_layers, needs, comp)
