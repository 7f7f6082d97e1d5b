"""2nd place (DrHB's IceMix), exactly as the authors' code computes it (DrHB/icecube-2nd-place@484cdcf):
one preset per ``predict.py`` member, the paper's T and S, and ``predict_ensemble`` (the five members
with predict.py's weights, ``nan_to_num``, ``clip(+-1000)`` and normalised weighted sum), plus the
importer of the authors' plain state dicts (Kaggle dataset ``drhabib/ice-cube-final-models``).

Sequence limit 192 (``config.json`` "L", what predict.py uses); above it the authors keep a uniform
random subset (their ``torch.randperm`` code is commented "HLC first" but is not), icegrid's rule
``random``. ``predict`` returns the Kaggle convention; ``raw_outputs`` the authors' axes.

``--kwargs`` takes the authors' constructor arguments (``dim``, ``dim_base``, ``depth``, ``head_size``,
``depth_rel``, ``n_rel``; missing ones take the authors' defaults) and ``class`` (DeepIceModel,
EncoderWithDirectionReconstructionV22 or ...V23, needed only when the shapes cannot tell), or
``{"members": [{...kwargs, "weight": w}, ...]}`` for an ensemble of the ``--from`` files in order;
top-level ``L`` (config.json's name) and ``truncation`` are icegrid settings.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from icegrid.kaggle import InputError
from icegrid.models.base import Batch, DirectionModel
from icegrid.models.features import TRUNCATION_RULES
from icegrid.models.importer import Converted, aux_file, check_state_dict, plain_state_dict, read_torch_file
from icegrid.models.published.icemix_features import (ICE_AUX_KEY, ICE_TABLE_FILE, IceMixAuthorsFeatures,
                                                      read_ice_table)
from icegrid.models.published.icemix_layers import DeepIceNet, DynEdgeIceNet
from icegrid.models.registry import CheckpointError

DEEPICE = "DeepIceModel"
V22, V23 = "EncoderWithDirectionReconstructionV22", "EncoderWithDirectionReconstructionV23"
DEFAULTS = {     # the authors' constructor defaults (src/models.py)
    DEEPICE: {"dim": 384, "dim_base": 128, "depth": 12, "head_size": 32, "depth_rel": 4, "n_rel": 1},
    V22: {"dim": 384, "dim_base": 128, "depth": 8, "head_size": 64},
    V23: {"dim": 384, "dim_base": 128, "depth": 8, "head_size": 64},
}
TRAINING_ONLY = {"use_checkpoint"}      # an authors' argument with no effect on the eval forward
SEQUENCE_LIMIT = 192
TRUNCATION = "random"


def member(cls: str, **kwargs) -> dict:
    """A normalised member config: the class and every constructor argument."""
    return {"class": cls, **DEFAULTS[cls], **kwargs}


# predict.py's MODELS, in its order: preset -> (file name, member, ensemble weight).
PREDICT_MEMBERS = {
    "b_d32": ("baselineV3_BE_globalrel_d32_0_6ema.pth",
              member(DEEPICE, dim=768, dim_base=192, depth=12, head_size=32), 0.08254897),
    "b_d64": ("baselineV3_BE_globalrel_d64_0_3emaFT_2.pth",
              member(DEEPICE, dim=768, dim_base=192, depth=12, head_size=64), 0.15350807),
    "b_d32_4rel": ("VFTV3_4RELFT_7.pth",
                   member(DEEPICE, dim=768, dim_base=192, depth=12, head_size=32, n_rel=4), 0.19367443),
    "s_dynedge_v22": ("V22FT6_1.pth", member(V22, dim=384, dim_base=128, depth=8, head_size=32), 0.23597202),
    "b_dynedge_v23": ("V23FT5_6.pth", member(V23, dim=768, dim_base=192, depth=12, head_size=64), 0.3342965),
}
PAPER_MEMBERS = {"paper_t": member(DEEPICE, dim=192, dim_base=128, depth=12, head_size=32),
                 "paper_s": member(DEEPICE, dim=384, dim_base=128, depth=12, head_size=32)}
SINGLE_MEMBERS = {**{n: c for n, (_, c, _) in PREDICT_MEMBERS.items()}, **PAPER_MEMBERS}
# Not "ensemble": icegrid/config/models.yaml's icemix "ensemble" is icegrid's own (paper) ensemble and stays so.
ENSEMBLE = "predict_ensemble"


def preset_config(members: list[dict], weights: list[float] | None, description: str,
                  limit: int = SEQUENCE_LIMIT, truncation: str = TRUNCATION) -> dict:
    """An authors' preset: ``weights`` None = one member's raw output, else predict.py's combination."""
    return {"arch": "authors", "description": description, "transform": IceMixAuthorsFeatures.name,
            "features": {"with_ice": any(m["class"] != DEEPICE for m in members)},
            "truncation": truncation, "infer_limit": limit, "train_limit": limit,
            "members": [dict(m) for m in members], "weights": None if weights is None else list(weights)}


