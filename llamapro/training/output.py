"""The run's output, written by rank 0 after the last stage: a standard HF checkpoint of the trained
model (originals from the expanded checkpoint bit for bit, LoRA merged) with its ``llamapro.json``
carried over and a ``training`` record added, uploaded when the run has an output URI. A run on a
quantized base (``train.quantize_base``) writes the same full-precision checkpoint: its originals
never come from the quantized copy."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from llamapro import storage
from llamapro.artifacts import (
    METADATA_VERSION,
    ExpansionMetadata,
    TrainingRecord,
    read_metadata,
    write_metadata,
)
from llamapro.config.train import TrainConfig
from llamapro.tensors import atomic_dir, copy_side_files
from llamapro.training.model import load_model, overlay_trained, uses_lora, wrap_lora


def write_final(config: dict, tc: TrainConfig, trained: dict, state: dict, stages,
                dtype_info: dict | None = None) -> None:
    """Rank 0: a standard HF checkpoint of the trained model, metadata carried over.

    The model is loaded afresh from the expanded checkpoint in fp32 and only the trained tensors
    (fp32 masters) are laid over it: the originals come from the checkpoint bit for bit, never from
    the bf16 (or ``quantize_base`` nf4/int8) copy that training computed with."""
    out = Path(config["out_dir"]) / "model"
    model = load_model(config["model_dir"], torch.float32, config.get("trust_remote_code", False))
    if uses_lora(tc):
        model = wrap_lora(model, tc, sorted(config["new_layers"]))
        overlay_trained(model, trained)
        model = model.merge_and_unload()
    else:
        overlay_trained(model, trained)
    meta = ExpansionMetadata(read_metadata(Path(config["model_dir"])) or {
        "version": METADATA_VERSION, "kind": "base", "new_layer_indices": [], "num_layers":
        model.config.num_hidden_layers})
    meta.kind = "trained"
    meta.training = TrainingRecord(
        mode=tc.mode, config=asdict(tc), stages=[s.to_dict() for s in stages],
        steps=state["global_step"], tokens=state["tokens"], train_seconds=state["elapsed"],
        early_stopped_stages=state["early_stopped"], best_eval_loss=state["best_eval"],
        originals_frozen=tc.mode == "llamapro" and tc.original_lr == 0 and not tc.train_norms
        and not tc.train_embeddings and not tc.train_lm_head,
        trained_from=config.get("model_uri") or config["model_dir"],
        dtype=dict(dtype_info or {}),
    )
    if tc.quantize_base != "none":  # what training held; the output is full precision regardless
        meta.training["quantize_base"] = tc.quantize_base
        meta.training.dtype["frozen_weights"] = f"{tc.quantize_base} (bitsandbytes) for the originals' Linear layers"
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(tmp)
        copy_side_files(Path(config["model_dir"]), tmp)
        write_metadata(tmp, meta)
    if config.get("out_uri"):  # the driver (maybe on another node) fetches it from there
        storage.upload(out, storage.join(config["out_uri"], "model"))
        storage.upload(Path(config["out_dir"]) / "metrics.jsonl", storage.join(config["out_uri"], "metrics.jsonl"))
