"""1st place: EdgeConv + transformer blocks (paper sec. 3.1) and their stacking ensemble.

A member draws a kNN graph (k = 6) once on the input (x, y, z) or (x, y, z, t), then repeats n
times: EdgeConv on (x_i, x_j - x_i, x_j) with max aggregation (the first on the raw pulse features
plus the global statistics), add & norm, a post-norm transformer layer (attention + MLP, each with
add & norm). An MLP and a global max pool
give one vector per event, concatenated with global statistics (feature means, the node homophily
ratio of x, y, z, t and log10 n_pulses) and fed to a final MLP whose last 256-wide hidden layer
drives two heads: the direction and kappa. Loss: opening angle + vMF (eq. 7).

Stacking (sec. 3.1.7): a three-layer, 512-wide MLP takes every member's (x, y, z, kappa) and
256-wide last hidden layer and predicts direction and kappa with the same loss; members are frozen
while it trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icegrid.models.base import Batch, DirectionModel, Stage, trainable
from icegrid.models.dynedge import global_variables
from icegrid.models.layers import EdgeConv, angle_vmf_loss, knn, masked_max, masked_mean, mlp

N_INPUTS = 6
N_GLOBALS = 11


class TwoHeads(nn.Module):
    """Direction and kappa heads; the returned vector has length kappa."""

    def __init__(self, width: int):
        super().__init__()
        self.direction = nn.Linear(width, 3)
        self.kappa = nn.Linear(width, 1)

    def forward(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        direction = F.normalize(self.direction(hidden), dim=-1, eps=1e-6)
        kappa = F.softplus(self.kappa(hidden)).squeeze(-1) + 1e-3
        return direction * kappa[:, None], kappa


class EdgeTransformerBlock(nn.Module):
    """EdgeConv, add & norm, transformer layer. The first block convolves the raw node features
    (so x_j - x_i are differences of physical inputs) and adds them back through a linear skip."""

    def __init__(self, in_dim: int, dim: int, n_heads: int, ff_dim: int):
        super().__init__()
        self.edge = EdgeConv(in_dim, [dim, dim], aggregation="max", with_neighbour=True)
        self.skip = nn.Linear(in_dim, dim) if in_dim != dim else nn.Identity()
        self.edge_norm = nn.LayerNorm(dim)
        self.transformer = nn.TransformerEncoderLayer(dim, n_heads, dim_feedforward=ff_dim, dropout=0.0,
                                                      batch_first=True, norm_first=False)

    def forward(self, x: Tensor, mask: Tensor, index: Tensor, valid: Tensor) -> Tensor:
        x = self.edge_norm(self.skip(x) + self.edge(x, index, valid))
        return self.transformer(x, src_key_padding_mask=~mask)


class EdgeTransformerMember(nn.Module):
    """One ensemble member (paper Table 2 row)."""

    def __init__(self, dim: int, n_heads: int, n_blocks: int, ff_dim: int, k: int = 6, knn_dims: int = 3,
                 hidden: int = 256, train_max_pulses: int | None = None, pooling: str = "max"):
        super().__init__()
        if pooling not in ("max", "max+mean"):
            raise ValueError(f"pooling must be 'max' (paper) or 'max+mean', not '{pooling}'")
        self.pooling = pooling
        self.k, self.knn_dims = k, knn_dims
        self.train_max_pulses = train_max_pulses
        self.blocks = nn.ModuleList([EdgeTransformerBlock(N_INPUTS + N_GLOBALS if i == 0 else dim, dim, n_heads, ff_dim)
                                     for i in range(n_blocks)])
        self.post = mlp([dim, dim, dim])
        pooled_dim = dim * (2 if pooling == "max+mean" else 1)
        self.final = mlp([pooled_dim + N_GLOBALS, hidden, hidden])
        self.heads = TwoHeads(hidden)
        self.hidden_dim = hidden

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        x, mask = batch["x"], batch["mask"]
        index, valid = knn(x[..., :self.knn_dims], mask, self.k)   # edges drawn once, on inputs
        globals_ = global_variables(x, mask, index, valid, batch["log_n_pulses"])
        # Global statistics are also given to every node, as DynEdge does.
        h = torch.cat([x, globals_[:, None, :].expand(-1, x.shape[1], -1)], dim=-1)
        for block in self.blocks:
            h = block(h, mask, index, valid)
        h = self.post(h)
        pooled = masked_max(h, mask)
        if self.pooling == "max+mean":
            pooled = torch.cat([pooled, masked_mean(h, mask)], dim=-1)
        hidden = self.final(torch.cat([pooled, globals_], dim=-1))
        vector, kappa = self.heads(hidden)
        return vector, kappa, hidden


class EdgeConvTransformer(DirectionModel):
    name = "edgeconv_transformer"

    def __init__(self, preset: dict):
        super().__init__(preset)
        shared = {k: preset[k] for k in ("dim", "n_heads", "ff_dim", "k", "hidden", "pooling") if k in preset}
        self.members = nn.ModuleList([EdgeTransformerMember(**shared, **member) for member in preset["members"]])
        self.stacked = len(self.members) > 1
        if self.stacked:
            width = int(preset.get("stack_width", 512))
            n_in = len(self.members) * (4 + shared["hidden"])
            self.stacker = mlp([n_in, width, width, width])
            self.stack_heads = TwoHeads(width)

    def _stack_input(self, batch: Batch) -> Tensor:
        parts = []
        for member in self.members:
            vector, kappa, hidden = member(batch)
            unit = vector / kappa[:, None]
            parts.append(torch.cat([unit, torch.log(kappa)[:, None], hidden], dim=-1))
        return torch.cat(parts, dim=-1)

    def predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        if not self.stacked:
            vector, kappa, _ = self.members[0](batch)
            return vector, kappa
        return self.stack_heads(self.stacker(self._stack_input(batch)))

    def stages(self, training: dict) -> list[Stage]:
        stages = []
        for i, member in enumerate(self.members):
            def member_loss(batch: Batch, epoch: int, member=member) -> Tensor:
                vector, kappa, _ = member(batch)
                return angle_vmf_loss(vector, kappa, batch["target"])
            stages.append(Stage(f"member{i + 1}", "gradient", loss=member_loss, parameters=trainable(member),
                                epochs=int(training["epochs"]), lr=float(training["lr"]),
                                max_event_pulses=member.train_max_pulses,
                                predict=lambda batch, member=member: member(batch)[:2]))
        if self.stacked:
            def stack_loss(batch: Batch, epoch: int) -> Tensor:
                with torch.no_grad():     # members are frozen embedding extractors here
                    features = self._stack_input(batch)
                vector, kappa = self.stack_heads(self.stacker(features))
                return angle_vmf_loss(vector, kappa, batch["target"])
            stages.append(Stage("stacker", "gradient", loss=stack_loss,
                                parameters=trainable(self.stacker, self.stack_heads),
                                epochs=int(training.get("stack_epochs", training["epochs"])),
                                lr=float(training["lr"])))
        return stages
