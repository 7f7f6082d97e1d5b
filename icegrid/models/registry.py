"""The model registry: name -> builder, feature transform, sequence limit and truncation rule,
presets (``icegrid/config/models.yaml`` and the authors' published ones), checkpoint writing/loading
and the shipped small checkpoints.

Names: ``linefit``, ``dynedge``, ``edgeconv_transformer`` (alias ``1st``), ``icemix`` (``2nd``),
``gpt_boost`` (``3rd``); ``all`` expands to every one of them, line-fit included.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel

from icegrid.atomic import atomic_path
from icegrid.config import load_section
from icegrid.errors import first_line
from icegrid.kaggle import InputError
from icegrid.models import features as feature_module
from icegrid.models.base import DirectionModel

MODEL_NAMES = ("linefit", "dynedge", "edgeconv_transformer", "icemix", "gpt_boost")
ALIASES = {"1st": "edgeconv_transformer", "2nd": "icemix", "3rd": "gpt_boost", "baseline": "dynedge"}
CHECKPOINT_FORMAT = "icegrid-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
# The shipped small checkpoints are package data (icegrid/checkpoints/), found through importlib.resources
# wherever icegrid is installed; torch.load needs a real file, which every pip install (never zipped) has.
CHECKPOINT_DIR = Path(os.fspath(resources.files("icegrid") / "checkpoints"))
CHECKPOINT_ENV = "ICEGRID_CHECKPOINTS"

# icegrid's own transforms, by model; the published (authors') presets name theirs with "transform".
TRANSFORMS = {
    "dynedge": feature_module.DynEdgeFeatures,
    "edgeconv_transformer": feature_module.EdgeTransformerFeatures,
    "icemix": feature_module.IceMixFeatures,
    "gpt_boost": feature_module.GPTBoostFeatures,
}


def transform_class(name: str) -> type[feature_module.FeatureTransform]:
    """A feature transform by its ``name`` (icegrid's or a published family's)."""
    from icegrid.models import published

    known = {cls.name: cls for cls in TRANSFORMS.values()} | published.transforms()
    if name not in known:
        raise KeyError(name)
    return known[name]


class CheckpointError(InputError):
    """A checkpoint that cannot be used; the message is one line and names the file.

    An InputError, so the CLI reports it as one line without importing torch for every command."""


class ModelSettings(BaseModel):
    description: str = ""
    truncation: Literal["first_in_time", "hlc_first"] = "hlc_first"
    infer_limit: int | None = None
    train_limit: int | None = None
    features: dict[str, float | bool] = {}
    presets: dict[str, dict[str, Any]]
    training: dict[str, dict[str, Any]] = {}


class ModelsConfig(BaseModel):
    models: dict[str, ModelSettings]


def canonical(name: str) -> str:
    """The registry name for ``name`` or an alias; ValueError listing the choices otherwise."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in MODEL_NAMES:
        raise ValueError(f"unknown model '{name}' (have {', '.join(MODEL_NAMES)}, aliases "
                         f"{', '.join(ALIASES)}, or 'all')")
    return key


