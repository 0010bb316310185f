"""One base with several packs in memory (what a Serve replica holds): every pack's blocks
inserted once, and per request the blocks of the other packs skipped."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from llamapro.errors import PackError
from llamapro.expansion.strategies import Placement
from llamapro.publish.pack.compose import Composition, compose
from llamapro.publish.pack.sources import read_base, read_pack


@dataclass
class PackedModel:
    """A loaded base with every pack's blocks inserted once (what a Serve replica holds).

    ``pack_layers`` maps each pack's name to the indices of its blocks in ``model``; ``needs``
    maps it to the packs it runs with (itself, plus for a stacked pack the packs it was grown
    on). Run a request for pack NAME (or ``"base"``) inside
    ``llamapro.expansion.surgery.skip_layers(packed.model, packed.skip_for(NAME))``: the skipped blocks are bypassed
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
    from safetensors import safe_open

    # downward; local because surgery imports torch
    from llamapro.expansion.surgery import _set_module, _sync_sub_configs, find_layers, renumber_layers

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
