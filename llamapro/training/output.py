"""The run's output, written by rank 0 after the last stage: a standard HF checkpoint of the trained
model (originals from the expanded checkpoint bit for bit, LoRA merged) with its ``llamapro.json``
carried over and a ``training`` record added, uploaded when the run has an output URI. A run on a
quantized base (``train.quantize_base``) writes the same full-precision checkpoint: its originals
never come from the quantized copy.

A run without LoRA writes the checkpoint one tensor at a time (:func:`stream_trained`): every
tensor the trained model would save, in fp32, the trained ones from the carried state and the rest
read from the expanded checkpoint (byte ranges copied as they are when it is fp32, one tensor cast
at a time otherwise), so rank 0's memory at write time stays at one tensor beside the trained state
instead of a whole fp32 model. The files are the ones ``save_pretrained`` of the loaded model wrote
before, byte for byte (tests/unit/test_output_stream.py)."""

from __future__ import annotations

import os
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
from llamapro.tensors import atomic_dir, copy_range, copy_side_files, header_bytes, read_config, tensor_table
from llamapro.training.model import load_model, overlay_trained, uses_lora, wrap_lora


def write_final(config: dict, tc: TrainConfig, trained: dict, state: dict, stages,
                dtype_info: dict | None = None) -> None:
    """Rank 0: a standard HF checkpoint of the trained model, metadata carried over.

    The trained tensors (fp32 masters) are written over the expanded checkpoint's, in fp32: the
    originals come from the checkpoint bit for bit, never from the bf16 (or ``quantize_base``
    nf4/int8) copy that training computed with. Without LoRA this streams one tensor at a time
    (:func:`stream_trained`); with LoRA (merged into the originals' modules) the model is loaded
    whole in fp32, the adapters merged, and saved."""
    out = Path(config["out_dir"]) / "model"
    src = Path(config["model_dir"])
    remote = config.get("trust_remote_code", False)
    meta = ExpansionMetadata(read_metadata(src) or {
        "version": METADATA_VERSION, "kind": "base", "new_layer_indices": [], "num_layers":
        read_config(src).get("num_hidden_layers")})
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
        if uses_lora(tc) or not stream_trained(src, trained, tmp, remote):
            # LoRA merges into the originals' modules (or the checkpoint's tensor names are not the
            # model's): load the whole model in fp32 and save it
            model = load_model(config["model_dir"], torch.float32, remote)
            if uses_lora(tc):
                model = wrap_lora(model, tc, sorted(config["new_layers"]))
                overlay_trained(model, trained)
                model = model.merge_and_unload()
            else:
                overlay_trained(model, trained)
            model.save_pretrained(tmp)
            del model
        copy_side_files(src, tmp)
        write_metadata(tmp, meta)
    if config.get("out_uri"):  # the driver (maybe on another node) fetches it from there
        storage.upload(out, storage.join(config["out_uri"], "model"))
        storage.upload(Path(config["out_dir"]) / "metrics.jsonl", storage.join(config["out_uri"], "metrics.jsonl"))


def _saved_tensors(model_dir: Path, trust_remote_code: bool):
    """(config, [(name, shape)] in save order) of what ``save_pretrained`` writes for this
    checkpoint's model loaded in fp32: its state dict without ignored keys and tied duplicates,
    read from a skeleton on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skel = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, trust_remote_code=trust_remote_code)
    sd = skel.state_dict()
    for k in skel._keys_to_ignore_on_save or ():
        sd.pop(k, None)
    sd = remove_tied_weights_from_state_dict(sd, skel)
    skel.config.dtype = "float32"  # what save_pretrained records for an fp32 model
    skel.config.architectures = [type(skel).__name__]
    return skel, [(k, list(v.shape)) for k, v in sd.items()]


def _write_all(fd: int, buf) -> None:
    view = memoryview(buf).cast("B")
    while view:
        view = view[os.write(fd, view[:1 << 30]):]


def stream_trained(model_dir, trained: dict, tmp: Path, trust_remote_code: bool = False,
                   max_shard_size: str = "50GB") -> bool:
    """Write the trained model's weights and config (fp32, as ``save_pretrained`` of the
    loaded model would) into ``tmp`` one tensor at a time; False (nothing written) when the
    checkpoint's tensors are not exactly the model's (renamed keys, other shapes)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors import safe_open

    model_dir = Path(model_dir)
    table = tensor_table(model_dir)
    skel, names = _saved_tensors(model_dir, trust_remote_code)
    shapes = dict(names)
    if any(k not in table or table[k].shape != shp for k, shp in names) \
            or any(k not in shapes or list(v.shape) != shapes[k] for k, v in trained.items()):
        return False
    split = split_torch_state_dict_into_shards(  # in name order, as save_pretrained's state dict comes
        {k: torch.empty(shapes[k], dtype=torch.float32, device="meta") for k in sorted(shapes)},
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    for fname, group in split.filename_to_tensors.items():
        group = sorted(group)  # the order safetensors' save_file lays same-dtype tensors out in
        sizes = [4 * int(torch.Size(shapes[k]).numel()) for k in group]
        fd = os.open(tmp / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        srcs: dict = {}
        try:
            _write_all(fd, header_bytes([(k, "F32", shapes[k], n) for k, n in zip(group, sizes)],
                                        {"format": "pt"}))
            for k in group:
                t = table[k]
                if k in trained:  # the trained state, as overlay_trained would cast it
                    _write_all(fd, trained[k].detach().to("cpu", torch.float32).contiguous()
                               .view(torch.uint8).numpy())
                elif t.dtype == "F32":  # the checkpoint's own bytes
                    if t.file not in srcs:
                        srcs[t.file] = os.open(t.file, os.O_RDONLY)
                    copy_range(srcs[t.file], fd, t.start, t.nbytes)
                else:  # one tensor cast to fp32, exactly as loading the checkpoint in fp32 does
                    with safe_open(str(t.file), framework="pt") as f:
                        x = f.get_tensor(k).to(torch.float32).contiguous()
                    _write_all(fd, x.view(torch.uint8).numpy())
                    del x
        finally:
            os.close(fd)
            for s in srcs.values():
                os.close(s)
    if split.is_sharded:
        import json

        index = {"metadata": {"total_parameters": skel.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    skel.config.save_pretrained(tmp)
    if skel.can_generate():
        from transformers import GenerationConfig

        skel.generation_config = GenerationConfig.from_model_config(skel.config)
        if (model_dir / "generation_config.json").is_file():
            skel.generation_config = GenerationConfig.from_pretrained(model_dir)
        skel.generation_config.save_pretrained(tmp)
    return True
