"""Paths a user gives, made absolute once, where a command starts.

orbax refuses relative checkpoint paths, and a relative path means something else to a process
started in another directory (a pretraining stage, a second host). So every entry point (`main`,
`predict`, `prepare`, `import_weights`) passes the paths it reads, flags and config fields alike,
through `absolute` before anything else sees them. URLs (``gs://bucket/...``) are left as they are:
tf.io.gfile and orbax read them directly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

# Config fields that hold a file or folder, besides every role's `init.<role>.path`.
CONFIG_PATH_FIELDS = ("data.data_dir", "pretrain.config", "pretrain.workdir")
# "demo" in init.<role>.path is a keyword (the demo's pretraining), not a path.
INIT_PATH_KEYWORDS = ("demo",)


def is_url(path: str) -> bool:
    return "://" in path


def absolute(path: str | None) -> str | None:
    """``~`` expanded and made absolute against the current directory; "" and None unchanged."""
    if not path or is_url(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def resolve_config_paths(config) -> None:
    """Makes every path field of ``config`` (an ml_collections.ConfigDict) absolute, in place."""
    init = config.get("init")
    roles = list(init.keys()) if init is not None else []
    for dotted in (*CONFIG_PATH_FIELDS, *(f"init.{role}.path" for role in roles)):
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.get(key) if node is not None else None
        if node is None or leaf not in node:
            continue
        value = node[leaf]
        keywords = INIT_PATH_KEYWORDS if dotted.startswith("init.") else ()
        if isinstance(value, str) and value not in keywords:
            node[leaf] = absolute(value)  # a locked ConfigDict still takes existing keys


def make_config_package_importable(config_file: str) -> None:
    """Config files import their siblings as `configs.common`: put the folder that holds the
    `configs` package on sys.path, so a config loads from any working directory."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(config_file)))
    if root not in sys.path:
        sys.path.insert(0, root)


def config_flag_from_argv(argv: Sequence[str]) -> str | None:
    """The value of ``--config=FILE[:arg]`` (or ``--config FILE[:arg]``) in a command line."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def config_file_from_argv(argv: Sequence[str]) -> str | None:
    """The file of ``--config=FILE[:arg]`` (or ``--config FILE``) in a command line."""
    value = config_flag_from_argv(argv)
    return None if value is None else value.split(":", 1)[0]


def prepare_config_flag(argv: Sequence[str]) -> None:
    """Before absl parses ``--config``: lets the config file import `configs.*` from anywhere."""
    if (path := config_file_from_argv(argv)) is not None:
        make_config_package_importable(path)
