"""1st place (tito), the author's own network as his prediction notebooks compute it: the feature
transform (``IceCubeKaggle2`` + ``KNNGraphBuilderMulti``), one member (``StandardModel2`` over tito's
``DynEdge`` of ``dynTrans1`` blocks, two ``DirectionReconstructionWithKappa2`` heads) and the stacker
(``StandardModel3``), on icegrid's padded batches.

Module and attribute names follow the author's so that his state-dict keys are, under a
``members.<i>.`` or ``stacker.`` prefix, this model's keys. What differs from icegrid's own 1st-place
model (``icegrid.models.edgeconv_transformer``) and is the author's: no skip around block 0, globals
joined only after pooling, a 336/256 post-MLP and a 256/128 readout ending in LeakyReLU, two heads,
8 attention heads with torch's default 2048-wide feed-forward, and the kNN drawn once on raw metres
(and 0.1 * t in ns) before any scaling.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from icegrid.geometry import Geometry
from icegrid.models.base import Batch
from icegrid.models.dynedge import global_variables
from icegrid.models.features import FeatureTransform, Selection, ShardFeatures
from icegrid.models.layers import gather_neighbours, masked_max
from icegrid.store import ShardData

N_INPUTS = 6                  # IceCubeKaggle2: x, y, z, time, charge, auxiliary
N_GLOBALS = 5 + N_INPUTS      # feature means, xyzt homophily, log10(n_pulses)
N_HEADS = 8                   # dynTrans1's TransformerEncoderLayer(nhead=8)
POST_PROCESSING_SIZES = (336, 256)
READOUT_SIZES = (256, 128)
TIME_PARAM_FOR_DIST = 0.1     # KNNGraphBuilderMulti: time (ns) x 0.1 in the kNN metric
STACK_INPUTS_PER_MEMBER = 8 + READOUT_SIZES[-1]


# ---- features ---------------------------------------------------------------------------------
class AuthorsEdgeTransformerFeatures(FeatureTransform):
    """The author's inputs: ``x`` (N, 6) float32 = x, y, z / 500, (t - 1e4) / (500 * 0.23),
    log10(q) / 3, auxiliary; ``knn`` (N, 4) float32 = (x, y, z, 0.1 t) / 1000, the raw-unit
    coordinates his graph builder hands to knn_graph; per event ``log_n_pulses`` = log10 of the
    pulses kept. Computed with torch float32 ops in the author's order, so the float32 round trip
    of the time through x 0.1 and / 0.1 is his bit for bit."""

    name = "edgeconv_transformer_authors"
    version = 1

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version}

    def __call__(self, data: ShardData, selection: Selection, geometry: Geometry) -> ShardFeatures:
        index = selection.index
        sensor = data.pulses["sensor_id"][index].astype(np.int64)
        xyz = torch.from_numpy(geometry.xyz[sensor].astype(np.float32))
        time = torch.from_numpy(data.pulses["time"][index].astype(np.float32))
        charge = torch.from_numpy(data.pulses["charge"][index].astype(np.float32))
        auxiliary = torch.from_numpy(data.pulses["auxiliary"][index].astype(np.float32))
        scaled_time = time * TIME_PARAM_FOR_DIST           # in place in the author's graph builder,
        knn_coords = torch.cat([xyz, scaled_time[:, None]], dim=1) / 1000
        time = scaled_time / TIME_PARAM_FOR_DIST           # ... and divided back before scaling
        x = torch.stack([xyz[:, 0] / 500.0, xyz[:, 1] / 500.0, xyz[:, 2] / 500.0,
                         (time - 1.0e04) / (500.0 * 0.23), torch.log10(charge) / 3.0, auxiliary], dim=1)
        n_kept = torch.from_numpy(selection.lengths.astype(np.int32))
        return ShardFeatures(selection=selection, pulse={"x": x.numpy(), "knn": knn_coords.numpy()},
                             event={"log_n_pulses": torch.log10(n_kept).numpy()})


# ---- graph ----------------------------------------------------------------------------------------
def knn_edges(coords: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch_cluster's ``knn_graph(loop=False)`` per padded event: each node's k nearest other
    nodes by float64 Euclidean distance, nearest first, as (B, L, k) indices and validity (events
    with at most k pulses get invalid slots, which point at the node itself). Exact wherever no two
    candidates tie at the k-th place; ties (several pulses on one DOM) may be broken differently."""
    c = coords.double()
    batch, length, n_dims = c.shape
    distance = torch.zeros((batch, length, length), dtype=torch.float64, device=c.device)
    for dim in range(n_dims):        # 3 or 4 coordinates, summed in float64 like the goldens' kNN
        distance += (c[:, :, None, dim] - c[:, None, :, dim]) ** 2
    eye = torch.eye(length, dtype=torch.bool, device=c.device)[None]
    distance.masked_fill_(~mask[:, None, :] | eye, float("inf"))
    k_eff = min(k, length - 1)
    self_index = torch.arange(length, device=c.device)[None, :, None].expand(batch, length, k)
    if k_eff <= 0:
        return self_index.clone(), torch.zeros((batch, length, k), dtype=torch.bool, device=c.device)
    values, index = distance.topk(k_eff, dim=-1, largest=False, sorted=True)
    valid = torch.isfinite(values) & mask[:, :, None]
    if k_eff < k:
        index = torch.cat([index, self_index[..., k_eff:]], dim=-1)
        valid = torch.cat([valid, torch.zeros_like(valid[..., :1]).expand(-1, -1, k - k_eff)], dim=-1)
    return torch.where(valid, index, self_index), valid


