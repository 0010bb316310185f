"""Serving expansion packs on one base: one replica holds the base weights once, plus the blocks of
the packs requested so far; every request picks a pack (or the base) by its ``model`` name.

Rows of different packs share one batch. Every loaded block runs for every row (its KV-cache layer
then stays shape-consistent for the whole batch), and a forward hook keeps the block's output only
for the rows whose pack uses it: the other rows get the block's input back unchanged
(``torch.where``, a selection, no arithmetic). A row that asked for the base therefore flows through
exactly the base's layers with exactly the base's values, and a row of pack P through exactly the
layers of ``apply BASE P``. ``benchmarks/bench_serve_packs.py`` measures this against grouping rows
by pack (one forward per pack per token).

The block set changes only while the engine's batch is empty (``TransformersEngine.call``): a
loaded pack inserts decoder layers, which renumbers the KV cache.

Packs are checked against the base by fingerprint when the replica starts (``compose``, exactly as
``llamapro apply`` checks them), so a wrong pack fails the deploy, not a request. Their blocks are
read on the first request for them (Ray Serve's ``@serve.multiplexed`` in
``llamapro.serve.deployments.ModelServerImpl``) and dropped again when Serve evicts them.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path

from llamapro.expansion.strategies import Placement
from llamapro.publish.pack import PackError, compose, read_base, read_pack

BASE = ""  # the pack name of rows that asked for the base itself


class ServePacks:
    """The packs one replica can serve on its base model (``model``, loaded from ``base_dir``)."""

    def __init__(self, model, base_dir, packs: dict[str, str]):
        from llamapro.expansion.surgery import find_layers

        self.model = model
        self.base = read_base(base_dir)
        self.order = list(packs)
        self.sources = {}
        for name, path in packs.items():
            src = read_pack(path)
            src.info = {**src.info, "name": name}  # the served name, whatever the pack calls itself
            self.sources[name] = src
        full = compose(self.base, [self.sources[n] for n in self.order])  # refuses foreign packs
        # A stacked pack (grown on the packs before it) runs with them; a sibling runs alone.
        self.needs = {}
        for k, r in enumerate(full.records):
            earlier = self.order[:k] if r["mode"] == "stacked" else []
            self.needs[r["name"]] = [*earlier, r["name"]]
        self.path, layers = find_layers(model)
        if len(layers) != self.base.num_layers:
            raise PackError(f"the loaded model has {len(layers)} layers, {base_dir} has "
                            f"{self.base.num_layers}: packs go on the base they were made for")
        self.base_layers = list(layers)
        self.base_config = {k: copy.deepcopy(getattr(model.config, k)) for k in full.config
                            if hasattr(model.config, k)}
        self.requested: set[str] = set()
        self.blocks: dict[tuple[str, int], object] = {}  # (pack, index in its trained model) -> block
        self.loaded: list[str] = []  # packs whose blocks are in the model, in config order
        self.layer_pack: list[str | None] = [None] * len(layers)
        self._masks: dict[str, object] = {}
        self._lock = threading.Lock()

    # --- which packs are in the model (engine thread, batch empty)
    def names(self) -> list[str]:
        return list(self.order)

    def load(self, name: str) -> list[str]:
        """Make ``name`` (and the packs it was grown on) servable; returns the loaded packs."""
        if name not in self.sources:
            raise PackError(f"no pack {name!r} on this model; its packs: {self.order}")
        self.requested.add(name)
        return self._rebuild()

    def unload(self, name: str, busy: set | frozenset = frozenset()) -> list[str]:
        """Drop ``name``'s blocks unless a loaded pack still needs them or a waiting row (``busy``:
        the packs of rows not yet admitted) is about to use them."""
        if name in busy:
            return self.loaded
        self.requested.discard(name)
        return self._rebuild()

    def _rebuild(self) -> list[str]:
        import torch

        from llamapro.expansion.surgery import (
            _set_module,
            _sync_sub_configs,
            renumber_layers,
        )

        want = {q for n in self.requested for q in self.needs[n]}
        names = [n for n in self.order if n in want]
        if names == self.loaded:
            return self.loaded
        srcs = [self.sources[n] for n in names]
        comp = compose(self.base, srcs)
        src_of = Placement(self.base.num_layers, tuple(comp.all_new()), "packs").source_of() \
            if names else []
        param = next(self.model.parameters())
        new_layers, owner = [], []
        for i, tag in enumerate(comp.layout):
            if tag[0] == "base":
                new_layers.append(self.base_layers[tag[1]])
                owner.append(None)
                continue
            pname, j = names[tag[1]], tag[2]
            blk = self.blocks.get((pname, j))
            if blk is None:
                blk = self._read_block(pname, j, self.base_layers[src_of[i]], param)
                self.blocks[(pname, j)] = blk
            new_layers.append(blk)
            owner.append(pname)
        for key in [k for k in self.blocks if k[0] not in want]:
            del self.blocks[key]
        ml = torch.nn.ModuleList(new_layers)
        renumber_layers(ml)
        _set_module(self.model, self.path, ml)
        cfg = comp.config if names else self.base_config
        for key, val in cfg.items():  # depth and the per-layer lists follow the layout
            if key in self.base_config and getattr(self.model.config, key) != val and (
                    isinstance(val, list) or key in ("num_hidden_layers", "n_layer", "num_layers",
                                                     "decoder_sparse_step")):
                setattr(self.model.config, key, copy.deepcopy(val))
        _sync_sub_configs(self.model, self.model.config)
        self.loaded, self.layer_pack = names, owner
        return names

    def _read_block(self, pname: str, j: int, template, param):
        from safetensors import safe_open

        items = self.sources[pname].layers[j]
        with safe_open(str(items[0][1].file), framework="pt") as f:
            sd = {rest: f.get_tensor(t.name) for rest, t in items}
        blk = copy.deepcopy(template)  # the structure of the layer it was copied from in training
        blk.load_state_dict(sd, strict=True)
        blk.to(device=param.device)
        blk.register_forward_hook(self._gate_hook(pname), with_kwargs=True)
        return blk

    # --- per-row gates (engine thread, before every forward)
    def select(self, row_packs: list[str], device) -> None:
        """Set which rows of the next forward pass each loaded pack's blocks apply to."""
        import torch

        masks = {}
        for p in self.loaded:
            on = [p in self.needs.get(r, ()) for r in row_packs]
            masks[p] = None if all(on) else torch.tensor(on, device=device).view(-1, 1, 1)
        self._masks = masks

    def _gate_hook(self, pname: str):
        import torch

        def hook(module, args, kwargs, output):
            mask = self._masks.get(pname)
            if mask is None:
                return output
            x = args[0] if args else kwargs["hidden_states"]
            if isinstance(output, tuple):
                return (torch.where(mask, output[0], x), *output[1:])
            return torch.where(mask, output, x)

        return hook

    def block_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for b in self.blocks.values() for p in b.parameters())


def pack_paths(packs: dict[str, str], resolve=None) -> dict[str, str]:
    """Pack directories as the replica reads them (``resolve``: e.g. a download of a URI)."""
    out = {}
    for name, p in packs.items():
        path = resolve(p) if resolve else p
        if not (Path(path) / "pack.json").is_file():
            raise PackError(f"serve pack {name!r}: {path} is not a llamapro pack (no pack.json); "
                            "make one with `llamapro pack RUN OUT`")
        out[name] = str(path)
    return out