def expand(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """'all', one name, a comma-separated list or a list -> canonical names, order kept, no repeats."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        names = list(MODEL_NAMES) if item.strip().lower() == "all" else [canonical(item)]
        out.extend(n for n in names if n not in out)
    return out


# A tag names a variant's predictions (``icemix@retrained``): a store folder and an export column prefix.
TAG_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def split_tag(name: str) -> tuple[str, str]:
    """``'2nd@retrained'`` -> ``('icemix', 'retrained')``, ``'dynedge'`` -> ``('dynedge', '')``; ValueError
    for an unknown model or a tag that is not letters, digits, ``_ . -``."""
    base, at, tag = name.strip().partition("@")
    if at and not TAG_PATTERN.fullmatch(tag):
        raise ValueError(f"'{name}': a tag after '@' is 1-64 letters, digits, '_', '.' or '-' "
                         f"(starting with a letter or digit)")
    return canonical(base), tag


def tagged_name(name: str, tag: str | None = None) -> str:
    """The stored name of ``name`` (maybe already tagged) given ``tag``: a bare tag (``retrained``) or a
    full name (``2nd@retrained``, whose model must be ``name``'s). ValueError otherwise."""
    base, own = split_tag(name)
    if not tag:
        return f"{base}@{own}" if own else base
    other, new = split_tag(tag) if "@" in tag else (base, split_tag(f"{base}@{tag}")[1])
    if other != base:
        raise ValueError(f"--as {tag}: that names model '{other}', not '{base}'")
    return f"{base}@{new}"


def expand_names(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """:func:`expand` for names that may carry a tag (``all``, ``1st``, ``icemix@retrained``, ...): canonical
    names with their tags, order kept, no repeats; ValueError for an unknown model or a bad tag."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in (i.strip() for i in items if i.strip()):
        base, at, tag = item.partition("@")
        names = list(MODEL_NAMES) if base.lower() == "all" else [base]
        for name in names:
            model, checked = split_tag(name + at + tag)
            full = f"{model}@{checked}" if at else model
            if full not in out:
                out.append(full)
    return out


def expand_tagged(name: str) -> list[str]:
    """``name`` through :func:`expand`, keeping an ``@tag`` (``2nd@retrained`` -> ``icemix@retrained``);
    [] when it names no model. Predictions may be stored under tagged names like these."""
    base, at, tag = name.partition("@")
    try:
        return [canonical_name + at + tag for canonical_name in expand(base)]
    except ValueError:
        return []


def settings(name: str, overrides: dict | None = None) -> ModelSettings:
    config = load_section("models", ModelsConfig, overrides)
    name = canonical(name)
    if name not in config.models:
        raise ValueError(f"icegrid/config/models.yaml has no section for model '{name}'")
    return config.models[name]


def presets(name: str, overrides: dict | None = None) -> dict[str, dict]:
    """Every preset of a model: icegrid's (icegrid/config/models.yaml) and the authors' published ones."""
    from icegrid.models import published

    name = canonical(name)
    ours = dict(settings(name, overrides).presets)
    return ours | published.presets(name) if name != "linefit" else ours


def builder(name: str, preset_config: dict | None = None):
    """The model class for ``name``; a preset with ``arch: authors`` is the published family's."""
    name = canonical(name)
    if preset_config is not None and preset_config.get("arch") == "authors":
        from icegrid.models import published
        return published.family(name).build
    if name == "dynedge":
        from icegrid.models.dynedge import DynEdge
        return DynEdge
    if name == "edgeconv_transformer":
        from icegrid.models.edgeconv_transformer import EdgeConvTransformer
        return EdgeConvTransformer
    if name == "icemix":
        from icegrid.models.icemix import IceMix
        return IceMix
    if name == "gpt_boost":
        from icegrid.models.gpt_boost import GPTBoost
        return GPTBoost
    raise ValueError(f"model '{name}' has no neural network to build")


@dataclass
class LoadedModel:
    """Everything inference needs for one model."""

    name: str
    preset: str
    model: DirectionModel | None          # None for line-fit
    transform: feature_module.FeatureTransform | None
    truncation: str
    infer_limit: int | None
    train_limit: int | None = None
    checkpoint: Path | None = None
    checkpoint_sha256: str | None = None
    metrics: dict = field(default_factory=dict)
    preset_config: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    aux: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)


def build(name: str, preset: str = "small", overrides: dict | None = None,
          preset_config: dict | None = None) -> LoadedModel:
    """A freshly initialised model (no weights) with its transform and limits from the config.

    ``preset_config`` replaces the named preset's settings (an importer's, with the authors' kwargs)."""
    name = canonical(name)
    model_settings = settings(name, overrides)
    available = presets(name, overrides)
    if preset not in available and preset_config is None:
        raise ValueError(f"model '{name}' has no preset '{preset}' (have {', '.join(available)})")
    if name == "linefit":
        return LoadedModel(name=name, preset=preset, model=None, transform=None,
                           truncation=model_settings.truncation, infer_limit=None)
    preset_config = dict(available[preset] if preset_config is None else preset_config)
    model = builder(name, preset_config)(preset_config)
    # A preset may adjust feature constants (the small presets' time scale) or, for the authors'
    # presets, name its own transform ...
    if "transform" in preset_config:
        transform = transform_class(preset_config["transform"])(**preset_config.get("features", {}))
    else:
        transform = TRANSFORMS[name](**{**model_settings.features, **preset_config.get("features", {})})
    # ... and shorten the sequence limits (the CPU-sized small presets do) and, where the model's rule
    # is meaningless at the short limit, pick another truncation rule (1st place small preset).
    return LoadedModel(name=name, preset=preset, model=model, transform=transform,
                       truncation=preset_config.get("truncation", model_settings.truncation),
                       infer_limit=preset_config.get("infer_limit", model_settings.infer_limit),
                       train_limit=preset_config.get("train_limit", model_settings.train_limit),
                       preset_config=preset_config,
                       training=dict(model_settings.training.get(preset, {})))


def checkpoint_folder() -> Path:
    """Where default checkpoints are looked up: ``$ICEGRID_CHECKPOINTS`` (a folder of ``<model>-small.pt``),
    else the ones shipped inside the package."""
    return Path(os.environ.get(CHECKPOINT_ENV) or CHECKPOINT_DIR).expanduser()


def default_checkpoint(name: str) -> Path | None:
    """The default small checkpoint of a model, ``checkpoint_folder()/<model>-small.pt``, if it exists."""
    name = canonical(name)
    if name == "linefit":
        return None
    path = checkpoint_folder() / f"{name}-small.pt"
    return path if path.exists() else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_payload(loaded: LoadedModel, metrics: dict | None = None, train_state: dict | None = None,
                       aux: dict | None = None, provenance: dict | None = None) -> dict:
    """Everything a checkpoint holds. ``aux``: side-file data the authors' features need (QE, ice
    table, angle bins), so inference needs nothing else; ``provenance``: where imported weights came from."""
    return {
        "aux": aux if aux is not None else loaded.aux, "provenance": provenance or loaded.provenance,
        "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION,
        "model": loaded.name, "preset": loaded.preset, "preset_config": loaded.preset_config,
        "features": loaded.transform.describe(), "truncation": loaded.truncation,
        "infer_limit": loaded.infer_limit, "train_limit": loaded.train_limit, "training": loaded.training,
        "state_dict": loaded.model.state_dict(), "extra": loaded.model.extra_state_for_checkpoint(),
        "metrics": metrics or {}, "train_state": train_state,
    }


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically (temp file + rename) so a kill never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:     # truncated zip, foreign pickle, ...: all mean "not usable"
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(err, 160)})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an icegrid checkpoint")
    return payload


