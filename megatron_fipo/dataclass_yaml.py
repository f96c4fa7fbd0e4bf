"""Typed loading of nested dataclasses from YAML-shaped dicts, with ``a.b.c=value`` overrides.

Generic machinery behind :mod:`megatron_fipo.config` (whose sections live in ``config_sections``
and ``config_actor``): every key is checked against the dataclass fields (unknown keys raise with
the dotted key and a "did you mean"), every value against the field's annotation (bool, int,
float, str, ``X | None``, ``list[X]``, ``Literal[...]``, nested dataclasses; floats must be
finite). :func:`load_yaml` refuses a mapping that repeats a key (PyYAML would keep the last one
silently). Imports no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key or value a user must fix; the message names the dotted key."""


def require(ok: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that raises :class:`ConfigError` for a key repeated in any mapping,
    naming its dotted path and both lines: a section written twice must not silently replace
    the first. Other YAML errors propagate as ``yaml.YAMLError``."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node, "", set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_unique_keys(node: yaml.Node, prefix: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias: checked where it was defined (and may be recursive)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_unique_keys(item, f"{prefix}[{index}]", seen)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict[str, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        dotted = f"{prefix}.{key_node.value}" if prefix else key_node.value
        line = key_node.start_mark.line + 1
        if key_node.value in first_line:
            raise ConfigError(
                f"duplicate key {dotted!r} at line {line} (first at line "
                f"{first_line[key_node.value]}); merge the two into one"
            )
        first_line[key_node.value] = line
        _check_unique_keys(value_node, dotted, seen)


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from nested mappings, type-checking every value.

    ``prefix`` is the dotted path of ``data`` inside the root (``"algorithm."``), used in errors.
    """
    label = prefix.rstrip(".") or "config"
    require(isinstance(data, Mapping), f"{label} must be a mapping, got {data!r}")
    hints = field_types(cls)
    for key in data:
        if key not in hints:
            raise ConfigError(_unknown_key_message(cls, prefix.rstrip("."), str(key), root=None))
    for item in dataclasses.fields(cls):
        required = item.default is dataclasses.MISSING
        required = required and item.default_factory is dataclasses.MISSING
        require(not required or item.name in data, f"{prefix}{item.name} is required")
    kwargs = {key: _convert(hints[key], value, f"{prefix}{key}") for key, value in data.items()}
    return cls(**kwargs)


def apply_overrides(
    root: type, data: Mapping[str, Any], overrides: Iterable[str]
) -> dict[str, Any]:
    """Copy of ``data`` with each ``a.b.c=value`` applied; keys are checked against ``root``.

    Values are parsed as YAML (``[a, b]`` lists, ``true``, ``null``/``None``), except that a
    string field keeps the text as typed. A mapping value is merged into an existing mapping.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'key=value' strings, not one string")
    result = _deep_copy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        require(bool(sep) and bool(key), f"override {item!r} must look like key.sub=value")
        path = key.split(".")
        value = _parse_override_value(text, _type_at(root, path), key)
        node = result
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}  # e.g. "model.architecture: null" in the file, fields set here
            node = node[part]
        node[path[-1]] = _merge(node.get(path[-1]), value)
    return result


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotation of each dataclass field of ``cls`` (ClassVars excluded)."""
    hints = typing.get_type_hints(cls)
    return {item.name: hints[item.name] for item in dataclasses.fields(cls)}


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {key: _deep_copy(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_deep_copy(value) for value in data]
    return data


def _merge(old: Any, new: Any) -> Any:
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    merged = dict(old)
    for key, value in new.items():
        merged[key] = _merge(merged.get(key), value)
    return merged


def _parse_override_value(text: str, tp: Any, key: str) -> Any:
    stripped = text.strip()
    if stripped in ("None", "null", "~", ""):
        return None
    if _accepts_text(tp):  # so "2024" or "007" stay strings
        return stripped
    try:
        return load_yaml(stripped)
    except ConfigError as error:
        raise ConfigError(f"override {key}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {key}: cannot parse {text!r} as YAML: {error}") from None


def _accepts_text(tp: Any) -> bool:
    tp = _strip_optional(tp)
    if typing.get_origin(tp) is Literal:
        return all(isinstance(arg, str) for arg in typing.get_args(tp))
    return tp is str


def _is_optional(tp: Any) -> bool:
    union = typing.get_origin(tp) in (types.UnionType, typing.Union)
    return union and type(None) in typing.get_args(tp)


def _strip_optional(tp: Any) -> Any:
    if _is_optional(tp):
        (inner,) = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        return inner
    return tp


def _type_at(root: type, path: list[str]) -> Any:
    """Annotation of the field at a dotted path below ``root``; unknown keys raise."""
    tp: Any = root
    for depth, part in enumerate(path):
        cls, prefix = _strip_optional(tp), ".".join(path[:depth])
        require(
            dataclasses.is_dataclass(cls),
            f"{prefix} is a single value ({_type_name(tp)}); it has no key {part!r}",
        )
        hints = field_types(cls)
        if part not in hints:
            raise ConfigError(_unknown_key_message(cls, prefix, part, root))
        tp = hints[part]
    return tp


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    paths = []
    for name, tp in field_types(cls).items():
        inner = _strip_optional(tp)
        dotted = f"{prefix}{name}"
        paths += _leaf_paths(inner, dotted + ".") if dataclasses.is_dataclass(inner) else [dotted]
    return paths


def _unknown_key_message(cls: type, prefix: str, key: str, root: type | None) -> str:
    dotted = f"{prefix}.{key}" if prefix else key
    names = list(field_types(cls))
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    guess = (f"{prefix}.{close[0]}" if prefix else close[0]) if close else None
    if (
        guess is None and root is not None
    ):  # a key under the wrong section: "lr", not "optimizer.lr"
        leaves = {path.rsplit(".", 1)[-1]: path for path in _leaf_paths(root)}
        close = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.8)
        guess = leaves[close[0]] if close else None
    hint = f" (did you mean {guess!r}?)" if guess else ""
    where = f"section {prefix!r}" if prefix else "the top level"
    return f"unknown config key {dotted!r}{hint}; {where} has: {', '.join(names)}"


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; nested mappings become dataclasses."""
    if _is_optional(tp):
        return None if value is None else _convert(_strip_optional(tp), value, key)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        require(
            any(type(value) is type(arg) and value == arg for arg in args),
            f"{key} must be {_type_name(tp)}, got {value!r}",
        )
        return value
    if origin is list:
        require(isinstance(value, list), f"{key} must be a list (e.g. [a, b]), got {value!r}")
        return [_convert(args[0], item, f"{key}[{index}]") for index, item in enumerate(value)]
    if tp is float:
        return _to_float(value, key)
    ok = type(value) is tp if tp in (bool, int) else isinstance(value, tp)
    require(ok, f"{key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _to_float(value: Any, key: str) -> float:
    if isinstance(value, str):
        # YAML 1.1 reads "1e-6" (no dot) as a string; accept it as the number it spells.
        try:
            parsed = float(value)
        except ValueError:
            parsed = math.nan
        if math.isfinite(parsed):
            return parsed
    require(
        type(value) in (int, float),
        f"{key} must be a float, got {value!r} ({type(value).__name__})",
    )
    # YAML spells infinity and NaN .inf / .nan; no field means either (an lr of .inf trains NaNs).
    require(math.isfinite(value), f"{key} must be a finite number, got {value!r}")
    return float(value)


def _type_name(tp: Any) -> str:
    if _is_optional(tp):
        return f"{_type_name(_strip_optional(tp))} or null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if typing.get_origin(tp) is list:
        item = _type_name(typing.get_args(tp)[0])
        return "a list of " + item.removeprefix("a ").removeprefix("an ")
    names = {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))
