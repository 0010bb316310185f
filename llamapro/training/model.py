"""The model a stage trains: loaded from the expanded checkpoint in a given dtype (its originals
quantized when ``train.quantize_base`` asks), wrapped in LoRA adapters when the config asks, with
the trained tensors carried between stages laid over it and gathered back from the DeepSpeed engine
at the stage's end."""

from __future__ import annotations

import torch

from llamapro import loading
from llamapro.config.train import TrainConfig
from llamapro.training.quantize import load_quantized_base


def load_model(model_dir: str, dtype, trust_remote_code: bool = False, quantize_base: str = "none",
               new_layers=None):
    """The checkpoint's causal LM in ``dtype`` on the CPU, as transformers returns it (safetensors
    only; the recipe switches it to train mode).

    ``quantize_base`` nf4/int8 (``train.quantize_base``): the original layers' Linear weights are
    held quantized by bitsandbytes (:func:`~llamapro.training.quantize.load_quantized_base`, computing
    in ``dtype``, on the worker's GPU when it has one); ``new_layers`` (default: the checkpoint's
    ``llamapro.json``) stay unquantized in ``dtype`` and trainable; the embeddings, norms and head
    stay unquantized in ``dtype``, frozen."""
    if quantize_base != "none":
        return load_quantized_base(model_dir, quantize_base, new_layers,
                                   compute_dtype=str(dtype).removeprefix("torch."),
                                   trust_remote_code=trust_remote_code)
    return loading.load_model(model_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                              eval_mode=False, check_weights=False)


def uses_lora(tc: TrainConfig) -> bool:
    """LoRA adapters train (mode lora, or LoRA on the new blocks), merged when the run ends."""
    return tc.mode == "lora" or tc.lora_new_blocks


def wrap_lora(model, tc: TrainConfig, layers):
    """``model`` with peft LoRA adapters on ``tc.lora.target_modules`` (only in ``layers`` when
    ``tc.lora_new_blocks``)."""
    from peft import LoraConfig, get_peft_model

    lkw = {"r": tc.lora.r, "lora_alpha": tc.lora.alpha, "lora_dropout": tc.lora.dropout,
           "target_modules": tc.lora.target_modules, "task_type": "CAUSAL_LM"}
    if tc.lora_new_blocks:
        lkw.update(layers_to_transform=layers, layers_pattern="layers")
    return get_peft_model(model, LoraConfig(**lkw))


def overlay_trained(model, trained: dict) -> None:
    """Copy carried trained tensors (by parameter name) into ``model``, cast to its dtypes."""
    if not trained:
        return
    sd = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in trained.items():
            sd[k].copy_(v.to(sd[k].dtype))


def gather_trainable(engine, zero_stage: int) -> dict:
    """The trainable parameters of a DeepSpeed engine's module, on the CPU (gathered under ZeRO-3)."""
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in named}
    return {n: p.detach().cpu().clone() for n, p in named}
