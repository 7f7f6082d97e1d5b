"""Validated settings: the packaged YAML defaults (``icegrid/config/<section>.yaml``), a user's override files
(``$ICEGRID_CONFIG/<section>.yaml``, else ``~/.config/icegrid/<section>.yaml``), then a campaign file and flags.

Each subsystem declares its own pydantic model and loads its section with :func:`load_section`. The defaults
are read through :mod:`importlib.resources`, so a wheel install finds them as an editable one does.
"""

from __future__ import annotations

import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from icegrid.errors import first_line

CONFIG_DIR: Traversable = resources.files("icegrid") / "config"
USER_CONFIG_ENV = "ICEGRID_CONFIG"

Settings = TypeVar("Settings", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the file."""


def read_yaml(path: Path | Traversable) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read YAML ({first_line(err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        elif value is not None:
            out[key] = value
    return out


def user_config_dir() -> Path:
    """Where a user's override files live: ``$ICEGRID_CONFIG``, else ``$XDG_CONFIG_HOME/icegrid``
    (``~/.config/icegrid``). A folder named by ``$ICEGRID_CONFIG`` must exist; the default one need not."""
    named = os.environ.get(USER_CONFIG_ENV)
    if named:
        folder = Path(named).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"{folder}: {USER_CONFIG_ENV} names no directory")
        return folder
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "icegrid"


def _touches(data: Any, loc: tuple) -> bool:
    """Whether ``data`` sets the value at ``loc``, or a leaf where ``loc`` expects a mapping or list."""
    value = data
    for key in loc:
        if isinstance(value, dict):
            if key not in value:
                return False
            value = value[key]
        elif isinstance(value, list) and isinstance(key, int):
            if key >= len(value):
                return False
            value = value[key]
        else:
            break
    return bool(loc)


def load_section(name: str, model: type[Settings], overrides: dict[str, Any] | None = None,
                 config_dir: Path | Traversable | None = None) -> Settings:
    """The packaged ``<name>.yaml`` (or ``config_dir``'s), deep-merged with the user's ``<name>.yaml`` and then
    with ``overrides``, validated by ``model``. An error names the user's file when the bad key comes from it,
    the defaults file otherwise (a caller with overrides from a campaign file names that file first)."""
    defaults = (CONFIG_DIR if config_dir is None else config_dir) / f"{name}.yaml"
    if not defaults.is_file():
        raise ConfigError(f"{defaults}: missing packaged defaults for config section '{name}' "
                          f"(a broken icegrid install?)")
    data = read_yaml(defaults)
    user_file = user_config_dir() / f"{name}.yaml"
    try:
        user = read_yaml(user_file) if user_file.is_file() else {}
    except PermissionError:
        raise ConfigError(f"{user_file}: user config not readable (check ICEGRID_CONFIG)") from None
    data = deep_merge(deep_merge(data, user), overrides or {})
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = tuple(first["loc"])
        where = ".".join(str(p) for p in loc)
        blamed = user_file if _touches(user, loc) and not _touches(overrides or {}, loc) else defaults
        raise ConfigError(f"{blamed}: {name}.{where}: {first['msg']}") from None
