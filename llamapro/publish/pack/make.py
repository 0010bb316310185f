"""``llamapro pack RUN_OR_MODEL OUT``: the inserted blocks of a trained model as a pack
(``blocks.safetensors``, ``pack.json``, a model card), refused unless the blocks alone give the
model back on its base."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path

from llamapro.artifacts import METADATA_FILE, BaseRecord, TrainingRecord, locate, require_metadata
from llamapro.errors import PackError
from llamapro.expansion.families import num_layers_of
from llamapro.publish.card import CARD_FILE, pack_card
from llamapro.publish.pack.sources import BLOCKS_FILE, PACK_FILE, PACK_FORMAT, PACK_VERSION, split_layers
from llamapro.publish.source import find_adapter, load_merged
from llamapro.tensors import (
    atomic_dir,
    config_digest,
    fingerprint,
    fingerprint_of,
    read_config,
    tensor_digest,
    tensor_table,
    write_json_atomic,
    write_tensor_file,
)


def make_pack(src, out, force: bool = False, name: str | None = None, trust_remote_code: bool = False,
              say=None) -> dict:
    """``llamapro pack RUN_OR_MODEL OUT``: the inserted blocks of a trained (or just expanded)
    model as a pack. Refused when the original layers are not the base's (trained norms,
    embeddings, original_lr > 0, another dtype): the blocks alone would not give the model back."""
    say = say or (lambda m: None)
    run, ckpt = locate(src, adapters=True)
    out = Path(out)
    if out.resolve() in (ckpt.resolve(), *ckpt.resolve().parents):
        raise PackError(f"{out} is (or contains) the model being packed; choose another OUT")
    meta = require_metadata(ckpt)
    new = sorted(int(i) for i in meta.new_layer_indices)
    base = meta.base or BaseRecord()
    if not new or not base.fingerprint or not isinstance(base.config, dict):
        raise PackError(f"{ckpt}: its {METADATA_FILE} records no inserted layers or no base "
                        "(fingerprint and config): only a model made by `llamapro expand` (and trained) "
                        "can be packed")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise PackError(f"{out} already exists; choose another path or pass --force to replace it")
    merged_dir = None
    adapter = find_adapter(ckpt)
    try:
        weights = ckpt
        if adapter is not None:  # merge first: a pack holds plain block weights
            say(f"merging adapter {adapter} before packing")
            model, _ = load_merged(ckpt, "auto", trust_remote_code, say)
            merged_dir = Path(tempfile.mkdtemp(prefix="llamapro-pack-merge-"))
            model.save_pretrained(merged_dir)
            del model
            weights = merged_dir
        config = read_config(weights)
        n = num_layers_of(config)
        if n != meta.num_layers:
            raise PackError(f"{ckpt}: config has {n} layers but llamapro.json records {meta.num_layers}")
        table = tensor_table(weights)
        prefix, layers, other = split_layers(table, n)
        keep = [i for i in range(n) if i not in set(new)]
        stripped = dict(other)
        for o, i in enumerate(keep):
            stripped.update({f"{prefix}{o}.{rest}": t for rest, t in layers[i]})
        if fingerprint_of(base.config, stripped) != base.fingerprint:
            raise PackError(
                f"{ckpt}: without its inserted layers {new} it is not its base (fingerprint "
                f"{base.fingerprint}): the original layers, norms, embeddings, config or dtype "
                "changed in training. The blocks alone would not give this model back; ship the fused "
                "model (`llamapro export`) instead, or train with the originals frozen "
                "(train.original_lr 0, no train_norms/train_embeddings/train_lm_head).")
        blocks = [(f"{prefix}{i}.{rest}", t) for i in new for rest, t in layers[i]]
        training = meta.training or TrainingRecord()
        with atomic_dir(out, force=force) as tmp:
            nbytes = write_tensor_file(tmp / BLOCKS_FILE, blocks, {"format": "pt"})
            h = hashlib.sha256()
            for k, t in blocks:
                h.update(f"{k}|{t.dtype}|{t.shape}|{tensor_digest(t)}\n".encode())
            info = {
                "format": PACK_FORMAT, "version": PACK_VERSION,
                "name": name or out.name,
                "id": "sha256:" + h.hexdigest(),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "base": {"fingerprint": base.fingerprint, "config_digest": config_digest(base.config),
                         "model_type": base.model_type, "num_layers": base.num_layers, "path": base.path},
                "layers_prefix": prefix,
                "num_layers": n,
                "positions": new,
                "sources": meta.get("new_layer_sources"),
                "config": config,
                "trained": {"fingerprint": fingerprint(weights), "path": str(ckpt.resolve()),
                            "run": str(run.resolve()) if run else None},
                "lineage": {
                    "kind": meta.kind, "strategy": meta.strategy,
                    "generation": meta.get("generation", 1), "generations": meta.get("generations"),
                    "training": {k: training.get(k) for k in ("mode", "steps", "tokens", "originals_frozen",
                                                              "best_eval_loss", "trained_from")} or None,
                    "data": (training.config or {}).get("data") if training else None,
                    "merged_adapter": str(adapter) if adapter else None,
                    "verification_ok": (meta.verification or {}).get("ok"),
                },
                "blocks": {"file": BLOCKS_FILE, "tensors": len(blocks), "bytes": nbytes},
            }
            write_json_atomic(tmp / PACK_FILE, info, indent=2)
            (tmp / CARD_FILE).write_text(pack_card(info), encoding="utf-8")
    finally:
        if merged_dir is not None:
            shutil.rmtree(merged_dir, ignore_errors=True)
    return {"out": str(out), **{k: info[k] for k in ("name", "id", "positions", "num_layers", "blocks")},
            "base_fingerprint": base.fingerprint}
