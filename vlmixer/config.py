"""Typed YAML configs: every key is declared (with its comment) in a dataclass.

A config file is merged over the dataclass defaults, then `a.b=value`
overrides from the command line; unknown keys and values of the wrong type
are `ConfigError`s naming the key, never silently ignored. Resolved configs
are plain dicts again (`to_dict`) so checkpoints and stores can carry them.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vlmixer.errors import ConfigError

CONFIG_KINDS = ("detector", "pretrain")

T = TypeVar("T")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys are errors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known under '{prefix or '.'}': {known})")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(v, hints[name], f"{prefix}{name}") for name, v in data.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {p} is not a mapping")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """`a.b=3 c=[1,2]` -> nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value ({e})") from None
        _set_path(out, key.strip(), value)
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file does not exist") from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{p}: cannot read config ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a config file must hold a mapping at top level")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of `cls` <- file at `path` (optional `_base_: other.yaml`) <- overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
        base = data.pop("_base_", None)
        if base is not None:
            base_path = Path(path).parent / str(base)
            data = _merge(to_dict(load_config(cls, base_path)), data)
    try:
        return from_dict(cls, _merge(data, parse_overrides(overrides)))
    except ConfigError as e:
        raise ConfigError(_blame(cls, data, overrides, str(e), path)) from None


def _blame(cls: type, data: dict[str, Any], overrides: Sequence[str], error: str, path: str | Path | None) -> str:
    """Say where a bad value came from: the file if it fails this way alone, else the first
    override after which it does. Without this a typo on the command line was reported as an
    error in the yaml."""
    where = f"{error} in {path}" if path is not None else error
    for i in range(len(overrides) + 1):
        try:
            from_dict(cls, _merge(data, parse_overrides(overrides[:i])))
        except ConfigError as e:
            if str(e) == error:
                return where if i == 0 else f"{error} (from the command-line override {overrides[i - 1]!r})"
    return where


def bundled_config_dir() -> Path:
    """The folder of the configs that ship with vlmixer (a checkout's `configs/`, or the wheel's copy)."""
    import importlib.resources

    return Path(str(importlib.resources.files("vlmixer.configs")))


def bundled_configs(kind: str | None = None) -> list[str]:
    """Names of the bundled configs, `KIND/NAME` (e.g. `detector/vinvl_x152c4`), sorted."""
    root = bundled_config_dir()
    kinds = CONFIG_KINDS if kind is None else (kind,)
    return sorted(f"{k}/{p.stem}" for k in kinds for p in (root / k).glob("*.yaml"))


def resolve_config(spec: str | Path, kind: str | None = None) -> Path:
    """A config file from a path or a bundled name, as detectron2's model zoo resolves names.

    An existing file wins; otherwise `NAME`, `KIND/NAME` (with or without `.yaml`) name a
    bundled config, `kind` (`detector` or `pretrain`) saying where a bare name is looked up.
    Neither is a ConfigError that lists what is bundled.
    """
    p = Path(spec)
    if p.is_file():
        return p
    name = str(spec).removesuffix(".yaml")
    candidates = [n for n in bundled_configs(kind) if n == name or n.split("/", 1)[1] == name]
    if len(candidates) == 1:
        return bundled_config_dir() / f"{candidates[0]}.yaml"
    if len(candidates) > 1:
        raise ConfigError(f"config {spec!s}: ambiguous bundled name, say which: {', '.join(candidates)}")
    known = ", ".join(bundled_configs(kind))
    raise ConfigError(f"{spec!s}: no such config file, nor a bundled config name (bundled: {known})")
