"""An expansion pack on disk and the base it applies to, each read as layers of tensors left
where they are (the pack's ``pack.json`` checked: format, version, blocks exactly the recorded
ones)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llamapro.errors import PackError
from llamapro.expansion.families import layers_prefix, num_layers_of, split_layer_key
from llamapro.tensors import TensorInfo, fingerprint, read_config, read_header, tensor_table

PACK_FILE = "pack.json"
BLOCKS_FILE = "blocks.safetensors"
PACK_FORMAT = "llamapro-pack"
PACK_VERSION = 1

Layers = dict[int, list[tuple[str, TensorInfo]]]  # layer index -> (name inside the layer, tensor)


def split_layers(table: dict[str, TensorInfo], num_layers: int) -> tuple[str, Layers, dict[str, TensorInfo]]:
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
    """A base model (or the base part of an applied one) as layers of tensors."""

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


def read_base(model_dir) -> Base:
    d = Path(model_dir)
    config = read_config(d)
    table = tensor_table(d)
    prefix, layers, other = split_layers(table, num_layers_of(config))
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
