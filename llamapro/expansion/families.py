"""Per-family knowledge: which projections write into the residual stream, and which config keys
are per-layer.

A new block is an identity exactly when every projection that *writes into the residual stream*
is zero (weights and biases). Families name these differently (``o_proj``/``down_proj`` in
Llama-likes, ``dense``/``fc2`` in Phi-1/2, ``c_proj`` in StarCoder2, fused 3-D
``experts.down_proj`` in transformers-5 MoEs). Zeroing by one fixed list silently fails on the
others, so each family is listed here explicitly and every expansion is then *checked*
numerically; a family not listed is refused unless the user names its writers, and even then the
numerical check has the final word.

Pure Python: no torch, no ray. Shared by the in-memory and the streaming (on-disk) paths, so both
produce the same config and zero the same tensors.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from llamapro.errors import UnsupportedModelError  # noqa: F401  (raised here; old import path)
from llamapro.expansion.strategies import Placement

_LLAMA_LIKE = ("self_attn.o_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    # Each entry is a module path inside a decoder layer. Its ``weight``/``bias`` (or the 3-D
    # parameter itself, for fused experts) are zeroed. Groups: at least one name of each group must
    # be present in every layer, so a renamed module in a future transformers fails loudly.
    attn_writers: tuple[str, ...]
    mlp_writers: tuple[str, ...]
    notes: str = ""

    @property
    def writers(self) -> tuple[str, ...]:
        return self.attn_writers + self.mlp_writers


FAMILIES: tuple[Family, ...] = (
    Family("llama-like",
           ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
            "granite", "olmo", "olmo2", "cohere", "stablelm", "smollm3", "helium", "glm",
            "ministral", "seed_oss", "arcee", "apertus"),
           ("self_attn.o_proj",), ("mlp.down_proj",),
           "pre-norm blocks; Gemma's post-norms map a zero vector to zero"),
    # transformers 5 fuses experts into 3-D parameters in memory but saves (and loads) the
    # per-expert layout on disk; both spellings are listed, ``*`` matching one expert index.
    Family("mixtral", ("mixtral",), ("self_attn.o_proj",),
           ("mlp.experts.down_proj", "block_sparse_moe.experts.*.w2", "mlp.experts.*.w2"),
           "every expert's down projection"),
    Family("qwen-moe", ("qwen2_moe", "qwen3_moe"), ("self_attn.o_proj",),
           ("mlp.experts.down_proj", "mlp.experts.*.down_proj", "mlp.shared_expert.down_proj",
            "mlp.down_proj"),
           "sparse layers zero every expert and the shared expert; dense layers their down_proj"),
    Family("starcoder2", ("starcoder2",), ("self_attn.o_proj",), ("mlp.c_proj",)),
    Family("phi", ("phi",), ("self_attn.dense",), ("mlp.fc2",), "parallel attention + MLP"),
    Family("gpt-neox", ("gpt_neox",), ("attention.dense",), ("mlp.dense_4h_to_h",),
           "parallel residual"),
)

# Config keys that hold one entry per layer. Each new block takes the entry of its source layer.
PER_LAYER_KEYS = ("layer_types", "no_rope_layers", "sliding_window_layers_pattern")
# Config keys that hold a list of layer *indices*; remapped, never copied blindly.
INDEX_LIST_KEYS = ("mlp_only_layers",)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str, writers: list[str] | None = None) -> Family:
    """The family of ``model_type``; ``writers`` lets a user name the residual writers of a model
    we do not list (the numerical identity check still decides)."""
    if writers:
        return Family(f"user:{model_type}", (model_type,), tuple(writers), (), "user-declared")
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported: llamapro does not know which projections of "
        f"its blocks write into the residual stream, so it cannot make new blocks identities. "
        f"Supported: {', '.join(supported_model_types())}. If you know them, pass "
        f"--residual-writers (e.g. --residual-writers self_attn.o_proj,mlp.down_proj); the "
        f"expansion is then checked numerically and refused if it is not an exact identity."
    )


def writer_param_names(layer_param_names, family: Family) -> list[str]:
    """Names (relative to a decoder layer) of the parameters to zero in a new block.

    Raises if a layer lacks an attention writer or an MLP writer that the family promises: that
    means the model's module names differ from what we know and zeroing would be incomplete.
    """
    names = list(layer_param_names)
    out: list[str] = []

    def match(prefix: str) -> list[str]:
        # ``*`` stands for one dotted component (an expert index); never a substring match.
        rx = re.compile("^" + r"\.".join("[^.]+" if c == "*" else re.escape(c)
                                          for c in prefix.split(".")) + r"(\..+)?$")
        return [n for n in names if rx.match(n)]

    for group, label in ((family.attn_writers, "attention"), (family.mlp_writers, "MLP")):
        if not group:
            continue
        found = [n for w in group for n in match(w)]
        if not found:
            raise UnsupportedModelError(
                f"family {family.name}: no {label} output projection among this layer's "
                f"parameters (looked for {', '.join(group)}; the layer has "
                f"{', '.join(sorted(names))}). The model's module names differ from what "
                f"llamapro knows; pass --residual-writers to name them."
            )
        out.extend(found)
    # A projection may only be zeroed whole: refuse names that look like writers but matched nothing
    return sorted(set(out))


def is_quantized(config: dict) -> bool:
    return bool(config.get("quantization_config"))


_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def depth_key(config: dict) -> str:
    for key in _DEPTH_KEYS:
        if isinstance(config.get(key), int):
            return key
    raise UnsupportedModelError("config has no num_hidden_layers; is this a decoder LLM config?")


def num_layers_of(config: dict) -> int:
    for key in _DEPTH_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    raise UnsupportedModelError("config has no num_hidden_layers; is this a decoder LLM config?")


def _moe_dense_layers(config: dict, n: int) -> list[int] | None:
    """Indices of dense (non-MoE) layers for Qwen-MoE-style configs, or None if not applicable."""
    if "decoder_sparse_step" not in config and "mlp_only_layers" not in config:
        return None
    step = int(config.get("decoder_sparse_step") or 1)
    only = set(config.get("mlp_only_layers") or [])
    # Qwen3-MoE serialises num_experts under its attribute-map name num_local_experts.
    num_experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
    return [i for i in range(n) if i in only or not (num_experts > 0 and (i + 1) % step == 0)]


def expand_config(config: dict, placement: Placement) -> tuple[dict, list[str]]:
    """The config of the expanded model, and the names of the keys that changed.

    ``num_hidden_layers`` grows; each per-layer list gains its source layer's entry; Qwen-MoE's
    sparse-step rule, which depends on the layer *index*, is rewritten as an explicit list of dense
    layers so every new block keeps the MLP kind of the block it copies.
    """
    n = num_layers_of(config)
    if n != placement.num_original:
        raise ValueError(f"placement is for {placement.num_original} layers, config has {n}")
    new = copy.deepcopy(config)
    src = placement.source_of()
    changed = [depth_key(config)]
    new[changed[0]] = placement.num_total

    for key in PER_LAYER_KEYS:
        val = config.get(key)
        if isinstance(val, list):
            if len(val) != n:
                raise UnsupportedModelError(
                    f"config.{key} has {len(val)} entries but the model has {n} layers; "
                    "fix the base config before expanding"
                )
            new[key] = [val[s] for s in src]
            changed.append(key)

    dense = _moe_dense_layers(config, n)
    if dense is not None:
        dense_set = set(dense)
        new["mlp_only_layers"] = [i for i, s in enumerate(src) if s in dense_set]
        new["decoder_sparse_step"] = 1
        changed += ["mlp_only_layers", "decoder_sparse_step"]

    # Any other list with one scalar per layer is almost surely per-layer too: extend it the same
    # way (and say so), rather than leave a config that no longer matches the model.
    for key, val in config.items():
        if key in changed or key in INDEX_LIST_KEYS or not isinstance(val, list) or n < 2:
            continue
        if len(val) == n and all(isinstance(v, (str, int, float, bool)) or v is None for v in val):
            if key in ("architectures", "bad_words_ids", "eos_token_id", "suppress_tokens"):
                continue
            new[key] = [val[s] for s in src]
            changed.append(key)
    return new, changed


def strip_config(expanded: dict, base_config: dict | None, new_indices) -> dict:
    """The config of the stripped model: the recorded base config when we have it (exact
    rollback), else the expanded config with the new entries removed."""
    if base_config is not None:
        return copy.deepcopy(base_config)
    keep = [i for i in range(num_layers_of(expanded)) if i not in set(new_indices)]
    out = copy.deepcopy(expanded)
    out[depth_key(out)] = len(keep)
    for key in PER_LAYER_KEYS:
        if isinstance(out.get(key), list):
            out[key] = [out[key][i] for i in keep]
    if isinstance(out.get("mlp_only_layers"), list):
        pos = {old: j for j, old in enumerate(keep)}
        out["mlp_only_layers"] = [pos[i] for i in out["mlp_only_layers"] if i in pos]
    return out


# --- state-dict key mapping, shared by both paths ---------------------------------------------

_LAYER_KEY = re.compile(
    r"^(?P<pre>(?:[A-Za-z_][\w]*\.)*?(?:layers|h|blocks)\.)(?P<idx>\d+)\.(?P<rest>.+)$")


def split_layer_key(key: str) -> tuple[str, int, str] | None:
    """``model.layers.12.mlp.experts.3.w1`` -> ("model.layers.", 12, "mlp.experts.3.w1").

    Only the first ``layers.<n>`` is a layer index; expert indices further right are never touched
    (renaming by string replacement is how MoE checkpoints get corrupted).
    """
    m = _LAYER_KEY.match(key)
    if not m:
        return None
    return m.group("pre"), int(m.group("idx")), m.group("rest")


def layers_prefix(keys, num_layers: int) -> str:
    """The prefix (e.g. ``model.``) under which the decoder layers 0..num_layers-1 live."""
    seen: dict[str, set[int]] = {}
    for k in keys:
        parts = split_layer_key(k)
        if parts:
            seen.setdefault(parts[0], set()).add(parts[1])
    full = [p for p, idx in seen.items() if idx == set(range(num_layers))]
    if len(full) != 1:
        raise UnsupportedModelError(
            f"cannot find a unique stack of {num_layers} decoder layers in the checkpoint "
            f"(candidates: { {p: len(i) for p, i in seen.items()} })"
        )
    return full[0]


@dataclass
class KeyPlan:
    """One output tensor: its name, the input tensor it comes from, and whether it is zeroed."""

    out_key: str
    src_key: str
    zero: bool = False
    new_layer: int | None = None


def plan_keys(keys, placement: Placement, family: Family) -> list[KeyPlan]:
    """Map every input tensor name to its output name(s): originals renumbered, each new block a
    copy of its source layer with the residual writers zeroed."""
    keys = list(keys)
    prefix = layers_prefix(keys, placement.num_original)
    o2e = placement.orig_to_expanded()
    by_layer: dict[int, list[tuple[str, str]]] = {}
    out: list[KeyPlan] = []
    for k in keys:
        parts = split_layer_key(k)
        if parts and parts[0] == prefix:
            _, i, rest = parts
            by_layer.setdefault(i, []).append((k, rest))
            out.append(KeyPlan(f"{prefix}{o2e[i]}.{rest}", k))
        else:
            out.append(KeyPlan(k, k))
    for j, s in placement.new_sources().items():
        rests = [rest for _, rest in by_layer[s]]
        zero = set(writer_param_names(rests, family))
        for k, rest in by_layer[s]:
            out.append(KeyPlan(f"{prefix}{j}.{rest}", k, rest in zero, j))
    return out
