"""`icegrid import-weights`: the authors' published weight files -> one icegrid checkpoint.

The shared half of every importer: reading the authors' torch files with one-line errors, checking a
state dict against the keys and shapes a preset expects (naming the first offending key), hashing the
sources for provenance, and writing the checkpoint atomically only once everything loaded. The
family half (which preset the shapes identify, how the authors' keys map onto icegrid's, which side
files the features need) lives in ``icegrid.models.published.<family>.convert``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from icegrid.errors import first_line
from icegrid.kaggle import InputError
from icegrid.models import registry
from icegrid.models.registry import CheckpointError


@dataclass
class Converted:
    """What a family's ``convert`` returns: a published preset and the weights in icegrid's keys."""

    preset: str                               # a name in the family's PRESETS
    preset_config: dict                       # that preset, with the --kwargs applied
    state_dict: dict[str, torch.Tensor]       # keys exactly as the preset's model names them
    aux: dict[str, Any] = field(default_factory=dict)   # side-file data (QE, ice table, bins): tensors/lists
    kwargs: dict = field(default_factory=dict)          # the authors' hyper-parameters that were used


def read_torch_file(path: Path) -> Any:
    """``torch.load`` of an authors' file on CPU, weights only; CheckpointError names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:      # truncated zip, text file, foreign pickle: all mean "not usable"
        raise CheckpointError(f"{path}: not a readable torch file ({first_line(err)})") from None


def plain_state_dict(payload: Any, path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a plain state dict, a ``{'state_dict': ...}`` wrapper or a Lightning ``.ckpt``,
    with ``prefix`` (Lightning's ``model.``) stripped where present."""
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not payload or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    if prefix and all(k.startswith(prefix) for k in payload):
        payload = {k[len(prefix):]: v for k, v in payload.items()}
    return dict(payload)


def check_state_dict(got: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], path: Path | str,
                     what: str) -> None:
    """One-line CheckpointError on the first missing key, unexpected key or shape mismatch.

    ``expected`` maps every key the preset's model has to its shape; ``what`` names the preset."""
    for key, shape in expected.items():
        if key not in got:
            raise CheckpointError(f"{path}: missing key '{key}' for {what}")
        if tuple(got[key].shape) != tuple(shape):
            raise CheckpointError(f"{path}: key '{key}' has shape {tuple(got[key].shape)}, "
                                  f"{what} needs {tuple(shape)}")
    for key in got:
        if key not in expected:
            raise CheckpointError(f"{path}: unexpected key '{key}' for {what}")


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def aux_file(aux: dict[str, Path], name: str, model: str) -> Path:
    """The side file ``name`` given with ``--aux``; one-line error naming what to pass when absent."""
    path = aux.get(name)
    if path is None:
        raise InputError(f"--aux {name}: missing; model '{model}' needs the authors' {name} "
                         f"(it ships with their weights)")
    if not Path(path).is_file():
        raise InputError(f"{path}: aux file not found")
    return Path(path)


def aux_by_name(paths: list[Path]) -> dict[str, Path]:
    """``--aux`` files keyed by file name (``angle_bins_128.json``, ``ice_transparency.txt``, ...)."""
    return {Path(p).name: Path(p) for p in paths}


def parse_kwargs(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"--kwargs: not JSON ({err.msg} at character {err.pos})") from None
    if not isinstance(value, dict):
        raise InputError("--kwargs: must be a JSON object of the authors' argument names")
    return value


def import_weights(model: str, sources: list[Path], out: Path, kwargs: dict | None = None,
                   aux: list[Path] | None = None) -> dict:
    """Convert the authors' files for ``model`` into the icegrid checkpoint ``out``; return its summary.

    Nothing is written unless the converted weights load strictly into the preset's model."""
    from icegrid.models import published

    name = registry.canonical(model)
    family = published.family(name)
    sources = [Path(p) for p in sources]
    if not sources:
        raise InputError("--from: give at least one of the authors' weight files")
    aux_paths = aux_by_name(aux or [])
    converted = family.convert(sources, kwargs, aux_paths)
    loaded = registry.build(name, converted.preset, preset_config=converted.preset_config)
    try:
        loaded.model.load_state_dict(converted.state_dict, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{sources[0]}: weights do not fit preset '{converted.preset}' "
                              f"({first_line(err)})") from None
    loaded.model.load_aux(converted.aux)
    loaded.transform.load_aux(converted.aux)
    provenance = {
        "sources": [{"file": p.name, "sha256": registry.file_sha256(p)} for p in sources],
        "aux": [{"file": p.name, "sha256": registry.file_sha256(p)} for p in aux_paths.values()],
        "kwargs": converted.kwargs, "preset": converted.preset, "family": name,
    }
    payload = registry.checkpoint_payload(loaded, aux=converted.aux, provenance=provenance)
    registry.save_checkpoint(Path(out), payload)
    return {"model": name, "preset": converted.preset, "out": str(out),
            "n_parameters": sum(p.numel() for p in loaded.model.parameters()), "provenance": provenance}
