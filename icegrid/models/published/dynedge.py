"""The GraphNeT v1.0 DynEdge Kaggle baseline, authors-exact: its preset, its feature transform
(GraphNeT's ``IceCubeKaggle`` scaling) and the importer of GraphNeT ``StandardModel`` state dicts
(the Kaggle dataset ``dynedge-pretrained`` ships ``state_dict.pth``).

Hyper-parameters go by GraphNeT's own ``DynEdge`` argument names (``nb_inputs``, ``nb_neighbours``,
``features_subset``, ``dynedge_layer_sizes``, ``post_processing_layer_sizes``,
``readout_layer_sizes``, ``global_pooling_schemes``, ``add_global_variables_after_pooling``) plus
``KNNGraphBuilder``'s ``nb_nearest_neighbours``; missing ones take GraphNeT's defaults, as a
``DynEdge(**kwargs)`` call would. GraphNeT uses every pulse of an event: no sequence limit.
The layers are in ``dynedge_layers``; icegrid's own DynEdge (``icegrid.models.dynedge``) is unchanged.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from icegrid.errors import first_line
from icegrid.geometry import Geometry
from icegrid.kaggle import InputError
from icegrid.models.base import Batch, DirectionModel
from icegrid.models.features import FeatureTransform, Selection, ShardFeatures
from icegrid.models.importer import (Converted, check_state_dict, expected_shapes, plain_state_dict,
                                     read_torch_file)
from icegrid.models.published.dynedge_layers import (POOLINGS, DirectionReconstructionWithKappa,
                                                     GraphNetDynEdge, knn_exact)
from icegrid.models.registry import CheckpointError
from icegrid.store import ShardData

# GraphNeT v1.0.0 defaults of DynEdge(...) and KNNGraphBuilder(nb_nearest_neighbours=8) of the baseline.
GRAPHNET_DEFAULTS: dict = {
    "nb_inputs": 6,                 # required by GraphNeT; IceCubeKaggle has exactly these 6 features
    "nb_neighbours": 8,
    "features_subset": [0, 1, 2],   # GraphNeT: slice(0, 3)
    "dynedge_layer_sizes": [[128, 256], [336, 256], [336, 256], [336, 256]],
    "post_processing_layer_sizes": [336, 256],
    "readout_layer_sizes": [128],
    "global_pooling_schemes": None,
    "add_global_variables_after_pooling": False,
    "nb_nearest_neighbours": 8,
}
KAGGLE_FEATURES = ("x", "y", "z", "time", "charge", "auxiliary")
CUSTOM_PRESET = "custom"           # the preset name of a --kwargs configuration no published preset has


class GraphNetKaggleFeatures(FeatureTransform):
    """GraphNeT's ``IceCubeKaggle`` inputs, computed in float32 as GraphNeT does on its tensors:
    x, y, z / 500; (t - 1e4) / 3e4; log10(q) / 3 (no floor: Kaggle charges are positive);
    auxiliary as 0/1. ``xyz`` (raw metres, float32) is what ``KNNGraphBuilder`` draws the
    input graph on, before the scaling."""

    name = "dynedge_graphnet"
    version = 1

    def __call__(self, data: ShardData, selection: Selection, geometry: Geometry) -> ShardFeatures:
        index = selection.index
        f32 = np.float32
        xyz = geometry.xyz[data.pulses["sensor_id"][index].astype(np.int64)].astype(f32)
        time = data.pulses["time"][index].astype(f32)
        charge = data.pulses["charge"][index].astype(f32)
        x = np.empty((index.shape[0], len(KAGGLE_FEATURES)), dtype=f32)
        x[:, :3] = xyz / f32(self.position_scale)
        x[:, 3] = (time - f32(self.time_shift)) / f32(self.time_scale)
        with np.errstate(divide="ignore"):
            x[:, 4] = np.log10(charge) / f32(self.charge_log_scale)
        x[:, 5] = data.pulses["auxiliary"][index]
        return ShardFeatures(selection=selection, pulse={"x": x, "xyz": xyz})


def _positive_ints(value, name: str, where: str, nested: bool = False) -> list:
    def ok(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0
    items = value if isinstance(value, (list, tuple)) else None
    if not items or not all((isinstance(v, (list, tuple)) and v and all(map(ok, v))) if nested else ok(v)
                            for v in items):
        shape = "a list of lists of positive integers" if nested else "a list of positive integers"
        raise InputError(f"{where}: {name} must be {shape}, got {value!r}")
    return [list(v) for v in items] if nested else list(items)


def resolve_kwargs(kwargs: dict | None, where: str = "--kwargs") -> dict:
    """GraphNeT DynEdge arguments -> every argument, resolved and checked (one-line InputError)."""
    kwargs = dict(kwargs or {})
    unknown = [k for k in kwargs if k not in GRAPHNET_DEFAULTS]
    if unknown:
        raise InputError(f"{where}: unknown argument '{unknown[0]}' (GraphNeT DynEdge takes "
                         f"{', '.join(GRAPHNET_DEFAULTS)})")
    out = {**GRAPHNET_DEFAULTS, **kwargs}
    if out["nb_inputs"] != len(KAGGLE_FEATURES) or isinstance(out["nb_inputs"], bool):
        raise InputError(f"{where}: nb_inputs must be 6, IceCubeKaggle's features ({', '.join(KAGGLE_FEATURES)})")
    for name in ("nb_neighbours", "nb_nearest_neighbours"):
        value = out[name]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InputError(f"{where}: {name} must be a positive integer, got {value!r}")
    out["dynedge_layer_sizes"] = _positive_ints(out["dynedge_layer_sizes"], "dynedge_layer_sizes", where, nested=True)
    for name in ("post_processing_layer_sizes", "readout_layer_sizes"):
        out[name] = _positive_ints(out[name], name, where)
    pooling = out["global_pooling_schemes"]
    pooling = [pooling] if isinstance(pooling, str) else pooling
    if not pooling:
        raise InputError(f"{where}: global_pooling_schemes missing: without pooling GraphNeT's DynEdge "
                         f"predicts per pulse, not per event (the Kaggle baseline: [\"min\", \"max\", \"mean\"])")
    if not isinstance(pooling, list) or any(p not in POOLINGS for p in pooling):
        raise InputError(f"{where}: global_pooling_schemes must be a list of {', '.join(POOLINGS)}, got {pooling!r}")
    out["global_pooling_schemes"] = list(pooling)
    if not isinstance(out["add_global_variables_after_pooling"], bool):
        raise InputError(f"{where}: add_global_variables_after_pooling must be true or false")
    # GraphNeT re-draws the graph on these latent columns after every layer, the last one included.
    narrowest = min(sizes[-1] for sizes in out["dynedge_layer_sizes"])
    subset = out["features_subset"]
    if not isinstance(subset, list) or not subset or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < narrowest for i in subset):
        raise InputError(f"{where}: features_subset must be a list of latent columns below {narrowest}, got {subset!r}")
    return out


def _preset(kwargs: dict, description: str) -> dict:
    return {"arch": "authors", "description": description, "transform": GraphNetKaggleFeatures.name,
            "truncation": "first_in_time", "infer_limit": None, "train_limit": None,
            "kwargs": resolve_kwargs(kwargs, where="dynedge preset")}


PRESETS: dict[str, dict] = {
    "kaggle_baseline": _preset({"nb_inputs": 6, "global_pooling_schemes": ["min", "max", "mean"]},
                               "GraphNeT v1.0 DynEdge, the Kaggle baseline (dynedge-pretrained state_dict.pth)"),
}
TRANSFORMS = {GraphNetKaggleFeatures.name: GraphNetKaggleFeatures}


class DynEdgeGraphNet(DirectionModel):
    """GraphNeT's ``StandardModel(IceCubeKaggle(KNNGraphBuilder(k)), DynEdge(**kwargs),
    [DirectionReconstructionWithKappa])``; the module names are GraphNeT's (``_gnn``, ``_tasks``)."""

    name = "dynedge"

    def __init__(self, preset: dict):
        super().__init__(preset)
        kwargs = resolve_kwargs(preset.get("kwargs"), where="dynedge preset")
        self.nb_nearest_neighbours = kwargs.pop("nb_nearest_neighbours")
        self._gnn = GraphNetDynEdge(**kwargs)
        self._tasks = nn.ModuleList([DirectionReconstructionWithKappa(kwargs["readout_layer_sizes"][-1])])

    def _forward(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        mask = batch["mask"]
        index, valid = knn_exact(batch["xyz"], mask, self.nb_nearest_neighbours)
        return self._tasks[0](self._gnn(batch["x"], mask, index, valid, batch["length"]))

    def predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        _, direction, kappa = self._forward(batch)      # GraphNeT's direction labels: Kaggle axes
        return direction, kappa

    def raw_outputs(self, batch: Batch) -> dict[str, Tensor]:
        raw, direction, kappa = self._forward(batch)
        names = ("raw_x", "raw_y", "raw_z", "dir_x", "dir_y", "dir_z")
        return dict(zip(names, [*raw.unbind(1), *direction.unbind(1)])) | {"kappa": kappa}

    def stages(self, training: dict) -> list:
        raise NotImplementedError("dynedge authors' presets are imported (icegrid import-weights), not trained; "
                                  "train icegrid's 'small' or 'full' preset instead")


def build(preset_config: dict) -> DynEdgeGraphNet:
    return DynEdgeGraphNet(preset_config)


def preset_for(kwargs: dict | None) -> tuple[str, dict]:
    """(preset name, preset config) for GraphNeT arguments: a published preset when they resolve to
    its configuration, else ``custom``."""
    resolved = resolve_kwargs(kwargs)
    for name, config in PRESETS.items():
        if config["kwargs"] == resolved:
            return name, copy.deepcopy(config)
    base = next(iter(PRESETS.values()))
    return CUSTOM_PRESET, {**copy.deepcopy(base), "description": "GraphNeT v1.0 DynEdge with --kwargs", "kwargs": resolved}


def preset_shapes(preset_config: dict) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):         # shapes only: nothing allocated, whatever the size
        return expected_shapes(build(preset_config))


