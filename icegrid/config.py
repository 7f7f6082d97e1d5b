"""Validated settings: YAML defaults in the repository's config/ folder, overridden by a campaign file and flags.

Each subsystem declares its own pydantic model and loads its section with :func:`load_section`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from icegrid.errors import first_line

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"

Settings = TypeVar("Settings", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the file."""


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
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


def load_section(name: str, model: type[Settings], overrides: dict[str, Any] | None = None,
                 config_dir: Path = CONFIG_DIR) -> Settings:
    """Defaults from ``config/<name>.yaml`` merged with ``overrides``, validated by ``model``."""
    path = Path(config_dir) / f"{name}.yaml"
    data = read_yaml(path) if path.exists() else {}
    data = deep_merge(data, overrides or {})
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: {name}.{where}: {first['msg']}") from None
