"""Training the inserted blocks on Ray Train + DeepSpeed: staged unfreezing, distillation, LoRA,
bf16 compute where it is native (and a QLoRA-style quantized base, :mod:`llamapro.training.quantize`).

Read in this order: :mod:`~llamapro.training.driver` (``run_training`` builds the ``TorchTrainer``),
:mod:`~llamapro.training.worker` (``TrainRecipe``: what each worker runs, top to bottom), and the parts
it uses: :mod:`~llamapro.training.stages` (the schedule), :mod:`~llamapro.training.params` (which
parameters train and in which dtype), :mod:`~llamapro.training.model` (load, LoRA, carried tensors),
:mod:`~llamapro.training.optim` (DeepSpeed config, LR schedule), :mod:`~llamapro.training.loss`,
:mod:`~llamapro.training.precision` (compute dtype), :mod:`~llamapro.training.memory`,
:mod:`~llamapro.training.output` (the trained HF checkpoint). Only this package imports ``ray.train``
and ``deepspeed``.

This module is a lazy facade: ``from llamapro.training import run_training`` loads only what it needs.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "run_training": "driver",
    "train_loop": "worker", "TrainRecipe": "worker", "STATE_FILE": "worker", "TRAINED_FILE": "worker",
    "select_parameters": "params", "layer_prefix": "params", "apply_checkpointing": "params",
    "decoder_layers": "params", "hold_frozen_in": "params",
    "build_ds_config": "optim", "lr_lambda": "optim",
    "native_bf16": "precision", "resolve_dtype": "precision",
    "causal_lm_ce_sum": "loss", "masked_ce_sum": "loss", "supports_chunked_loss": "loss",
    "kl_to_teacher": "loss",
    "Stage": "stages", "allocate": "stages", "build_stages": "stages",
}

def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
