"""Describing pytrees of arrays to a user: their leaves by path, and how two of them differ."""

from __future__ import annotations

from typing import Any

import jax


def path_str(path) -> str:
    """A tree path as "backbone/layer1_0/conv1/kernel"."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def shapes(tree: Any) -> dict[str, tuple]:
    """{path: shape} of every leaf."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): tuple(getattr(v, "shape", ())) for p, v in leaves}


def describe_mismatch(given: dict[str, tuple], wanted: dict[str, tuple], given_name: str,
                      wanted_name: str, limit: int = 8) -> str:
    """Lines naming the leaves `wanted` lacks in `given`, the extra ones, and the shapes that
    differ (each with both shapes); "" when the two agree."""
    missing = [k for k in wanted if k not in given]
    unexpected = [k for k in given if k not in wanted]
    differing = [f"{k}: {given_name} {given[k]} vs {wanted_name} {wanted[k]}"
                 for k in wanted if k in given and given[k] != wanted[k]]
    lines = []
    for title, items in ((f"missing from the {given_name}", missing),
                         (f"in the {given_name} but not in the {wanted_name}", unexpected),
                         ("shape mismatches", differing)):
        if items:
            lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:limit])
                         + (" ..." if len(items) > limit else ""))
    return "\n".join(lines)