PRESETS = {
    **{name: preset_config([cfg], None, f"2nd place predict.py member {file}")
       for name, (file, cfg, _) in PREDICT_MEMBERS.items()},
    **{name: preset_config([cfg], None, f"2nd place paper {name[-1].upper()} d32 (authors' DeepIceModel)")
       for name, cfg in PAPER_MEMBERS.items()},
    ENSEMBLE: preset_config([cfg for _, cfg, _ in PREDICT_MEMBERS.values()],
                            [w for _, _, w in PREDICT_MEMBERS.values()],
                            "2nd place predict.py ensemble of the five members"),
}
TRANSFORMS = {IceMixAuthorsFeatures.name: IceMixAuthorsFeatures}


def _member_net(cfg: dict) -> nn.Module:
    args = {k: v for k, v in cfg.items() if k not in ("class", *TRAINING_ONLY)}
    if cfg["class"] == DEEPICE:
        return DeepIceNet(**args)
    return DynEdgeIceNet("V22" if cfg["class"] == V22 else "V23", **args)


class IceMixAuthors(DirectionModel):
    """One member, or predict.py's ensemble of members; keys ``members.<i>.<authors' key>``."""

    name = "icemix"

    def __init__(self, preset: dict):
        super().__init__(preset)
        self.members = nn.ModuleList([_member_net(cfg) for cfg in preset["members"]])
        weights = preset.get("weights")
        if weights is not None:     # predict.py: torch.FloatTensor(weights); weights /= weights.sum()
            w = torch.tensor(weights, dtype=torch.float32)
            self.register_buffer("ensemble_weights", w / w.sum(), persistent=False)
        else:
            self.ensemble_weights = None

    def authors_output(self, batch: Batch) -> Tensor:
        """(B, 3) in the authors' axes: (sin az sin zen, cos az sin zen, cos zen) * kappa."""
        if self.ensemble_weights is None:
            return self.members[0](batch)
        outs = [torch.nan_to_num(m(batch)).clip(-1000, 1000) for m in self.members]
        # float32 weights promote fp16 (autocast) outputs to float32, as predict.py's product does
        return (torch.stack(outs, -1) * self.ensemble_weights).sum(-1)

    def raw_outputs(self, batch: Batch) -> dict[str, Tensor]:
        out = self.authors_output(batch)
        return {"out_0": out[:, 0], "out_1": out[:, 1], "out_2": out[:, 2], "kappa": out.norm(dim=-1)}

    def predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        out = self.authors_output(batch)
        return out[:, [1, 0, 2]], out.norm(dim=-1)       # Kaggle: x = cos az sin zen, y = sin az sin zen

    def stages(self, training: dict):
        raise NotImplementedError("icemix authors' presets are imported with `icegrid import-weights`, "
                                  "not trained (train the 'small'/'full' presets instead)")


def build(preset_config: dict) -> IceMixAuthors:
    return IceMixAuthors(preset_config)


# ---- import of the authors' files ----------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _expected(cfg_json: str) -> dict[str, tuple[int, ...]]:
    """The authors' key -> shape of one member config (built on the meta device: no memory)."""
    with torch.device("meta"):
        net = _member_net(json.loads(cfg_json))
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    return _expected(json.dumps(cfg, sort_keys=True))


