"""The cluster profiles, one module each: ``local``, ``condor``, ``slurm``, ``glidein``.

A profile module defines a :class:`~icegrid.grid.profiles.base.Profile` subclass and names it
``PROFILE``; its defaults are the section of the same name in ``icegrid/config/clusters.yaml``. Adding a batch
system (PBS, LSF, Kubernetes through dask-kubernetes) is one module here plus its defaults section:
the CLI's ``--cluster`` choices, the campaign schema and the manager find it by its module name.
``base`` and ``batch`` are the shared core, not profiles.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

_SHARED = {"base", "batch"}
PROFILE_NAMES: tuple[str, ...] = tuple(sorted(
    (m.name for m in pkgutil.iter_modules(__path__) if m.name not in _SHARED and not m.name.startswith("_")),
    key=lambda n: (n != "local", n)))


def profile_class(name: str):
    """The Profile subclass of the profile called ``name``; ConfigError naming the choices otherwise."""
    from icegrid.config import ConfigError

    if name not in PROFILE_NAMES:
        raise ConfigError(f"unknown cluster profile '{name}' (have {', '.join(PROFILE_NAMES)})")
    return importlib.import_module(f"{__name__}.{name}").PROFILE


def _defaults() -> dict[str, dict[str, Any]]:
    """icegrid's profile defaults (icegrid/config/clusters.yaml), each section validated on its own, so a
    mistake there is blamed on that file and a campaign's mistake on the campaign."""
    from pydantic import ConfigDict, create_model

    from icegrid.config import load_section

    fields = {name: (profile_class(name).Settings | None, None) for name in PROFILE_NAMES}
    model = create_model("ClustersConfig", __config__=ConfigDict(extra="forbid"), **fields)
    config = load_section("clusters", model)
    return {name: (getattr(config, name).model_dump(exclude_unset=True) if getattr(config, name) else {})
            for name in PROFILE_NAMES}


def load_profile(name: str, overrides: dict[str, Any] | None = None):
    """Settings of one profile: icegrid's defaults with ``overrides`` (a spec's cluster section) on top.

    A wrong override raises :class:`~icegrid.grid.profiles.base.SettingError` naming the key; a wrong
    default, ConfigError naming icegrid/config/clusters.yaml."""
    from pydantic import ValidationError

    from icegrid.grid.profiles.base import SettingError

    cls = profile_class(name)
    defaults = _defaults()[name]
    try:
        return cls.load(defaults, overrides)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or name
        raise SettingError(f"{where}: {first['msg']}") from None
