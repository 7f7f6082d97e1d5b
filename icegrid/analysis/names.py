"""Which models an analysis compares: the names a user gives (registry names, the aliases every command
accepts such as ``2nd`` or ``baseline``, tagged names ``icemix@retrained``, or any name a predictions file
uses) resolved against the names that actually have predictions."""

from __future__ import annotations

from collections.abc import Sequence


def _registry_names(name: str) -> list[str]:
    # Imported only here: the registry pulls in torch, which a plain analysis never needs.
    from icegrid.models.registry import expand_tagged

    return expand_tagged(name)


def select_models(requested: Sequence[str] | None, available: Sequence[str]) -> tuple[list[str], list[str]]:
    """(models to analyse, requested names matching none). ``None`` or ``all`` takes every available one;
    a name present as it is wins over its alias meaning, so a file's own model names always work."""
    available = list(available)
    if requested is None:
        return available, []
    picked: list[str] = []
    unknown: list[str] = []
    for item in requested:
        name = item.strip()
        if not name:
            continue
        if name.lower() == "all":
            matches = available
        elif name in available:
            matches = [name]
        else:
            matches = [n for n in _registry_names(name) if n in available]
        if not matches:
            unknown.append(name)
        picked.extend(m for m in matches if m not in picked)
    return picked, unknown
