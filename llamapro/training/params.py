"""Which parameters train and how the model holds them: the optimizer's param groups for a mode
and stage (everything else frozen), the dtype of the frozen originals, the exact fp32 values of the
trainable ones, and activation checkpointing of the layers above the lowest trainable one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llamapro.config.train import TrainConfig
from llamapro.expansion.surgery import find_layers
from llamapro.tensors import weight_files


def layer_prefix(model) -> str:
    return find_layers(model)[0] + "."


def _module_matches(rest: str, modules: list[str]) -> bool:
    if "all" in modules:
        return True
    for m in modules:
        if m == "attn" and rest.split(".")[0] in ("self_attn", "attention", "attn"):
            return True
        if m == "mlp" and rest.split(".")[0] in ("mlp", "block_sparse_moe", "feed_forward"):
            return True
        if rest == m or rest.startswith(m + "."):
            return True
    return False


def select_parameters(model, tc: TrainConfig, new_layers, stage=None) -> list[dict]:
    """Set ``requires_grad`` for this mode/stage and return optimizer param groups.

    Every group has ``lr`` (its peak) and ``name``. Everything not returned is frozen, so autograd
    keeps no weight gradients and DeepSpeed no optimizer state for it.
    """
    prefix = layer_prefix(model)
    n_layers = model.config.num_hidden_layers
    groups: dict[str, dict] = {}

    def add(key, lr, p):
        p.requires_grad_(True)
        groups.setdefault(key, {"name": key, "lr": lr, "params": []})["params"].append(p)

    for p in model.parameters():
        p.requires_grad_(False)
    lora = any("lora_" in n for n, _ in model.named_parameters())
    for name, p in model.named_parameters():
        clean = name.replace("base_model.model.", "")
        layer, rest = None, clean
        if clean.startswith(prefix):
            idx, _, rest = clean[len(prefix):].partition(".")
            layer = int(idx)
        if lora:  # peft marks what trains; keep exactly the adapters
            if "lora_" in name:
                add("lora", tc.lr, p)
            continue
        if tc.mode == "full":
            add("all", tc.lr, p)
            continue
        if tc.mode == "freeze_last_n":
            if layer is not None and layer >= n_layers - tc.freeze_last_n:
                add("last_n", tc.lr, p)
            continue
        # mode llamapro
        if layer is not None and stage is not None and layer in stage.layers:
            if _module_matches(rest, tc.trainable_modules):
                s = stage.lr_scale.get(layer, 1.0)
                add(f"new_x{s:g}", tc.lr * s, p)
            continue
        if layer is not None and layer not in set(new_layers):
            if tc.original_lr > 0 and (stage is None or stage.train_originals or tc.final_originals_ratio == 0):
                add("originals", tc.original_lr, p)
            continue
        if layer is None:
            is_norm = "norm" in clean
            is_emb = "embed" in clean or (clean.startswith("lm_head") and model.config.tie_word_embeddings)
            if (is_norm and tc.train_norms) or (is_emb and tc.train_embeddings) or \
               (clean.startswith("lm_head") and tc.train_lm_head):
                add("extra", tc.lr, p)
    return list(groups.values())


def fp32_trainable(model, model_dir: str, trained: dict) -> None:
    """Give every trainable parameter of a model loaded in bf16 its exact fp32 value: the carried
    trained tensor, else the checkpoint's own (read by name, nothing else loaded), so a bf16 run
    starts from the same weights as an fp32 one."""
    from safetensors import safe_open

    want = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n in list(want):
            if n in trained:
                want.pop(n).data = trained[n].to(torch.float32).clone()
        for f in weight_files(Path(model_dir)) if want else []:
            with safe_open(str(f), framework="pt") as sf:
                for k in set(sf.keys()) & set(want):
                    want.pop(k).data = sf.get_tensor(k).to(torch.float32)
        for p in want.values():  # not stored by name (e.g. a tied head): the loaded value
            p.data = p.data.to(torch.float32)


def hold_frozen_in(model, dtype: torch.dtype) -> int:
    """Cast every parameter that does not train to ``dtype`` in place; returns how many elements.

    Frozen weights never change, so they need no fp32 master: autocast computes in bf16 anyway and
    their memory halves. Trainable ones stay fp32 (master weights, fp32 gradients and Adam state).
    The run's output takes the originals from the base checkpoint, never from this copy."""
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and p.dtype != dtype and p.is_floating_point():
                p.data = p.data.to(dtype)
                n += p.numel()
    return n


def decoder_layers(model):
    """The decoder's layer list of a HF causal LM (through a peft wrapper too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder().layers


def apply_checkpointing(model, how: str) -> list[int]:
    """Per-layer activation checkpointing; returns the checkpointed layer indices.

    Layers below the lowest layer with a trainable parameter get no graph at all (their inputs do
    not require grad), so checkpointing them would only cost time. "frozen": the frozen layers above
    it (backward needs their activations only to pass the gradient down); "all": every layer from
    the lowest trainable one up."""
    if how == "off":
        return []
    layers = decoder_layers(model)
    trainable = [i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())]
    if not trainable:
        return []
    chosen = [i for i in range(min(trainable), len(layers)) if how == "all" or i not in trainable]
    if not chosen:
        return []
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    for i, layer in enumerate(layers):
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = i in chosen
    return chosen
