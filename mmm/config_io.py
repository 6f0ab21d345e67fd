"""Typed configs from plain data, a YAML file and ``key=value`` overrides: one loader for every job.

    base (a job's defaults) <- YAML file <- ``a.b.c=value`` overrides  ->  dataclass instance

Overrides are dotted paths into the dataclass, checked name by name so a typo is an error that
lists the keys that exist; values are parsed as YAML and then coerced to the field's type
(``train.lr=1e-4`` is a float although YAML 1.1 reads it as a string, ``bf16=auto`` stays a
string). A ``str`` field keeps the text as typed where YAML 1.1 would read something else
(``run.name=2024-12-07``, ``lang: no``, ``secret: 0123`` are strings, not a date, False and 83);
an explicit ``null``/``~`` is None, as it is for YAML. :func:`mmm.config.from_dict` builds the
nested dataclasses and rejects unknown keys. Every problem (an unknown key, a wrong type, a YAML
file that is missing, unreadable or not YAML) is a ValueError or TypeError with a one-line message
naming the key or file, which the jobs turn into a usage error.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from typing import Any

import yaml

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


class Unquoted(str):
    """Text the user typed that YAML 1.1 reads as something else: an unquoted scalar read as a
    bool, number or date (``no``, ``0123``, ``2024-12-07``), or an override's whole value when YAML
    reads it as anything but that text (``data.langs=[en, no]``). A ``str`` field takes the text;
    any other field takes YAML's reading, ``value``."""

    value: Any

    def __new__(cls, text: str, value: Any) -> "Unquoted":
        self = super().__new__(cls, text)
        self.value = value
        return self

    def __getnewargs__(self) -> tuple[str, Any]:  # copy.deepcopy and pickle rebuild it through __new__
        return str(self), self.value


class _TextKeepingLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s YAML 1.1, except that an unquoted bool, number or date comes back as
    :class:`Unquoted`: after loading, YAML's reading is all that is left, and ``2024-12-07``,
    ``no`` and ``0123`` cannot be told back into their text (``0123`` is 83)."""


def _keeping_text(construct):
    def construct_keeping_text(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
        value = construct(loader, node)
        return Unquoted(node.value, value) if node.style is None else value  # a quoted one is a string already

    return construct_keeping_text


for _tag in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp"):
    _TextKeepingLoader.add_constructor(_tag, _keeping_text(yaml.SafeLoader.yaml_constructors[_tag]))


def read_yaml(path: str) -> dict[str, Any]:
    """The mapping in the YAML file at ``path``; a missing, unreadable or invalid file is a
    ValueError that names it."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.load(f, Loader=_TextKeepingLoader) or {}
    except OSError as e:
        raise ValueError(f"config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"config file {path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path}: invalid YAML: {_yaml_problem(e)}") from None
    _check(isinstance(tree, dict), f"config file {path}: expected a mapping at the top level")
    return tree


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line: where and what (PyYAML's own message spans several lines with a caret drawing)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=1e-4`` -> ("train.lr", value parsed as YAML; coerced to the field type later).
    A value YAML reads as anything but its own text is :class:`Unquoted`, so a ``str`` field gets
    what was typed (``run.name=2024-12-07``); ``null`` and ``~`` are None."""
    key, sep, raw = text.partition("=")
    _check(bool(sep) and bool(key.strip()), f"override {text!r} is not key=value (e.g. train.lr=1e-4)")
    return key.strip(), _override_value(raw)


def _override_value(raw: str) -> Any:
    if not raw.strip():
        return ""
    try:
        value = yaml.load(raw, Loader=_TextKeepingLoader)
    except yaml.YAMLError:
        return raw  # not YAML (``@home``, ``it's``): plain text, which only a str field takes
    return value if value is None or value == raw else Unquoted(raw, value)


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
        for a in _union_members(args, value):  # first type that takes the value wins
            try:
                return _coerce(value, a, key)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"{key}: {value!r} is not a {t}")
    if isinstance(value, Unquoted):
        return str(value) if t is str else _coerce(value.value, t, key)
    if origin is list:
        _check(isinstance(value, (list, tuple)), f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value] if args else _yaml_reading(list(value))
    if origin is dict or t is dict:
        _check(isinstance(value, dict), f"{key}: expected a mapping, got {value!r}")
        return _yaml_reading(value)
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
    return _yaml_reading(value)


def _union_members(args: tuple, value: Any) -> list:
    """A union's types in the order written, except that an :class:`Unquoted` value tries str last:
    YAML's reading when another type takes it (``bf16=true`` is True for ``str | bool``), else the
    text (``run.name=2024-12-07``)."""
    members = [a for a in args if a is not type(None)]
    return sorted(members, key=lambda a: a is str) if isinstance(value, Unquoted) else members


def _yaml_reading(value: Any) -> Any:
    """``value`` with each :class:`Unquoted` inside replaced by YAML's reading: what a field with no
    element type to go by (``dict``, ``Any``) holds, as ``yaml.safe_load`` gives it."""
    if isinstance(value, Unquoted):
        return _yaml_reading(value.value)
    if isinstance(value, dict):
        return {_yaml_reading(k): _yaml_reading(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_yaml_reading(v) for v in value)
    return value
