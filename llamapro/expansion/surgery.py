"""Block expansion on a loaded model (module surgery), and the numerical proof of identity.

The streaming path in :mod:`llamapro.expansion.streaming` does the same on disk without loading the
model; a test holds the two to byte-identical tensors. Imports torch, never ray or deepspeed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from llamapro.errors import UnsupportedModelError
from llamapro.expansion.families import Family, expand_config, family_for, writer_param_names
from llamapro.expansion.strategies import Placement


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer ``ModuleList`` (e.g. ``model.layers``) of a causal LM."""
    n = model.config.num_hidden_layers
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks")
        and len(mod) == n
    ]
    if len(found) != 1:
        raise UnsupportedModelError(
            f"cannot find a unique list of {n} decoder layers in {type(model).__name__} "
            f"(found {[f[0] for f in found]})"
        )
    return found[0]


def _set_module(model: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, value)


def renumber_layers(layers: nn.ModuleList) -> None:
    """Every module that carries ``layer_idx`` (its KV-cache slot) gets its new index."""
    for i, layer in enumerate(layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = i


def zero_writers(layer: nn.Module, family: Family) -> list[str]:
    names = dict(layer.named_parameters())
    zeroed = writer_param_names(names.keys(), family)
    with torch.no_grad():
        for n in zeroed:
            names[n].zero_()
    return zeroed


@dataclass
class ExpandResult:
    model: nn.Module
    placement: Placement
    zeroed: dict[int, list[str]]  # new layer index -> parameter names zeroed in it
    config_keys_changed: list[str]


def expand_model(model: nn.Module, placement: Placement, family: Family | None = None) -> ExpandResult:
    """Insert the new blocks of ``placement`` into ``model`` in place and return it.

    Each new block is a deep copy of its source layer with every residual writer zeroed; every
    layer's ``layer_idx`` is renumbered; the config's layer count and per-layer lists follow.
    """
    cfg = model.config
    if getattr(cfg, "quantization_config", None):
        raise UnsupportedModelError(
            "the model is quantized: zero bytes are not zero weights in packed formats. "
            "Expand the unquantized model and quantize the result."
        )
    family = family or family_for(cfg.model_type)
    path, layers = find_layers(model)
    if len(layers) != placement.num_original:
        raise ValueError(f"placement is for {placement.num_original} layers, model has {len(layers)}")
    new_cfg, changed = expand_config(cfg.to_dict(), placement)
    new_layers, zeroed = [], {}
    for i, (kind, src) in enumerate(placement.layout()):
        if kind == "orig":
            new_layers.append(layers[src])
        else:
            blk = copy.deepcopy(layers[src])
            zeroed[i] = zero_writers(blk, family)
            new_layers.append(blk)
    new_list = nn.ModuleList(new_layers)
    renumber_layers(new_list)
    _set_module(model, path, new_list)
    for key in changed:
        setattr(cfg, key, new_cfg[key])
    _sync_sub_configs(model, cfg)
    return ExpandResult(model, placement, zeroed, changed)


def _sync_sub_configs(model: nn.Module, cfg) -> None:
    # Inner models (model.model) share the config object in HF, but be explicit for wrappers.
    for mod in model.modules():
        if mod is not model and getattr(mod, "config", None) is not None and mod.config is not cfg:
            if getattr(mod.config, "num_hidden_layers", None) is not None:
                mod.config.num_hidden_layers = cfg.num_hidden_layers


class skip_layers:
    """Context manager: run ``model`` with the given layers bypassed (identity).

    With the new blocks skipped an expanded model computes exactly what its base computed, so the
    base is available (as a teacher, or as the reference of an identity check) without a second
    copy of the weights in memory.
    """

    def __init__(self, model: nn.Module, indices):
        self.model, self.indices = model, sorted(set(int(i) for i in indices))

    def __enter__(self):
        self.path, self.layers = find_layers(self.model)
        keep = nn.ModuleList([l for i, l in enumerate(self.layers) if i not in set(self.indices)])
        self.saved_idx = [
            [(m, m.layer_idx) for m in l.modules() if hasattr(m, "layer_idx")] for l in keep
        ]
        renumber_layers(keep)
        self.saved_n = self.model.config.num_hidden_layers
        self.saved_types = getattr(self.model.config, "layer_types", None)
        _set_module(self.model, self.path, keep)
        self.model.config.num_hidden_layers = len(keep)
        if isinstance(self.saved_types, list):
            drop = set(self.indices)
            self.model.config.layer_types = [t for i, t in enumerate(self.saved_types) if i not in drop]
        return self.model

    def __exit__(self, *exc):
        _set_module(self.model, self.path, self.layers)
        for group in self.saved_idx:
            for m, idx in group:
                m.layer_idx = idx
        self.model.config.num_hidden_layers = self.saved_n
        if isinstance(self.saved_types, list):
            self.model.config.layer_types = self.saved_types
        return False


# --- proof ---------------------------------------------------------------------------------------

@dataclass
class IdentityReport:
    max_abs_logit_diff: float
    bit_identical: bool
    generation_equal: bool
    num_sequences: int
    tokens_compared: int
    generated_tokens: int
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance and self.generation_equal

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["ok"] = self.ok
        return d


@torch.no_grad()
def check_identity(expanded: nn.Module, new_indices, base: nn.Module | None = None,
                   input_ids: torch.Tensor | None = None, attention_mask=None,
                   max_new_tokens: int = 8, tolerance: float = 1e-5, seed: int = 0) -> IdentityReport:
    """Compare the expanded model with its base: logits on ``input_ids`` and greedy generation
    with a KV cache (which exercises the renumbered ``layer_idx``).

    Without ``base`` the reference is the expanded model itself with the new blocks skipped, which
    holds the base's original tensors.
    """
    expanded.eval()
    if input_ids is None:
        g = torch.Generator().manual_seed(seed)
        vocab = expanded.config.vocab_size
        input_ids = torch.randint(0, vocab, (2, 12), generator=g)
    kwargs = {"attention_mask": attention_mask} if attention_mask is not None else {}

    def run(m):
        logits = m(input_ids=input_ids, **kwargs).logits.float()
        gen = m.generate(input_ids=input_ids, max_new_tokens=max_new_tokens, do_sample=False,
                         use_cache=True, pad_token_id=pad_id(m), **kwargs)
        return logits, gen

    lx, gx = run(expanded)
    if base is None:
        with skip_layers(expanded, new_indices):
            lb, gb = run(expanded)
    else:
        base.eval()
        lb, gb = run(base)
    diff = (lx - lb).abs().max().item() if lx.shape == lb.shape else float("inf")
    return IdentityReport(
        max_abs_logit_diff=diff,
        bit_identical=lx.shape == lb.shape and torch.equal(lx, lb),
        generation_equal=gx.shape == gb.shape and torch.equal(gx, gb),
        num_sequences=int(input_ids.shape[0]),
        tokens_compared=int(input_ids.numel()),
        generated_tokens=int(gx.shape[1] - input_ids.shape[1]),
        tolerance=tolerance,
    )


def pad_id(model) -> int:
    """The pad token id generate() should use: the generation config's pad, else its eos, else the
    model config's pad, else its eos (first of a list), else 0; always inside the vocabulary."""
    gc = getattr(model, "generation_config", None)
    for v in (getattr(gc, "pad_token_id", None), getattr(gc, "eos_token_id", None),
              getattr(model.config, "pad_token_id", None), getattr(model.config, "eos_token_id", None)):
        if isinstance(v, list) and v:
            v = v[0]
        if isinstance(v, int) and 0 <= v < model.config.vocab_size:
            return v
    return 0
