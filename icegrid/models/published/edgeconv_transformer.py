"""1st place (tito's EdgeConv + transformer), authors-exact: the presets of his six members
(``m1``..``m6``, each prediction notebook's own settings) and of his 6-member stacker (``stacked``, the
six members and the stacker in one checkpoint), the model that runs them, and the importer of his
GraphNeT state dicts (``model1-last.pth`` .. ``model6-last.pth``, ``stacking-6models-last.pth``).

An imported member predicts with head 0 (``_tasks.0``, the angle-loss head: what his prediction
keeps); a stack predicts with the stacker's head 0. Events keep their first 3001 pulses in time
(``FORCE_MAX_PULSE`` 3000 and an inclusive slice). ``--kwargs`` takes his notebook globals for one
member, ``{"DYNEDGE_LAYER_SIZE": [[256, 256], ...], "COLUMNS_NEAREST_NEIGHBOURS": 3 | 4, "USE_G": true,
"USE_PP": true}`` (3 or 4 stands for his ``[slice(0, 3)]`` / ``[slice(0, 4)]``), or for a stack
``{"members": [<member kwargs>, ...], "HIDDEN_SIZE": 512}`` with the member files in stacker order.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from icegrid.kaggle import InputError
from icegrid.models.base import Batch, DirectionModel
from icegrid.models.importer import (Converted, check_state_dict, expected_shapes, plain_state_dict,
                                     read_torch_file)
from icegrid.models.published.edgeconv_transformer_layers import (STACK_INPUTS_PER_MEMBER,
                                                                  AuthorsEdgeTransformerFeatures, TitoMember,
                                                                  TitoStacker, member_columns, stack_input)
from icegrid.models.registry import CheckpointError

FORCE_MAX_PULSE = 3000
TRANSFORMS = {AuthorsEdgeTransformerFeatures.name: AuthorsEdgeTransformerFeatures}
_BASE = {"arch": "authors", "transform": AuthorsEdgeTransformerFeatures.name, "truncation": "first_in_time",
         "infer_limit": FORCE_MAX_PULSE + 1}
_MEMBER_KEYS = ("DYNEDGE_LAYER_SIZE", "COLUMNS_NEAREST_NEIGHBOURS", "USE_G", "USE_PP", "NB_NEAREST_NEIGHBOURS")


def _member(n_blocks: int, knn_columns: int, use_g: bool, use_pp: bool) -> dict:
    return {"DYNEDGE_LAYER_SIZE": [[256, 256]] * n_blocks, "COLUMNS_NEAREST_NEIGHBOURS": knn_columns,
            "USE_G": use_g, "USE_PP": use_pp, "NB_NEAREST_NEIGHBOURS": [6]}


# pred_model{1..6}_copy.py, final cells (the goldens' manifest_model*.json)
MEMBERS = {"m1": _member(4, 3, True, True), "m2": _member(4, 3, True, True), "m3": _member(3, 3, False, False),
           "m4": _member(3, 4, True, True), "m5": _member(4, 3, True, True), "m6": _member(4, 4, True, True)}
PRESETS = {name: {**_BASE, "members": [member]} for name, member in MEMBERS.items()}
PRESETS["stacked"] = {**_BASE, "members": list(MEMBERS.values()), "HIDDEN_SIZE": 512}


class AuthorsEdgeTransformer(DirectionModel):
    """One member, or several members and the stacker that combines them."""

    name = "edgeconv_transformer"

    def __init__(self, preset: dict):
        super().__init__(preset)
        self.members = nn.ModuleList([TitoMember(**m) for m in preset["members"]])
        hidden = preset.get("HIDDEN_SIZE")
        self.stacker = (TitoStacker(len(self.members) * STACK_INPUTS_PER_MEMBER, int(hidden))
                        if hidden is not None else None)

    def _forward(self, batch: Batch) -> tuple[list[dict], list[dict] | None, Tensor | None]:
        outs = [member(batch) for member in self.members]
        if self.stacker is None:
            return outs, None, None
        features = torch.cat([stack_input(out) for out in outs], dim=1)
        return outs, self.stacker(features), features

    def predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        outs, stacked, _ = self._forward(batch)
        head = stacked[0] if stacked is not None else outs[0]["heads"][0]
        return head["direction"], head["kappa"]

    def raw_outputs(self, batch: Batch) -> dict[str, Tensor]:
        """A member's golden columns; for a stack the stacker's, its input (``stacker_input``) and
        each member's columns prefixed ``member<i>:``."""
        outs, stacked, features = self._forward(batch)
        if stacked is None:
            return member_columns(outs[0])
        cols: dict[str, Tensor] = {"stacker_input": features}
        for suffix, head, kappa_name in (("", stacked[0], "direction_kappa1"), ("1", stacked[1], "direction_kappa")):
            for axis, name in enumerate("xyz"):
                cols[f"direction_{name}{suffix}"] = head["direction"][:, axis]
            cols[kappa_name] = head["kappa"]
        for i, out in enumerate(outs):
            cols.update({f"member{i + 1}:{k}": v for k, v in member_columns(out).items()})
        return cols

    def stages(self, training: dict):
        raise NotImplementedError("1st place authors' presets are for the author's weights (icegrid import-weights); "
                                  "train icegrid's own presets (small, full) instead")