def convert_state_dict(state_dict: dict[str, Tensor], path: Path | str, kwargs: dict | None = None) -> Converted:
    """A GraphNeT state dict -> the preset its shapes identify (``kwargs=None``) or ``kwargs``'s."""
    if not any(key.startswith("_gnn.") for key in state_dict):
        raise CheckpointError(f"{path}: not a GraphNeT DynEdge state dict (first key '{next(iter(state_dict))}', "
                              f"expected '_gnn.*' and '_tasks.0._affine.*')")
    if kwargs is not None:
        name, config = preset_for(kwargs)
        check_state_dict(state_dict, preset_shapes(config), path, f"dynedge preset '{name}' with these --kwargs")
    else:
        failures, matches = [], []
        for name, config in PRESETS.items():
            try:
                check_state_dict(state_dict, preset_shapes(config), path, f"dynedge preset '{name}'")
                matches.append(name)
            except CheckpointError as err:
                failures.append(first_line(err))
        if not matches:
            raise CheckpointError(f"{failures[0]} (another configuration: pass --kwargs with GraphNeT's "
                                  f"DynEdge arguments)")
        if len(matches) > 1:
            raise CheckpointError(f"{path}: shapes fit several dynedge presets ({', '.join(matches)}); "
                                  f"choose one with --kwargs")
        name, config = matches[0], copy.deepcopy(PRESETS[matches[0]])
    return Converted(preset=name, preset_config=config, state_dict=dict(state_dict), aux={},
                     kwargs=dict(config["kwargs"]))


def convert(sources: list[Path], kwargs: dict | None, aux: dict[str, Path]) -> Converted:
    """GraphNeT's ``state_dict.pth`` (plain, ``{'state_dict': ...}`` or Lightning-prefixed) -> icegrid."""
    if len(sources) != 1:
        raise InputError(f"--from: dynedge takes one GraphNeT state_dict.pth, got {len(sources)} files")
    if aux:
        raise InputError(f"--aux {next(iter(aux))}: dynedge needs no side files (GraphNeT's Kaggle "
                         f"features come from the events alone)")
    path = Path(sources[0])
    return convert_state_dict(plain_state_dict(read_torch_file(path), path, prefix="model."), path, kwargs)
