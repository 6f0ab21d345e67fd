"""Typed configs from plain data, a YAML file and ``key=value`` overrides: one loader for every job.

    base (a job's defaults) <- YAML file <- ``a.b.c=value`` overrides  ->  dataclass instance

Overrides are dotted paths into the dataclass, checked name by name so a typo is an error that
lists the keys that exist; values are parsed as YAML and then coerced to the field's type
(``train.lr=1e-4`` is a float although YAML 1.1 reads it as a string, ``bf16=auto`` stays a
string). :func:`mmm.config.from_dict` builds the nested dataclasses and rejects unknown keys.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from typing import Any

from .config import from_dict


def load(cls: type, base: dict[str, Any], path: str | None = None, overrides: list[str] = ()) -> Any:
    """``base`` <- the YAML mapping at ``path`` <- ``key=value`` overrides, as a ``cls`` instance."""
    tree = merge(base, read_yaml(path)) if path else dict(base)
    return load_parsed(cls, tree, [parse_override(o) for o in overrides])


def load_parsed(cls: type, tree: dict[str, Any], overrides=()) -> Any:
    """``tree`` <- already parsed ``(dotted key, value)`` overrides, as a ``cls`` instance."""
    tree = copy.deepcopy(tree)
    for key, value in overrides:
        set_path(cls, tree, key, value)
    return from_dict(cls, coerce_tree(cls, tree, ""))


def model_config(preset_name: str, overrides: dict[str, Any] | None = None):
    """A preset (``mmm.config.preset``) with nested ``ModelConfig`` field overrides over it
    (``{"audio": {"pretrained": "/ckpt/whisper"}}``): values coerced to the field types, an unknown
    key an error that names it."""
    from .config import ModelConfig, preset

    tree = merge(preset(preset_name).to_dict(), overrides or {})
    return from_dict(ModelConfig, coerce_tree(ModelConfig, tree, "model"))


def read_yaml(path: str) -> dict[str, Any]:
    import yaml

    with open(path) as f:
        tree = yaml.safe_load(f) or {}
    _check(isinstance(tree, dict), f"{path}: expected a mapping at the top level")
    return tree


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=1e-4`` -> ("train.lr", value parsed as YAML; coerced to the field type later)."""
    import yaml

    key, sep, raw = text.partition("=")
    _check(bool(sep) and bool(key.strip()), f"override {text!r} is not key=value (e.g. train.lr=1e-4)")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``top`` into a copy of ``base`` (sections merge, leaves replace)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def set_path(cls: type, tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in ``tree``, checking each name against ``cls`` so a typo names the valid keys."""
    node, parts = tree, dotted.split(".")
    for i, name in enumerate(parts):
        if cls is not None:
            hints = typing.get_type_hints(cls)
            if name not in hints:
                where = ".".join(parts[:i]) or "top level"
                raise ValueError(f"unknown config key {dotted!r}: {where} has {sorted(hints)}")
            cls = hints[name] if dataclasses.is_dataclass(hints[name]) else None
        if i == len(parts) - 1:
            node[name] = value
        else:
            node = node.setdefault(name, {})
            _check(isinstance(node, dict), f"cannot set {dotted!r}: {'.'.join(parts[:i + 1])} is not a section")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def coerce_tree(cls: type, d: Any, where: str) -> Any:
    """Coerce each leaf of ``d`` to its dataclass field's type; unknown keys are left for from_dict."""
    if not isinstance(d, dict):
        raise TypeError(f"{where or cls.__name__}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in d.items():
        t = hints.get(name)
        key = f"{where}.{name}" if where else name
        if t is not None and dataclasses.is_dataclass(t):
            out[name] = coerce_tree(t, value, key)
        elif t is not None:
            out[name] = _coerce(value, t, key)
        else:
            out[name] = value
    return out


def _coerce(value: Any, t: Any, key: str) -> Any:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):  # first type that takes the value wins
            try:
                return _coerce(value, a, key)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"{key}: {value!r} is not a {t}")
    if origin is list:
        _check(isinstance(value, (list, tuple)), f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value] if args else list(value)
    if origin is dict or t is dict:
        _check(isinstance(value, dict), f"{key}: expected a mapping, got {value!r}")
        return value
    if t is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if t in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value) if t is float else int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected {t.__name__}, got {value!r}") from None
        _check(t is float or float(value) == number, f"{key}: expected an integer, got {value!r}")
        return number
    if t is str:
        _check(isinstance(value, str), f"{key}: expected a string, got {value!r}")
        return value
    return value