def build(preset_config: dict) -> AuthorsEdgeTransformer:
    return AuthorsEdgeTransformer(preset_config)


# ---- --kwargs ----------------------------------------------------------------------------------
def _knn_columns(value) -> int:
    """3 or 4, or the author's spelling ``[slice(0, 3)]``."""
    if isinstance(value, str):
        match = re.fullmatch(r"\[?\s*slice\(\s*0\s*,\s*(\d+)\s*(,\s*None\s*)?\)\s*\]?", value.strip())
        value = int(match.group(1)) if match else value
    if value not in (3, 4) or isinstance(value, bool):
        raise InputError(f"--kwargs: COLUMNS_NEAREST_NEIGHBOURS must be 3 or 4 (x, y, z [, t]), not {value!r}")
    return int(value)


def _member_kwargs(raw: dict, where: str) -> dict:
    if not isinstance(raw, dict):
        raise InputError(f"--kwargs: {where} must be a JSON object of the author's member settings")
    unknown = [k for k in raw if k not in _MEMBER_KEYS]
    if unknown:
        raise InputError(f"--kwargs: unknown key '{unknown[0]}' in {where} (have {', '.join(_MEMBER_KEYS)})")
    for key in ("DYNEDGE_LAYER_SIZE", "COLUMNS_NEAREST_NEIGHBOURS"):
        if key not in raw:
            raise InputError(f"--kwargs: {where} needs {key}")
    sizes = raw["DYNEDGE_LAYER_SIZE"]
    if (not isinstance(sizes, list) or not sizes
            or not all(isinstance(s, list) and s and all(isinstance(n, int) and n > 0 for n in s) for s in sizes)):
        raise InputError(f"--kwargs: DYNEDGE_LAYER_SIZE in {where} must be a list of lists of positive integers")
    k = raw.get("NB_NEAREST_NEIGHBOURS", [6])
    k = k if isinstance(k, list) else [k]
    if len(k) != 1 or not isinstance(k[0], int) or k[0] < 1:
        raise InputError(f"--kwargs: NB_NEAREST_NEIGHBOURS in {where} must be one positive integer, not {k!r}")
    flags = {key: raw.get(key, True) for key in ("USE_G", "USE_PP")}
    if not all(isinstance(v, bool) for v in flags.values()):
        raise InputError(f"--kwargs: USE_G and USE_PP in {where} must be true or false")
    return {"DYNEDGE_LAYER_SIZE": [list(s) for s in sizes],
            "COLUMNS_NEAREST_NEIGHBOURS": _knn_columns(raw["COLUMNS_NEAREST_NEIGHBOURS"]), **flags,
            "NB_NEAREST_NEIGHBOURS": k}


def config_from_kwargs(kwargs: dict, n_members: int, stacked: bool) -> dict:
    """A preset config from the author's settings (one member flat, or ``members`` + ``HIDDEN_SIZE``)."""
    if "members" not in kwargs:
        if stacked:
            raise InputError('--kwargs: a stack needs {"members": [...], "HIDDEN_SIZE": ...}')
        kwargs = {"members": [kwargs]}
    unknown = [k for k in kwargs if k not in ("members", "HIDDEN_SIZE")]
    if unknown:
        raise InputError(f"--kwargs: unknown key '{unknown[0]}' (a stack has members, HIDDEN_SIZE)")
    members = kwargs["members"]
    if not isinstance(members, list) or len(members) != n_members:
        raise InputError(f"--kwargs: 'members' must list {n_members} member(s), one per member file given")
    config = {**_BASE, "members": [_member_kwargs(m, f"member {i + 1}") for i, m in enumerate(members)]}
    hidden = kwargs.get("HIDDEN_SIZE")
    if stacked:
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            raise InputError("--kwargs: a stack needs HIDDEN_SIZE, a positive integer")
        config["HIDDEN_SIZE"] = hidden
    elif hidden is not None:
        raise InputError("--kwargs: HIDDEN_SIZE is the stacker's, but no stacker file was given")
    return config


# ---- import ---------------------------------------------------------------------------------------
def _model_number(path: Path) -> int | None:
    """N of the author's file names ``model<N>-last.pth`` (a hint for the ambiguous shapes)."""
    match = re.search(r"model([1-6])(?![0-9])", path.name.lower())
    return int(match.group(1)) if match else None


