"""The authors' own models: one module per winning solution (and the DynEdge baseline) that computes
exactly what the authors' code computes, so their published weights import and give their outputs.

Each family module (named like the registry's model) exports:

- ``PRESETS``: the published configurations, preset name -> preset config (``arch: authors``, the
  authors' hyper-parameters, ``transform``, ``truncation``, ``infer_limit``);
- ``TRANSFORMS``: its feature transforms, transform name -> class (names unique across families);
- ``build(preset_config)``: the model (a ``DirectionModel``) for one preset config;
- ``convert(sources, kwargs, aux)``: the authors' files -> ``icegrid.models.importer.Converted``.

icegrid's own variants (the paper's readings, icegrid-trained small models) stay in ``icegrid.models.*``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES = ("dynedge", "edgeconv_transformer", "icemix", "gpt_boost")


def family(name: str) -> ModuleType:
    """The published-family module of registry model ``name``."""
    if name not in FAMILIES:
        raise ValueError(f"model '{name}' has no published (authors') weights to import "
                         f"(have {', '.join(FAMILIES)})")
    return importlib.import_module(f"icegrid.models.published.{name}")


def _available() -> list[ModuleType]:
    modules = []
    for name in FAMILIES:
        try:
            modules.append(family(name))
        except ModuleNotFoundError as err:      # a family not written yet: only its own module may be missing
            if err.name != f"icegrid.models.published.{name}":
                raise
    return modules


def presets(name: str) -> dict[str, dict]:
    """The published presets of model ``name`` ({} when the family has none)."""
    return next((dict(m.PRESETS) for m in _available() if m.__name__.endswith(f".{name}")), {})


def transforms() -> dict[str, type]:
    """Every published family's feature transforms, by transform name."""
    out: dict[str, type] = {}
    for module in _available():
        out.update(module.TRANSFORMS)
    return out