def _shapes(state: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _fail(path, message: str):
    raise CheckpointError(f"{path}: {message}")


def _check_family(path, state: dict[str, Tensor]) -> None:
    """Another model's file (DynEdge, 1st or 3rd place) shares no key with the authors' classes."""
    known = set().union(*(expected_shapes(c) for c in SINGLE_MEMBERS.values()))
    if not any(key in known for key in state):
        _fail(path, f"unexpected key '{next(iter(state))}': not a 2nd-place (DeepIceModel / "
                    f"EncoderWithDirectionReconstructionV22/V23) state dict")


def _identify(path, state: dict[str, Tensor]) -> str:
    """The published single-member preset whose keys and shapes ``state`` has exactly."""
    configs, shapes = SINGLE_MEMBERS, _shapes(state)
    matches = [n for n, c in configs.items() if expected_shapes(c) == shapes]
    if len(matches) > 1:
        hint = json.dumps({k: v for k, v in configs[matches[0]].items() if k not in ("class", "depth_rel")})
        _fail(path, f"the shapes fit presets {' and '.join(matches)} (n_rel is not stored in the weights); "
                    f"pass --kwargs with n_rel, e.g. '{hint}'")
    if not matches:      # the closest preset names the first offending key
        def score(name: str) -> int:
            return sum(shapes.get(k) == s for k, s in expected_shapes(configs[name]).items())
        best = max(configs, key=score)
        check_state_dict(state, expected_shapes(configs[best]), path, f"preset '{best}'")
    return matches[0]


def _member_from_kwargs(path, state: dict[str, Tensor], kwargs: dict) -> dict:
    """A member config from the authors' arguments; the class from ``class`` or the weights."""
    kwargs = {k: v for k, v in kwargs.items() if k not in TRAINING_ONLY}
    cls = kwargs.pop("class", None)
    has_graph = any(k.startswith("local_root.") for k in state)
    if cls is None and not has_graph:
        cls = DEEPICE
    if cls is None:      # V22 and V23 have identical state dicts: only a published config tells them apart
        candidates = [c["class"] for _, c, _ in PREDICT_MEMBERS.values()
                      if c["class"] != DEEPICE and c == member(c["class"], **kwargs)]
        if len(candidates) != 1:
            raise InputError(f"--kwargs: {path} is a V22/V23 member (same keys, different forward); add "
                             f"\"class\": \"{V22}\" or \"{V23}\"")
        cls = candidates[0]
    if cls not in DEFAULTS:
        raise InputError(f"--kwargs: class '{cls}' is not one of {', '.join(DEFAULTS)}")
    for key, value in kwargs.items():
        if key not in DEFAULTS[cls]:
            raise InputError(f"--kwargs: unknown argument '{key}' for {cls} (have {', '.join(DEFAULTS[cls])})")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InputError(f"--kwargs: {key} must be a non-negative integer, not {value!r}")
    cfg = member(cls, **kwargs)
    _validate(cfg)
    return cfg


def _validate(cfg: dict) -> None:
    heads_ok = cfg["head_size"] > 0 and cfg["dim"] % cfg["head_size"] == 0
    if not heads_ok or cfg["dim_base"] % 2 or cfg["dim"] % 2 or min(cfg["dim"], cfg["dim_base"], cfg["depth"]) < 1:
        raise InputError(f"--kwargs: dim {cfg['dim']} must be even and a multiple of head_size "
                         f"{cfg['head_size']}, dim_base {cfg['dim_base']} even, depth >= 1")
    if cfg["class"] == DEEPICE and not 1 <= cfg["n_rel"] <= cfg["depth_rel"]:
        raise InputError(f"--kwargs: n_rel {cfg['n_rel']} must be in 1..depth_rel ({cfg['depth_rel']})")


def _describe(cfg: dict) -> str:
    return f"{cfg['class']}({', '.join(f'{k}={v}' for k, v in cfg.items() if k != 'class')})"


def _settings(kwargs: dict) -> tuple[int, str]:
    """icegrid's settings among the kwargs: ``L`` (config.json's sequence limit) and ``truncation``."""
    limit, truncation = kwargs.pop("L", SEQUENCE_LIMIT), kwargs.pop("truncation", TRUNCATION)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise InputError(f"--kwargs: L must be a positive integer, not {limit!r}")
    if truncation not in TRUNCATION_RULES:
        raise InputError(f"--kwargs: truncation '{truncation}' is not one of {', '.join(TRUNCATION_RULES)}")
    return limit, truncation


def _weight(entry: dict) -> float:
    value = entry.pop("weight", 1.0)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
        raise InputError(f"--kwargs: member weight must be a non-negative number, not {value!r}")
    return float(value)


def _members(states: list[tuple[Path, dict]], kwargs: dict) -> tuple[list[dict], list[float] | None]:
    """The member configs (and ensemble weights) for the ``--from`` files."""
    if "members" in kwargs:
        entries = kwargs.pop("members")
        if kwargs:
            raise InputError(f"--kwargs: with \"members\" the authors' arguments go inside each entry "
                             f"(found '{next(iter(kwargs))}' outside)")
        if not isinstance(entries, list) or len(entries) != len(states) or \
                not all(isinstance(e, dict) for e in entries):
            raise InputError(f"--kwargs: \"members\" must be a list of {len(states)} objects, one per --from file")
        entries = [dict(e) for e in entries]
        weights = [_weight(e) for e in entries]
        if sum(weights) <= 0:
            raise InputError("--kwargs: the member weights sum to 0")
        return [_member_from_kwargs(p, s, e) for (p, s), e in zip(states, entries)], weights
    if kwargs:
        if len(states) != 1:
            raise InputError("--kwargs: for several --from files give {\"members\": [{...}, ...]}, one entry "
                             "per file in order")
        return [_member_from_kwargs(*states[0], kwargs)], None
    if len(states) == 1:
        return [SINGLE_MEMBERS[_identify(*states[0])]], None
    if len(states) == len(PREDICT_MEMBERS):
        return [c for _, c, _ in PREDICT_MEMBERS.values()], [w for _, _, w in PREDICT_MEMBERS.values()]
    raise InputError(f"--from: give one member file, the five predict.py members in its order "
                     f"({', '.join(f for f, _, _ in PREDICT_MEMBERS.values())}), or --kwargs "
                     f"{{\"members\": [...]}} for another ensemble")


def _preset_name(config: dict) -> str:
    for name, published in PRESETS.items():
        if all(config[k] == published[k] for k in ("members", "weights", "infer_limit", "truncation")):
            return name
    return "custom" if config["weights"] is None else "custom_ensemble"


def convert_states(states: list[tuple[Path, dict[str, Tensor]]], kwargs: dict | None,
                   aux: dict[str, Path]) -> Converted:
    """``convert`` on state dicts already read (tests pass meta tensors with a manifest's shapes)."""
    kwargs = json.loads(json.dumps(kwargs or {}))     # a private copy
    limit, truncation = _settings(kwargs)
    for path, state in states:
        _check_family(path, state)
    cfgs, weights = _members(states, kwargs)
    state_dict: dict[str, Tensor] = {}
    for i, ((path, state), cfg) in enumerate(zip(states, cfgs)):
        check_state_dict(state, expected_shapes(cfg), path, f"member {i + 1}, {_describe(cfg)}")
        state_dict.update({f"members.{i}.{key}": value for key, value in state.items()})
    described = _describe(cfgs[0]) if weights is None else \
        "ensemble of " + ", ".join(f"{w:g} x {_describe(c)}" for c, w in zip(cfgs, weights))
    config = preset_config(cfgs, weights, f"2nd place (authors' code) {described}", limit, truncation)
    preset = _preset_name(config)
    if preset in PRESETS:
        config["description"] = PRESETS[preset]["description"]
    aux_data = {}
    if config["features"]["with_ice"]:       # V22/V23 inputs: the ice table goes into the checkpoint
        aux_data[ICE_AUX_KEY] = read_ice_table(aux_file(aux, ICE_TABLE_FILE, f"icemix preset '{preset}'"))
    used = {"L": limit, "truncation": truncation}
    used |= {"members": [{**c, "weight": w} for c, w in zip(cfgs, weights)]} if weights is not None else cfgs[0]
    return Converted(preset=preset, preset_config=config, state_dict=state_dict, aux=aux_data, kwargs=used)


def convert(sources: list[Path], kwargs: dict | None, aux: dict[str, Path]) -> Converted:
    """The authors' plain state dicts (predict.py: ``model.load_state_dict(torch.load(p))``) -> icegrid."""
    states = [(Path(p), plain_state_dict(read_torch_file(Path(p)), Path(p))) for p in sources]
    return convert_states(states, kwargs, aux)
