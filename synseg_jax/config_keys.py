"""Dotted config keys set from strings: the `key=value,...` overrides of `--config=FILE:arg`
and of recipe stages. A mistyped key is an error naming it and its nearest matches; a key without
dots names the one field it ends."""

from __future__ import annotations

import ast
import copy
import difflib
from typing import Any

import ml_collections


def split_top_level(text: str) -> list[str]:
    """Splits on commas outside brackets, so `crop=(64,128)` stays one override."""
    parts, depth, current = [], 0, []
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    parts.append("".join(current).strip())
    return parts


def all_items(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every field and sub-config, depth first."""
    items = []
    for key, value in config.items():
        full = f"{prefix}{key}"
        items.append((full, value))
        if isinstance(value, ml_collections.ConfigDict):
            items.extend(all_items(value, full + "."))
    return items


def all_keys(config: ml_collections.ConfigDict) -> list[str]:
    return [key for key, _ in all_items(config)]


def _parse_value(raw: str, current):
    """Parses `raw` to the type of the field's current value."""
    if isinstance(current, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ValueError(f"cannot parse {raw!r} as a {type(current).__name__}") from None
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"expected True or False, got {raw!r}")
    elif isinstance(current, float) and isinstance(value, int):
        value = float(value)
    elif isinstance(current, tuple):
        value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    elif not isinstance(value, type(current)):
        raise ValueError(f"expected a {type(current).__name__}, got {raw!r}")
    return value


def _resolve_short_key(config: ml_collections.ConfigDict, key: str) -> str:
    """`dist` -> `method.dist` when exactly one field of the config is named so (as in
    `road.py:gta5,dist=False`); a full dotted key, or a top-level one, is returned unchanged."""
    if "." in key or key in config:
        return key
    matches = [k for k, value in all_items(config) if k.rsplit(".", 1)[-1] == key
               and not isinstance(value, ml_collections.ConfigDict)]
    if len(matches) > 1:
        raise KeyError(f"Config key {key!r} is ambiguous; use one of {matches}")
    return matches[0] if matches else key


def set_key(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
    """Sets dotted `key` from the string `raw`; an unknown key names itself and close matches.

    A key without dots may name a nested field by its last component alone when that is unique.
    """
    key = _resolve_short_key(config, key)
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        close = difflib.get_close_matches(key, all_keys(config), n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise KeyError(f"Unknown config key {key!r}{hint}")
    try:
        value = _parse_value(raw, node[leaf])
    except ValueError as err:
        raise ValueError(f"Config key {key!r}: {err}") from None
    with node.unlocked():
        node[leaf] = value


def apply_overrides(config: ml_collections.ConfigDict, text: str) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``"key=value,..."`` applied (``config`` itself is unchanged)."""
    out = copy.deepcopy(config)  # keeps the references between fields
    for part in (p for p in split_top_level(text or "") if p):
        if "=" not in part:
            raise ValueError(f"Config override {part!r} is not of the form key=value")
        key, raw = part.split("=", 1)
        set_key(out, key.strip(), raw.strip())
    out.lock()
    return out
