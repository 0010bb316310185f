"""``train.compile``: regional ``torch.compile`` of the decoder layers, where it pays.

Each decoder layer is compiled in place (``layer.compile()``: parameter names do not change, so
checkpoints, the carried trained tensors and the export are untouched). Every layer shares one
compiled graph per kind (below the lowest trainable layer: no graph; frozen with the gradient
passing through; trainable), so a 36-layer model compiles three small graphs, not one large one.
Inductor fuses the elementwise work between the matmuls (norms, rotary embedding, SiLU, residual
adds, autocast casts), which in bf16 is most of a small model's step.

Measured on SmolLM2-135M grown 30 -> 36, batch 4 x 256, bf16 on a CPU with AMX (one process, two
threads): 3.0 -> 2.34 s per step and a lower peak; the first step pays the compilation (~45 s on a
machine whose inductor cache is cold, ~4 s once the cache holds these graphs). ``auto`` therefore
compiles only where that pays: bf16 autocast (fp32 steps are matmul-bound), a model of at least
50M parameters (tiny models gain nothing) and a run of at least 16 optimizer steps; never with
ZeRO-3 (partitioned parameters), LoRA, a quantized base, distillation or activation checkpointing.
"""

from __future__ import annotations

import contextlib

import torch

from llamapro.training.params import decoder_layers

MIN_PARAMS = 50_000_000
MIN_STEPS = 16


def compile_choice(requested: str, *, bf16_autocast: bool, zero3: bool, lora: bool, quantized: bool,
                   distill: bool, checkpointing: str, n_params: int, total_steps: int) -> tuple[bool, str]:
    """Whether to compile the decoder layers, and why (the reason goes to the run's log)."""
    if requested == "off":
        return False, "train.compile: off"
    blockers = [why for why, hit in (("ZeRO-3 partitions the parameters", zero3), ("LoRA adapters", lora),
                                     ("a quantized base", quantized), ("distillation", distill),
                                     (f"activation checkpointing ({checkpointing})", checkpointing != "off"))
                if hit]
    if blockers:
        if requested == "on":
            return False, f"train.compile: on, but not with {', '.join(blockers)}; running eagerly"
        return False, f"auto: not with {', '.join(blockers)}"
    if requested == "on":
        return True, "train.compile: on"
    if not bf16_autocast:
        return False, "auto: fp32 steps are matmul-bound (compile measured to pay in bf16)"
    if n_params < MIN_PARAMS:
        return False, f"auto: {n_params / 1e6:.1f}M parameters < {MIN_PARAMS / 1e6:.0f}M (nothing to gain)"
    if total_steps < MIN_STEPS:
        return False, f"auto: {total_steps} optimizer steps < {MIN_STEPS} (compilation would not pay back)"
    return True, f"auto: bf16, {n_params / 1e6:.0f}M parameters, {total_steps} steps"


def compile_layers(model) -> int:
    """Compile every decoder layer in place; returns how many."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=False)
    return len(layers)


def eager():
    """A context that runs compiled modules eagerly (held-out evaluation: other shapes, eval mode;
    compiling those would cost more than it saves)."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()
