"""`icegrid models`: every model and preset with its exact parameter count, sequence limit and
truncation rule, and the checkpoints on disk for it (shipped, imported from the authors, trained).

Parameter counts come from building each preset on torch's meta device, so listing the 100 M-parameter
presets allocates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from icegrid.models import registry


@dataclass
class PresetRow:
    model: str
    preset: str
    origin: str                 # "authors" (a published configuration) or "icegrid"
    n_parameters: int | None
    infer_limit: int | None
    truncation: str


@dataclass
class CheckpointRow:
    path: Path
    model: str
    preset: str
    kind: str                   # shipped | imported | trained
    detail: str


def preset_rows(models: list[str] | None = None) -> list[PresetRow]:
    rows = []
    for name in models or list(registry.MODEL_NAMES):
        for preset, config in registry.presets(name).items():
            if name == "linefit":          # no network: nothing to count, every pulse used
                rows.append(PresetRow(name, preset, "icegrid", 0, None, registry.settings(name).truncation))
                continue
            with torch.device("meta"):
                loaded = registry.build(name, preset)
            rows.append(PresetRow(name, preset, "authors" if config.get("arch") == "authors" else "icegrid",
                                  sum(p.numel() for p in loaded.model.parameters()),
                                  loaded.infer_limit, loaded.truncation))
    return rows


def checkpoint_rows(folders: list[Path]) -> list[CheckpointRow]:
    """Every icegrid checkpoint (``*.pt``) in ``folders``; unreadable files are listed as such."""
    shipped = {registry.default_checkpoint(n) for n in registry.MODEL_NAMES if n != "linefit"}
    rows = []
    for folder in folders:
        for path in sorted(Path(folder).glob("*.pt")) if Path(folder).is_dir() else []:
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:        # not ours, or truncated: say so instead of failing the listing
                rows.append(CheckpointRow(path, "?", "?", "unreadable", ""))
                continue
            if not isinstance(payload, dict) or payload.get("format") != registry.CHECKPOINT_FORMAT:
                continue
            provenance = payload.get("provenance") or {}
            if provenance:
                kind = "imported"
                detail = "from " + ", ".join(s["file"] for s in provenance.get("sources", []))
            else:
                kind = "shipped" if path in shipped else "trained"
                score = (payload.get("metrics") or {}).get("val_mean_angle")
                detail = f"validation {score:.3f} rad" if isinstance(score, float) else ""
            rows.append(CheckpointRow(path, payload.get("model", "?"), payload.get("preset", "?"), kind, detail))
    return rows