# ---- one member -----------------------------------------------------------------------------------
def _leaky_mlp(sizes: list[int]) -> nn.Sequential:
    """Linear + LeakyReLU after every layer, the last included (all of the author's MLPs)."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.LeakyReLU()]
    return nn.Sequential(*layers)


class DynTrans(nn.Module):
    """``dynTrans1``: EdgeConv on (x_i, x_j - x_i, x_j) with max aggregation, a residual where the
    width is unchanged (so never around block 0), post-LayerNorm, one post-norm transformer layer."""

    def __init__(self, n_in: int, sizes: list[int]):
        super().__init__()
        self.nn = _leaky_mlp([3 * n_in] + list(sizes))
        width = sizes[-1]
        self.norm1 = nn.LayerNorm(width, eps=1e-5)
        layer = nn.TransformerEncoderLayer(d_model=width, nhead=N_HEADS, batch_first=True, dropout=0.0,
                                           norm_first=False)
        self._transformer_encoder = nn.TransformerEncoder(layer, num_layers=1)

    def forward(self, x: Tensor, mask: Tensor, index: Tensor, valid: Tensor) -> Tensor:
        neighbours = gather_neighbours(x, index)
        centre = x[:, :, None, :].expand_as(neighbours)
        messages = self.nn(torch.cat([centre, neighbours - centre, neighbours], dim=-1))
        # PyG's max aggregation: a node without incoming edges gets 0
        out = messages.masked_fill(~valid[..., None], float("-inf")).amax(2).nan_to_num(0.0, neginf=0.0)
        x = x + out if out.shape[-1] == x.shape[-1] else out
        return self._transformer_encoder(self.norm1(x), src_key_padding_mask=~mask)


class TitoGNN(nn.Module):
    """tito's ``DynEdge`` (serial connections, max pooling, globals after pooling)."""

    def __init__(self, layer_sizes: list[list[int]], use_g: bool, use_pp: bool):
        super().__init__()
        self.use_g, self.use_pp = use_g, use_pp
        self._conv_layers = nn.ModuleList()
        width = N_INPUTS
        for sizes in layer_sizes:
            self._conv_layers.append(DynTrans(width, list(sizes)))
            width = sizes[-1]
        if use_pp:
            self._post_processing = _leaky_mlp([width, *POST_PROCESSING_SIZES])
            width = POST_PROCESSING_SIZES[-1]
        self._readout = _leaky_mlp([width + (N_GLOBALS if use_g else 0), *READOUT_SIZES])

    def forward(self, x: Tensor, mask: Tensor, index: Tensor, valid: Tensor, log_n_pulses: Tensor) -> Tensor:
        h = x
        for conv in self._conv_layers:
            h = conv(h, mask, index, valid)
        if self.use_pp:
            h = self._post_processing(h)
        pooled = masked_max(h, mask)
        if self.use_g:     # computed on the scaled inputs and the input-space edges
            pooled = torch.cat([pooled, global_variables(x, mask, index, valid, log_n_pulses)], dim=-1)
        return self._readout(pooled)


