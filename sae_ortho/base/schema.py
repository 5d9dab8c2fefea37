"""Typed parameter files: dataclasses built from YAML with unknown keys, wrong types and missing
required keys rejected in one line that names the key; and the schema as a table a user can read.

`build(cls, raw)` is the whole loader: nested dataclasses, Literal choices, tuples, dicts, unions.
`schema_rows(cls)` lists every key with its type, default and the comment beside its field, which
`python -m sae_ortho.base.schema_doc` prints as the README's parameter tables.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import sys
import tokenize
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ParamError(ValueError):
    """A parameter is unknown, missing, of the wrong type, or out of range. The message names the key."""


def check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ParamError(f"{key}: {msg}")


def build(cls: type[T], raw: Any, prefix: str = "") -> T:
    """Construct dataclass `cls` from a mapping, rejecting unknown keys, missing required keys and wrong types."""
    if not isinstance(raw, dict):
        raise ParamError(f"{prefix or 'params'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else key
            raise ParamError(f"{where}: unknown parameter (known: {', '.join(sorted(fields))})")
    for name, f in fields.items():
        if name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            where = f"{prefix}.{name}" if prefix else name
            raise ParamError(f"{where}: missing (required, no default)")
    kwargs = {}
    for key, value in raw.items():
        where = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(hints[key], value, where)
        if key == "seed" or key.endswith(("_seed", "seeds")):  # every seed, found by name (the catalogue's finding)
            seeds = kwargs[key] if isinstance(kwargs[key], tuple) else (kwargs[key],)
            check(
                all(s >= 0 for s in seeds), where, f"seeds must be >= 0 (numpy's generators refuse others), got {value}"
            )
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        check(value in allowed, where, f"must be one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            if arm is type(None) and value is None:
                return None
            try:
                return _coerce(arm, value, where)
            except ParamError:
                continue
        raise ParamError(f"{where}: {value!r} does not match {hint}")
    if origin is tuple:
        check(isinstance(value, (list, tuple)), where, f"must be a list, got {value!r}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_coerce(item, v, f"{where}[{n}]") for n, v in enumerate(value))
    if origin is dict:
        check(isinstance(value, dict), where, f"must be a mapping, got {value!r}")
        key_hint, value_hint = typing.get_args(hint)
        return {_coerce(key_hint, k, where): _coerce(value_hint, v, f"{where}.{k}") for k, v in value.items()}
    if hint is float:
        check(
            isinstance(value, (int, float)) and not isinstance(value, bool), where, f"must be a number, got {value!r}"
        )
        return float(value)
    if hint is int:
        check(isinstance(value, int) and not isinstance(value, bool), where, f"must be an integer, got {value!r}")
        return value
    if hint is bool:
        check(isinstance(value, bool), where, f"must be true or false, got {value!r}")
        return value
    if hint is str:
        check(isinstance(value, str), where, f"must be a string, got {value!r}")
        return value
    return value


def read_yaml(path: Path | str) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh) or {}


def load_or_exit(loader: Callable[[Path], T], path: Path | str) -> T:
    """For stage entry points: a bad or missing parameter file gives one line on stderr and exit code 2."""
    try:
        return loader(Path(path))
    except (ParamError, FileNotFoundError) as err:
        detail = "not found (run from the repository root)" if isinstance(err, FileNotFoundError) else err
        print(f"error: {path}: {detail}", file=sys.stderr)
        raise SystemExit(2) from None


# --------------------------------------------------------------------------------------------
# The schema as a table


def _field_comments(cls: type) -> dict[str, str]:
    """The `# comment` on each field's line of the class body (the why of its default)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    current: str | None = None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and current is None:
            current = tok.string
        elif tok.type == tokenize.COMMENT and current is not None:
            comments.setdefault(current, tok.string.lstrip("# ").strip())
        elif tok.type == tokenize.NEWLINE:
            current = None
    return comments


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " \\| ".join(str(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    if origin is dict:
        k, v = typing.get_args(hint)
        return f"map {_type_name(k)} -> {_type_name(v)}"
    if dataclasses.is_dataclass(hint):
        return hint.__name__
    return getattr(hint, "__name__", str(hint))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def schema_rows(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for every key of `cls`, nested sections expanded; a nested
    section's defaults are those of its parent's default (e.g. `synthetic.train`'s own factory)."""
    rows = []
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        if dataclasses.is_dataclass(hint):
            rows.extend(schema_rows(hint, f"{key}.", None if default is dataclasses.MISSING else default))
            continue
        shown = "required" if default is dataclasses.MISSING else _yaml_value(default)
        rows.append((key, _type_name(hint), shown, comments.get(f.name, "")))
    return rows


def _yaml_value(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, tuple):
        value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    if isinstance(value, dict):
        value = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in value.items()}
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix(" ...")


def yaml_comments(path: Path) -> dict[str, str]:
    """The trailing `# comment` of each `key:` line of a block-style YAML file, by dotted key path."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in path.read_text().splitlines():
        body, _, comment = line.partition(" #")
        if not body.strip() or body.lstrip().startswith(("#", "-")) or ":" not in body:
            continue
        indent = len(body) - len(body.lstrip())
        key = body.strip().split(":", 1)[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        if comment.strip():
            comments[".".join(k for _, k in stack)] = comment.strip().lstrip("#").strip()
    return comments


def markdown_table(cls: type, yaml_path: Path | None = None) -> str:
    """The schema of `cls` as a table; the meaning is the field's comment in the code, else its line's
    comment in the YAML file."""
    from_yaml = yaml_comments(yaml_path) if yaml_path is not None and yaml_path.exists() else {}
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, type_name, default, meaning in schema_rows(cls):
        meaning = meaning or from_yaml.get(key, "")
        lines.append(f"| `{key}` | {type_name} | `{default}` | {meaning.replace('|', '/')} |")
    return "\n".join(lines)
