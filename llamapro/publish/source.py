"""What a publish step reads: a run directory or checkpoint (located by
:func:`llamapro.artifacts.locate`, adapters included) checked against OUT, and its model loaded
(:func:`llamapro.loading.load_model`) with any PEFT adapter merged. Export, fuse, GGUF, the
quantized exports and packs all start here."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from llamapro.artifacts import ADAPTER_CONFIG, locate
from llamapro.errors import CheckpointError
from llamapro.loading import load_model
from llamapro.tensors import weight_files

ADAPTER_FILES = (ADAPTER_CONFIG, "adapter_model.safetensors", "adapter_model.bin")


def check_destination(src, out, force: bool = False) -> tuple[Path | None, Path, Path]:
    """(run dir or None, checkpoint dir, OUT) for writing ``src`` to ``out`` (a run dir holds
    model/; a checkpoint holds config.json or, a pure adapter, adapter_config.json); refuses,
    before any work, an OUT that is the source (or holds it) or that exists without ``force``."""
    run, ckpt = locate(src, adapters=True)
    out = Path(out)
    o, c = out.resolve(), ckpt.resolve()
    if o == c or o in c.parents or (run is not None and o == run.resolve()):
        raise CheckpointError(f"{out} is (or contains) the checkpoint being exported; choose another OUT")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists; choose another path or pass --force to replace it")
    return run, ckpt, out


def find_adapter(ckpt: Path) -> Path | None:
    """A PEFT adapter with the checkpoint: in the directory itself or an ``adapter/`` subfolder."""
    for d in (ckpt, ckpt / "adapter"):
        if (d / ADAPTER_CONFIG).is_file():
            if not (d / "adapter_model.safetensors").is_file():
                raise CheckpointError(f"{d}: adapter_config.json without adapter_model.safetensors "
                                      "(llamapro reads adapter weights only from safetensors)")
            return d
    return None


def adapter_base(adapter: Path) -> str | None:
    """The base model a pure adapter records (``base_model_name_or_path`` in adapter_config.json)."""
    return json.loads((adapter / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")


def _weights_view(ckpt: Path) -> Path:
    """A temporary directory of symlinks to ``ckpt`` minus adapter files, so transformers loads
    the full weights themselves (beside an adapter_config.json it would load the adapter's
    recorded base instead)."""
    view = Path(tempfile.mkdtemp(prefix="llamapro-export-view-"))
    for f in ckpt.iterdir():
        if f.is_file() and f.name not in ADAPTER_FILES:
            os.symlink(f.resolve(), view / f.name)
    return view


def load_merged(ckpt: Path, dtype: str = "auto", trust_remote_code: bool = False, say=None):
    """The model to export, adapters merged. Returns (model, info about what was merged).
    ``dtype`` "auto" keeps the checkpoint's own dtype (the loader's "stored")."""
    say = say or (lambda m: None)
    td = "stored" if dtype == "auto" else dtype
    adapter = find_adapter(ckpt)
    info = {"merged_adapter": None, "weights_from": str(ckpt)}
    if adapter is None:
        # the loader checks the weights first: clear errors for missing / pickle-only ones
        return load_model(ckpt, dtype=td, trust_remote_code=trust_remote_code), info
    try:
        from peft import PeftModel
    except ImportError as e:
        raise CheckpointError(f"{adapter} holds a PEFT adapter; merging it needs `pip install peft`") from e
    if (ckpt / "config.json").is_file():
        base_dir, view = ckpt, _weights_view(ckpt)
    else:  # a pure adapter: its base is recorded in adapter_config.json
        ref = adapter_base(adapter)
        if not ref or not Path(ref).is_dir():
            raise CheckpointError(f"{adapter} is an adapter whose base model {ref!r} is not a local "
                                  "directory; export needs the base weights to merge into")
        base_dir, view = Path(ref), None
    try:
        weight_files(base_dir)
        say(f"merging adapter {adapter} into {base_dir}")
        model = load_model(view or base_dir, dtype=td, trust_remote_code=trust_remote_code,
                           eval_mode=False, check_weights=False)  # checked above, under its own name
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    finally:
        if view is not None:
            shutil.rmtree(view, ignore_errors=True)
    info.update(merged_adapter=str(adapter), weights_from=str(base_dir))
    return model.eval(), info