def load_checkpoint(path: Path, name: str | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Build the model a checkpoint describes and load its weights; CheckpointError names the file."""
    path = Path(path)
    payload = read_checkpoint(path)
    stored = payload.get("model")
    if name is not None and canonical(name) != stored:
        raise CheckpointError(f"{path}: checkpoint is for model '{stored}', not '{canonical(name)}'")
    if stored not in TRANSFORMS:
        raise CheckpointError(f"{path}: checkpoint names unknown model '{stored}'")
    stored_features = dict(payload.get("features", {}))
    try:
        transform_cls = transform_class(stored_features.get("name", stored))
    except KeyError:
        raise CheckpointError(f"{path}: checkpoint needs feature transform '{stored_features.get('name')}', "
                              f"unknown to this icegrid") from None
    if stored_features.get("version") != transform_cls.version:
        raise CheckpointError(f"{path}: feature transform version {stored_features.get('version')} "
                              f"!= {transform_cls.version} expected by this icegrid")
    constants = {k: v for k, v in stored_features.items() if k not in ("name", "version")}
    try:
        model = builder(stored, payload["preset_config"])(payload["preset_config"])
        model.load_state_dict(payload["state_dict"], strict=True)
        model.load_extra_state(payload.get("extra", {}))
        model.load_aux(payload.get("aux") or {})
    except Exception as err:
        first = first_line(err)
        raise CheckpointError(f"{path}: weights do not fit model '{stored}' preset "
                              f"'{payload.get('preset')}' ({first})") from None
    model.to(device).eval()
    transform = transform_cls(**constants)
    transform.load_aux(payload.get("aux") or {})
    return LoadedModel(name=stored, preset=payload.get("preset", "?"), model=model,
                       transform=transform, truncation=payload["truncation"],
                       infer_limit=payload.get("infer_limit"), train_limit=payload.get("train_limit"),
                       checkpoint=path, checkpoint_sha256=file_sha256(path),
                       metrics=payload.get("metrics", {}), preset_config=payload["preset_config"],
                       training=payload.get("training", {}), aux=payload.get("aux") or {},
                       provenance=payload.get("provenance") or {})
