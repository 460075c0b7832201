"""One check for a setting that must be one of a fixed set of names, so that every such error
reads the same way: the setting, the value given and what it may be."""

from __future__ import annotations

from collections.abc import Collection


def check_choice(setting: str, value, choices: Collection) -> None:
    """Raises ValueError unless `value` is one of `choices` (a tuple keeps its order; the keys of
    a dict or a set are listed sorted)."""
    if value not in choices:
        listed = tuple(choices) if isinstance(choices, (tuple, list)) else tuple(sorted(choices))
        raise ValueError(f"{setting} must be one of {listed}, got {value!r}")
