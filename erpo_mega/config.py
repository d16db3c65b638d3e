"""Typed configuration: dataclasses loaded from YAML (or dicts) with strict validation.

Every config in the project is a dataclass. `from_dict` walks the dataclass fields and
rejects unknown keys, wrong types and out-of-range values with a `ConfigError` that names
the dotted key and the file, so a typo in a 7B run's YAML fails at start-up, not hours in.

Range and choice constraints live next to the field, as metadata:

    lr: float = field(default=1e-6, metadata=bounds(gt=0))
    anchor: str = field(default="redistribute", metadata=choices("redistribute", "additive"))

Command-line overrides use dotted keys (`train.lr=3e-6`), parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key = key
        self.source = source
        where = f" (in {source})" if source else ""
        super().__init__(f"config key '{key}'{where}: {message}")


def bounds(*, gt: float | None = None, ge: float | None = None, lt: float | None = None,
           le: float | None = None) -> dict:
    """Field metadata: numeric range the value must fall in."""
    return {"bounds": (gt, ge, lt, le)}


def choices(*allowed: Any) -> dict:
    """Field metadata: the value must be one of `allowed`."""
    return {"choices": tuple(allowed)}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Check `value` against annotation `tp`; convert only where it loses nothing (int -> float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(key, "must not be null", source)
        errors = []
        real = [a for a in args if a is not type(None)]
        for arg in real:
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                if len(real) == 1 or (dataclasses.is_dataclass(arg) and isinstance(value, dict)):
                    raise  # `X | None` or a mapping for a section: its own error says what is wrong inside
                errors.append(str(e))
        raise ConfigError(key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}", source)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(key, f"must be one of {list(get_args(tp))}, got {value!r}", source)
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping for {tp.__name__}, got {type(value).__name__}", source)
        return from_dict(tp, value, source=source, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {value!r}", source)
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(key, f"expected {len(args)} items, got {len(value)}", source)
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(args, value)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__}", source)
        args = get_args(tp)
        vt = args[1] if args else Any
        return {k: _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true/false, got {value!r}", source)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}", source)
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads `3e-5` (no dot) as a string; a numeric string is unambiguous here.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(key, f"expected a number, got {value!r}", source) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}", source)
        value = float(value)
        if math.isnan(value):
            raise ConfigError(key, "must not be NaN", source)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {type(value).__name__} {value!r}", source)
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(key, f"expected {tp.__name__}, got {type(value).__name__}", source)
    return value


def _check_metadata(value: Any, f: dataclasses.Field, key: str, source: str | None) -> None:
    if value is None:
        return
    allowed = f.metadata.get("choices")
    if allowed is not None and value not in allowed:
        raise ConfigError(key, f"must be one of {list(allowed)}, got {value!r}", source)
    rng = f.metadata.get("bounds")
    if rng is not None:
        gt, ge, lt, le = rng
        if gt is not None and not value > gt:
            raise ConfigError(key, f"must be > {gt}, got {value!r}", source)
        if ge is not None and not value >= ge:
            raise ConfigError(key, f"must be >= {ge}, got {value!r}", source)
        if lt is not None and not value < lt:
            raise ConfigError(key, f"must be < {lt}, got {value!r}", source)
        if le is not None and not value <= le:
            raise ConfigError(key, f"must be <= {le}, got {value!r}", source)


def validate(obj: Any, source: str | None = None, prefix: str = "") -> None:
    """Re-check every field of an already-built dataclass (types, bounds, choices), recursively."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(obj, f.name)
        value = _coerce(value, hints[f.name], key, source)
        _check_metadata(value, f, key, source)


def from_dict(cls: type[T], data: dict | None, source: str | None = None, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys, bad types and bad values."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(prefix or "<root>", f"expected a mapping, got {type(data).__name__}", source)
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(names))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(key, f"unknown key (valid keys: {', '.join(sorted(names))})", source)
    kwargs = {}
    for name, f in names.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            value = _coerce(data[name], hints[name], key, source)
            _check_metadata(value, f, key, source)
            kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(key, "is required", source)
    try:
        obj = cls(**kwargs)
    except ConfigError as e:
        # A section's own cross-field check knows only its local key: qualify it with the
        # section path and the file, so nested errors read like every other one.
        key = e.key
        if prefix and not key.startswith(prefix + "."):
            key = f"{prefix}.{key}"
        if key != e.key or (e.source is None and source is not None):
            raise ConfigError(key, str(e).split(": ", 1)[-1], e.source or source) from None
        raise
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config (for YAML dumps and run metadata)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_overrides(overrides: list[str] | None, source: str = "command line") -> dict:
    """`["a.b=1", "c=[1,2]"]` -> nested dict; values parsed as YAML scalars."""
    out: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(item, "override must look like key.sub=value", source)
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(key or item, "empty key in override", source)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(key, f"cannot parse value {raw!r}: {e}", source) from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, "conflicts with another override", source)
        node[parts[-1]] = value
    return out


def merge(base: dict, extra: dict) -> dict:
    """Deep-merge `extra` into a copy of `base`."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml_dict(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("<file>", "config file not found", str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError("<file>", f"invalid YAML: {e}", str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("<root>", f"top level must be a mapping, got {type(data).__name__}", str(path))
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load `cls` from a YAML file plus dotted command-line overrides, validated."""
    data = load_yaml_dict(path) if path is not None else {}
    if overrides:
        # Overrides are validated with the file named, but report their own origin when they are the culprit.
        try:
            from_dict(cls, merge(data, {}), source=str(path) if path else None)
        except ConfigError:
            raise
        return from_dict(cls, merge(data, parse_overrides(overrides)),
                         source=f"{path} + command-line overrides" if path else "command-line overrides")
    return from_dict(cls, data, source=str(path) if path else None)


def save_yaml(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
