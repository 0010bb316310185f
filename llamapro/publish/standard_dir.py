"""The standard Hugging Face directory every full-weight publish writes: a loaded model saved as
safetensors shards beside the checkpoint's side files, ``llamapro.json`` (lineage plus what the
step did) and the model card, published atomically (a temporary sibling renamed into place)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from llamapro.artifacts import METADATA_VERSION, EvalResults, ExpansionMetadata, write_metadata
from llamapro.errors import CheckpointError
from llamapro.expansion.families import num_layers_of
from llamapro.publish.card import CARD_FILE, data_mixture, model_card
from llamapro.publish.source import ADAPTER_FILES
from llamapro.tensors import (
    METADATA_FILE,
    atomic_dir,
    copy_side_files,
    fingerprint,
    read_config,
    weight_files,
)


def write_standard_dir(model, out: Path, ckpt: Path, run: Path | None, meta: dict, info: dict,
                       results: dict | None, *, force: bool = False, max_shard_size: str = "2GB",
                       dtype: str = "auto", base_model: str | None = None, license: str | None = None,
                       say=None, kind: str = "exported", extra_meta: dict | None = None,
                       card_sections: list[str] | None = None, extra_files: dict | None = None) -> dict:
    """Write the loaded ``model`` (from ``ckpt``) to ``out`` atomically: shards, side files,
    ``llamapro.json`` (``kind``, lineage, ``extra_meta``) and the model card. ``extra_files``
    maps a file name in OUT to a file to copy there. Returns the export metadata."""
    say = say or (lambda m: None)
    meta = ExpansionMetadata.of(meta) if meta else None
    results = EvalResults.of(results)
    src_cfg_dtype = None
    if (ckpt / "config.json").is_file():
        cfg = read_config(ckpt)
        src_cfg_dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    out_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    c = ckpt.resolve()
    with atomic_dir(out, force=force) as tmp:
        say(f"writing safetensors shards (max {max_shard_size}) to {tmp.name}")
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if info["weights_from"] != str(ckpt):
            copy_side_files(Path(info["weights_from"]), tmp, skip=(CARD_FILE, *ADAPTER_FILES))
        copied = copy_side_files(ckpt, tmp, skip=(CARD_FILE, *ADAPTER_FILES))
        for name, path in (extra_files or {}).items():
            shutil.copyfile(path, tmp / name)
        cfg = read_config(tmp)
        n = num_layers_of(cfg)
        want = meta.num_layers if meta else None
        if want is not None and n != want:
            raise CheckpointError(f"export config has {n} layers but the metadata records {want}")
        weight_files(tmp)
        export_info = {
            "name": out.name, "from": str(c), "run": str(run.resolve()) if run else None,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dtype": out_dtype, "dtype_kept": dtype == "auto" or out_dtype == src_cfg_dtype,
            "max_shard_size": str(max_shard_size), "num_layers": n,
            "merged_adapter": info["merged_adapter"], "side_files": copied,
            "shards": sorted(p.name for p in tmp.glob("*.safetensors")),
            "fingerprint": fingerprint(tmp),
            "gate": ({k: results.gate[k] for k in ("enabled", "passed", "summary")}
                     if results and results.gate else None),
        }
        new_meta = ExpansionMetadata(meta if meta else {"version": METADATA_VERSION, "new_layer_indices": [],
                                                        "num_layers": n})
        new_meta.kind = kind
        new_meta.export = export_info
        new_meta.update(extra_meta or {})
        write_metadata(tmp, new_meta)
        (tmp / CARD_FILE).write_text(model_card(new_meta, export_info, results,
                                                data_mixture(meta or {}, run), base_model, license,
                                                card_sections),
                                     encoding="utf-8")
    stale = sorted(p.name for p in out.parent.glob(f".{out.name}.tmp-*"))
    return {"out": str(out), "metadata_file": str(out / METADATA_FILE), **export_info,
            "stale_partial_exports": stale}
