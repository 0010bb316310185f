"""One typed config tree for every step, loaded strictly from YAML with dotted overrides.

Unknown keys are errors that name the key and its section (a misspelled key silently ignored is a
run wasted). Each field documents why it exists. Derived values are methods. No torch, no ray.

    cfg = load_config("jobs/configs/demo.yaml", ["expand.blocks=4", "data.seq_len=512"])
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and how to fix it."""


def default_cache_dir() -> Path:
    """Where llamapro caches the converted demo model and demo corpora.

    ``$LLAMAPRO_CACHE`` if set, else ``$XDG_CACHE_HOME/llamapro``, else ``~/.cache/llamapro``.
    """
    if os.environ.get("LLAMAPRO_CACHE"):
        return Path(os.environ["LLAMAPRO_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llamapro"


# --- sections -------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    base: str = "demo:smollm2-135m-instruct"
    """The base model: an HF directory, a hub id (when the hub is reachable), or
    ``demo:smollm2-135m-instruct`` (the bundled demo model, converted once from GGUF and cached)."""
    trust_remote_code: bool = False
    """Run model code shipped with a checkpoint. Off unless you trust its author."""
    dtype: str = "auto"
    """Weights dtype for loading: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."""

    def __post_init__(self):
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype={self.dtype!r}: use auto, float32, bfloat16 or float16")


@dataclass
class ExpandConfig:
    blocks: int = 6
    """How many new blocks to insert. Any N >= 1 works with every strategy."""
    strategy: str = "even"
    """even (LLaMA-Pro interleaving), top, bottom or middle. Ignored when positions is set."""
    positions: list[int] = field(default_factory=list)
    """Explicit indices of the new blocks in the expanded model (overrides strategy)."""
    residual_writers: list[str] = field(default_factory=list)
    """For a model family llamapro does not know: module paths inside a layer that write into the
    residual stream (e.g. self_attn.o_proj, mlp.down_proj). Checked numerically."""
    verify: bool = True
    """Prove identity (logits + greedy generation vs the base) right after expanding."""

    def __post_init__(self):
        from .strategies import STRATEGIES

        if not self.positions and self.strategy not in STRATEGIES:
            raise ConfigError(
                f"expand.strategy={self.strategy!r}: choose one of {', '.join(STRATEGIES)}"
            )
        if not self.positions and (not isinstance(self.blocks, int) or self.blocks < 1):
            raise ConfigError(f"expand.blocks={self.blocks!r}: must be an integer >= 1")


@dataclass
class RunConfig:
    name: str = "demo"
    """Run name: the directory under output_dir and the Ray Train run name."""
    output_dir: str = "runs"
    """Where every artifact of a run goes (local path or a cloud URI)."""
    seed: int = 0

    def run_dir(self) -> str:
        return f"{self.output_dir.rstrip('/')}/{self.name}"


@dataclass
class Config:
    """The whole pipeline. Each step reads its section; unknown sections are errors."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    expand: ExpandConfig = field(default_factory=ExpandConfig)


# --- machinery ------------------------------------------------------------------------------------

def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        last = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                last = e
        raise last or ConfigError(f"{where}: bad value {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):  # "4,9,14" from a CLI override
            value = [v for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys raise naming the full dotted key."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        path = ", ".join(f"{where + '.' if where else ''}{k}" for k in unknown)
        raise ConfigError(
            f"unknown config key(s): {path}. Valid keys{' in ' + where if where else ''}: "
            f"{', '.join(sorted(types_))}"
        )
    kwargs = {k: _coerce(v, types_[k], f"{where + '.' if where else ''}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides) -> dict:
    """Apply ``a.b=c`` overrides (values parsed as YAML scalars) to a plain dict."""
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key.path=value")
        key, raw = ov.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {p} is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: str | os.PathLike | None = None, overrides=None, cls=Config):
    """Load ``path`` (YAML) strictly, apply dotted overrides, validate, return the typed tree."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides)
    return from_dict(cls, data)
