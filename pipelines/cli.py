"""Typed job configs from a YAML file plus ``key=value`` overrides on the command line.

    python jobs/features.py --config my.yaml source=s3://bucket/raw/ encode.batch_size=32

Overrides are dotted paths into the config dataclass, loaded by :mod:`mmm.config_io` (the same
loader as the training jobs: unknown keys are errors, values are coerced to the field types).
``--help`` lists every field with its default and the docstring written under it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap

from mmm import config_io


def attribute_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal written under each field of a dataclass."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def defaults(cls: type) -> dict:
    """Every field's default as plain data, nested sections included, without building ``cls``
    (a job config may insist on a field, e.g. ``source``). Field factories count: a pool's
    defaults are those of the field, not of the PoolConfig class."""
    out = {}
    for f in dataclasses.fields(cls):
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def describe(cls: type, values: dict, prefix: str = "") -> list[str]:
    """One help line per leaf field: ``name = default`` and its docstring."""
    lines, docs = [], attribute_docs(cls)
    for f in dataclasses.fields(cls):
        value = values[f.name]
        section = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(section):
            lines += describe(type(section), value, f"{prefix}{f.name}.")
            continue
        doc = docs.get(f.name, "")
        lines.append(f"  {prefix}{f.name} = {json.dumps(value)}" + (f"\n      {doc}" if doc else ""))
    return lines


def parse(cls: type, argv: list[str] | None, doc: str | None):
    """Parse ``[--config FILE] [key=value ...]`` into a ``cls`` instance (exits 2 on a bad key)."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (key = default):\n" + "\n".join(describe(cls, defaults(cls))),
    )
    parser.add_argument("--config", help="YAML file with any of the fields below (overrides win)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted field = YAML value")
    args = parser.parse_args(argv)
    try:
        return config_io.load(cls, defaults(cls), args.config, args.overrides)
    except (ValueError, TypeError) as e:
        parser.error(str(e))


def print_summary(title: str, summary: dict) -> None:
    """A readable block, then the same figures as one JSON line (the last line, for scripts)."""
    print(f"\n== {title} ==")
    for key, value in summary.items():
        print(f"  {key}: {value}")
    print(json.dumps(summary, default=str))