def _read(path: Path) -> tuple[str, dict[str, Tensor]]:
    """('member' | 'stacker', state dict); one-line error for any other model's file."""
    state = plain_state_dict(read_torch_file(path), path)
    if any(k.startswith("_mlp.") for k in state) and not any(k.startswith("_gnn.") for k in state):
        return "stacker", state
    if any(k.startswith("_gnn.") for k in state):
        if not any("_transformer_encoder" in k for k in state):
            raise CheckpointError(f"{path}: missing key '_gnn._conv_layers.0._transformer_encoder.layers.0."
                                  f"self_attn.in_proj_weight': a GraphNeT model without the 1st place's "
                                  f"transformer layers (DynEdge?), not a 1st-place member")
        return "member", state
    first = next(iter(state))
    raise CheckpointError(f"{path}: unexpected key '{first}': not a 1st-place member (_gnn.*) or stacker (_mlp.*) file")


@functools.lru_cache(maxsize=None)
def _published_member_shapes(name: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return expected_shapes(TitoMember(**MEMBERS[name]))


def _identify_member(path: Path, state: dict[str, Tensor]) -> str:
    """The published member (m1..m6) whose shapes the file has; the ``model<N>`` file name settles
    m1/m2/m5 (3-d kNN) against m6 (4-d kNN), which have the same shapes."""
    shapes = {name: _published_member_shapes(name) for name in MEMBERS}
    fits = [name for name, exp in shapes.items()
            if set(exp) == set(state) and all(tuple(state[k].shape) == s for k, s in exp.items())]
    if not fits:
        closest = min(shapes, key=lambda name: len(set(shapes[name]) ^ set(state)))
        try:
            check_state_dict(state, shapes[closest], path, f"published member '{closest}'")
        except CheckpointError as err:
            raise CheckpointError(f"{err}; other shapes need --kwargs") from None
    hint = _model_number(path)
    if hint is not None and f"m{hint}" in fits:
        return f"m{hint}"
    if all(MEMBERS[name] == MEMBERS[fits[0]] for name in fits):
        return fits[0]
    raise CheckpointError(f"{path}: shapes fit members {', '.join(fits)}, which differ in their kNN columns; "
                          f"name the file model<N>-last.pth or pass --kwargs with COLUMNS_NEAREST_NEIGHBOURS")


def _published(members: list[tuple[Path, dict]], stacked: bool) -> tuple[str, dict]:
    if not stacked:
        name = _identify_member(*members[0])
        return name, copy.deepcopy(PRESETS[name])
    if len(members) != len(MEMBERS):
        raise CheckpointError(f"{members[0][0]}: the author's stacker takes {len(MEMBERS)} members "
                              f"(model1..model6), {len(members)} given; another stack needs --kwargs")
    for i, (path, _) in enumerate(members):
        hint = _model_number(path)
        if hint is not None and hint != i + 1:
            raise CheckpointError(f"{path}: given as member {i + 1}; the stacker takes model1..model6 in order")
    return "stacked", copy.deepcopy(PRESETS["stacked"])


def convert(sources: list[Path], kwargs: dict | None, aux: dict[str, Path]) -> Converted:
    """The author's member files (and stacker file) -> the preset and the state dict in icegrid keys
    (``members.<i>.<his key>``, ``stacker.<his key>``)."""
    if aux:
        raise InputError(f"--aux {next(iter(aux))}: the 1st place takes no side files "
                         f"(its inputs need only the sensor geometry)")
    files = [(Path(p), *_read(Path(p))) for p in sources]
    members = [(p, state) for p, kind, state in files if kind == "member"]
    stackers = [(p, state) for p, kind, state in files if kind == "stacker"]
    if len(stackers) > 1:
        raise CheckpointError(f"{stackers[1][0]}: a second stacker file; give one stacker and its members")
    if stackers and not members:
        raise CheckpointError(f"{stackers[0][0]}: a stacker file needs its member files "
                              f"(--from model1-last.pth ... --from model6-last.pth before it)")
    if not stackers and len(members) > 1:
        raise CheckpointError(f"{members[1][0]}: several member files but no stacker file "
                              f"(stacking-6models-last.pth); import one member per checkpoint")
    stacked = bool(stackers)
    if kwargs is None:
        preset, config = _published(members, stacked)
    else:
        config = config_from_kwargs(kwargs, len(members), stacked)
        preset = next((name for name, cfg in PRESETS.items() if cfg == config), "custom")
    # provenance: the author's settings in his names, as --kwargs would give them
    used = {"members": config["members"], "HIDDEN_SIZE": config["HIDDEN_SIZE"]} if stacked else config["members"][0]
    with torch.device("meta"):
        model = build(config)
    state: dict[str, Tensor] = {}
    for i, (path, member_state) in enumerate(members):
        where = f"preset '{preset}'" + (f" member {i + 1}" if stacked else "")
        check_state_dict(member_state, expected_shapes(model.members[i]), path, where)
        state.update({f"members.{i}.{k}": v for k, v in member_state.items()})
    if stacked:
        path, stacker_state = stackers[0]
        check_state_dict(stacker_state, expected_shapes(model.stacker), path, f"preset '{preset}' stacker")
        state.update({f"stacker.{k}": v for k, v in stacker_state.items()})
    return Converted(preset=preset, preset_config=config, state_dict=state, aux={}, kwargs=used)