class KappaHead(nn.Module):
    """``DirectionReconstructionWithKappa2``: kappa = max(|v|, float eps), direction = v / kappa."""

    def __init__(self, hidden: int):
        super().__init__()
        self._affine = nn.Linear(hidden, 3)

    def forward(self, hidden: Tensor) -> dict[str, Tensor]:
        raw = self._affine(hidden)
        kappa = torch.linalg.vector_norm(raw, dim=1).clamp(min=torch.finfo(raw.dtype).eps)
        return {"raw": raw, "direction": raw / kappa[:, None], "kappa": kappa}


class TitoMember(nn.Module):
    """``StandardModel2``: graph on the first 3 or 4 kNN columns, the GNN, heads 0 (trained with the
    angle loss) and 1 (vMF)."""

    def __init__(self, DYNEDGE_LAYER_SIZE: list[list[int]], COLUMNS_NEAREST_NEIGHBOURS: int,
                 USE_G: bool, USE_PP: bool, NB_NEAREST_NEIGHBOURS: list[int] | tuple[int] = (6,)):
        super().__init__()
        self.knn_columns = int(COLUMNS_NEAREST_NEIGHBOURS)
        self.k = int(NB_NEAREST_NEIGHBOURS[0])
        self._gnn = TitoGNN(DYNEDGE_LAYER_SIZE, bool(USE_G), bool(USE_PP))
        self._tasks = nn.ModuleList([KappaHead(READOUT_SIZES[-1]), KappaHead(READOUT_SIZES[-1])])

    def forward(self, batch: Batch) -> dict:
        mask = batch["mask"]
        index, valid = knn_edges(batch["knn"][..., :self.knn_columns], mask, self.k)
        hidden = self._gnn(batch["x"], mask, index, valid, batch["log_n_pulses"])
        return {"heads": [task(hidden) for task in self._tasks], "hidden": hidden}


def member_columns(out: dict) -> dict[str, Tensor]:
    """A member's outputs under the author's column names (note his crossed kappa names)."""
    head0, head1 = out["heads"]
    cols: dict[str, Tensor] = {}
    for suffix, head, kappa_name in (("", head0, "direction_kappa1"), ("1", head1, "direction_kappa")):
        for axis, name in enumerate("xyz"):
            cols[f"direction_{name}{suffix}"] = head["direction"][:, axis]
        cols[kappa_name] = head["kappa"]
    for i, head in enumerate((head0, head1)):
        for axis, name in enumerate("xyz"):
            cols[f"head{i}_raw_{name}"] = head["raw"][:, axis]
    for i in range(out["hidden"].shape[1]):
        cols[f"idx{i}"] = out["hidden"][:, i]
    return cols


# ---- stacker --------------------------------------------------------------------------------------
def stack_input(out: dict) -> Tensor:
    """One member's 136 stacker inputs as MyDatasetFilePreLoad builds them from its columns:
    head-0 direction, log1p(head-1 kappa), head-1 direction, log1p(head-0 kappa), idx0..127."""
    head0, head1 = out["heads"]
    return torch.cat([head0["direction"], torch.log1p(head1["kappa"])[:, None], head1["direction"],
                      torch.log1p(head0["kappa"])[:, None], out["hidden"]], dim=1)


class TitoStacker(nn.Module):
    """``StandardModel3``: three (Linear, LeakyReLU, Dropout) layers of HIDDEN_SIZE and two heads."""

    def __init__(self, n_input_fea: int, HIDDEN_SIZE: int):
        super().__init__()
        layers: list[nn.Module] = []
        for n_in, n_out in zip([n_input_fea] + [HIDDEN_SIZE] * 2, [HIDDEN_SIZE] * 3):
            layers += [nn.Linear(n_in, n_out), nn.LeakyReLU(), nn.Dropout(0.0)]
        self._mlp = nn.Sequential(*layers)
        self._tasks = nn.ModuleList([KappaHead(HIDDEN_SIZE), KappaHead(HIDDEN_SIZE)])

    def forward(self, features: Tensor) -> list[dict[str, Tensor]]:
        hidden = self._mlp(features.float())
        return [task(hidden) for task in self._tasks]
