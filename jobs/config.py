"""Typed job configs: one dataclass per job is the single source of truth for YAML, `--set` overrides,
defaults and `--help`.

A job config is a (nested) `@dataclass` whose fields carry `metadata={"help": ...}`. `load_config` builds it
from a YAML file plus dotted overrides (`--set ppo.kl.target=6`), checking every value's type and naming the
dotted field in the error; unknown keys are errors, never silently ignored. Each dataclass may define
`validate(self)` for cross-field rules; it runs after construction, before any work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import yaml

from models.config import ConfigError, field

__all__ = ["ConfigError", "field", "load_config", "from_dict", "to_dict", "dump_yaml", "help_lines"]

T = TypeVar("T")


def _copy(value: Any) -> Any:

    return copy.deepcopy(value)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check/convert `value` to the annotated type `tp`; raise ConfigError naming `where`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        _, val_tp = get_args(tp) or (Any, Any)
        return {str(k): _coerce(val_tp, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{where}: unknown field (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            where = f"{prefix}.{f.name}" if prefix else f.name
            value = data[f.name]
            if isinstance(value, dict) and dataclasses.is_dataclass(hints[f.name]):
                # A section given partially (YAML or --set) overrides the field's own default instance,
                # e.g. field(OptimConfig(lr=1e-3)) keeps lr=1e-3 when only max_steps is set.
                value = deep_merge(_section_default(f), value)
            kwargs[f.name] = _coerce(hints[f.name], value, where)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field was not given
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None
    except ValueError as e:  # a dataclass that checks itself in __post_init__ (messages start with the field)
        raise ConfigError(f"{prefix}.{e}" if prefix else str(e)) from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(f"{prefix}.{e}" if prefix else str(e)) from None
    return obj


def _section_default(f: dataclasses.Field) -> dict[str, Any]:
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    elif f.default is not dataclasses.MISSING:
        default = f.default
    else:
        return {}
    return dataclasses.asdict(default) if dataclasses.is_dataclass(default) else {}


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`base` with `update` laid over it, nested mappings merged key by key (neither argument is modified)."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=VALUE` → (["a","b","c"], yaml-parsed VALUE)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads "3e-4" as a string
    return key.split("."), value


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return s.strip().lower() not in {"nan", "inf", "-inf", "+inf", "infinity"}


def merge(base: dict[str, Any], keys: list[str], value: Any) -> None:
    node = base
    for k in keys[:-1]:
        nxt = node.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            node[k] = nxt
        node = nxt
    node[keys[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file {str(p)!r}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {p}: top level must be a mapping of fields")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None, values: dict[str, Any] | None = None) -> T:
    """Build `cls` from optional `base` dict, then a YAML file, then `--set` overrides, then `values` (dotted field →
    Python value, e.g. from positional arguments; later wins)."""
    data: dict[str, Any] = _copy(base) if base else {}
    if path:
        for k, v in _flatten(read_yaml(path)):
            merge(data, k, v)
    for item in overrides or []:
        keys, value = parse_override(item)
        merge(data, keys, value)
    for key, value in (values or {}).items():
        merge(data, key.split("."), value)
    return _build(cls, data)


def _flatten(d: dict[str, Any], prefix: list[str] | None = None) -> list[tuple[list[str], Any]]:
    out: list[tuple[list[str], Any]] = []
    for k, v in d.items():
        path = [*(prefix or []), str(k)]
        if isinstance(v, dict) and v:
            out.extend(_flatten(v, path))
        else:
            out.append((path, v))
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain YAML-able data."""
    return _plain(dataclasses.asdict(cfg))


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    return _build(cls, _copy(data))


def dump_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config atomically (tmp + rename: never half-written)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(p)


def help_lines(cls: type, prefix: str = "", defaults: Any = None) -> list[str]:
    """One line per leaf field: dotted name, type, default, help. `defaults`: the section's own default instance
    (a section declared as `field(Section(x=1))` shows x = 1, not the class default)."""
    lines: list[str] = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        if dataclasses.is_dataclass(tp):
            lines.append(f"{name}:  {f.metadata.get('help', '')}".rstrip())
            lines.extend(help_lines(tp, name + ".", default if dataclasses.is_dataclass(default) else None))
            continue
        tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        lines.append(f"  {name} ({tname}) = {default!r}  {f.metadata.get('help', '')}".rstrip())
    return lines
