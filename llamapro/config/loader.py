"""The config tree's strict loader: dataclasses built from YAML mappings, unknown keys named with their
full dotted key, values coerced to the field types, dotted overrides applied. It imports no section, so
the root and every section module can use it."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from llamapro.errors import ConfigError


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


def set_dotted(data: dict, key: str, value, where: str | None = None) -> None:
    """Put ``value`` at the dotted ``key`` of a plain config dict, creating sections as needed. A
    list of named mappings (``data.sources``) is entered by an entry's name (or its index):
    ``data.sources.python-docs.weight`` is the weight of the source named python-docs."""
    where = where or f"{key}"
    node = data
    parts = key.strip().split(".")
    for i, p in enumerate(parts[:-1]):
        here = ".".join(parts[:i + 1])
        if isinstance(node, dict):
            node = node.setdefault(p, {})
        elif isinstance(node, list):
            node = _entry(node, p, ".".join(parts[:i]), where)
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{where}: {here} is not a section")
    if isinstance(node, list):
        section = ".".join(parts[:-1])
        raise ConfigError(f"{where}: {section} is a list; set one key of one entry, by its name: "
                          f"{section}.{parts[-1] if not parts[-1].isdigit() else '<name>'}.<key> "
                          f"(e.g. data.sources.python-docs.weight=0.5)")
    node[parts[-1]] = value


def get_dotted(data, key: str):
    """The value at the dotted ``key`` of a plain config dict (named list entries as in
    set_dotted), or None where the path does not exist."""
    node = data
    for p in key.split("."):
        if isinstance(node, list):
            try:
                node = _entry(node, p, "", "")
            except ConfigError:
                return None
        elif isinstance(node, dict):
            node = node.get(p)
        else:
            return None
    return node


def _entry(items: list, part: str, section: str, where: str):
    """The entry of a list of named mappings called ``part`` (or at index ``part``)."""
    names = [x.get("name") for x in items if isinstance(x, dict)]
    for x in items:
        if isinstance(x, dict) and str(x.get("name")) == part:
            return x
    if part.isdigit() and int(part) < len(items):
        return items[int(part)]
    raise ConfigError(f"{where}: {section} has no entry named {part!r} "
                      f"(names: {', '.join(str(n) for n in names) or 'none'}; an index works too)")


def apply_overrides(data: dict, overrides) -> dict:
    """Apply ``a.b=c`` overrides (values parsed as YAML scalars) to a plain dict; a named list
    entry is addressed by its name (``data.sources.python-docs.weight=0.5``, see set_dotted)."""
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key.path=value")
        key, raw = ov.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        set_dotted(data, key, value, f"override {ov!r}")
    return data


def read_config_data(path: str | os.PathLike | None = None, overrides=None) -> dict:
    """The YAML mapping at ``path`` (none: empty) with dotted overrides applied, not yet typed."""
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
    return apply_overrides(data, overrides)
