"""Composing a base with packs: where every layer of the result comes from, its config, and each
pack's record; a pack fits either stacked (on the model built so far) or as a sibling (on the base
itself), checked by fingerprint."""

from __future__ import annotations

from dataclasses import dataclass, field

from llamapro.errors import PackError
from llamapro.expansion.families import expand_config
from llamapro.expansion.strategies import Placement
from llamapro.publish.pack.sources import Base, PackSource
from llamapro.tensors import TensorInfo, config_digest, fingerprint_of


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
