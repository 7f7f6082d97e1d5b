"""GraphNeT's DynEdge, the competition baseline (paper sec. 2.2): EdgeConv layers whose kNN graph
(k = 8) is first drawn on sensor positions and then re-drawn in each layer's latent space, a skip
concatenation of all layer outputs, min/max/mean global pooling, an MLP read-out and a 3D vector
trained with the vMF loss (its length is kappa)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from icegrid.models.base import Batch, DirectionModel, Stage, trainable
from icegrid.models.layers import (EdgeConv, homophily, knn, masked_max, masked_mean, masked_min, mlp,
                                   vmf_loss)

N_INPUTS = 6          # x, y, z, t, q, auxiliary
N_GLOBALS = N_INPUTS + 4 + 1   # feature means, homophily of x, y, z, t, log10(n_pulses)


class DynEdgeBackbone(nn.Module):
    """Node encoder shared with the 2nd place's optional DynEdge-inspired encoder."""

    def __init__(self, conv_sizes: list[list[int]], k: int, activation: type[nn.Module] = nn.LeakyReLU,
                 in_dim: int = N_INPUTS + N_GLOBALS):
        super().__init__()
        self.k = k
        self.convs = nn.ModuleList()
        width = in_dim
        for sizes in conv_sizes:
            self.convs.append(EdgeConv(width, list(sizes), aggregation="sum", activation=activation))
            width = sizes[-1]
        self.out_dim = in_dim + sum(sizes[-1] for sizes in conv_sizes)

    def forward(self, x: Tensor, mask: Tensor, index: Tensor, valid: Tensor) -> Tensor:
        skips = [x]
        for i, conv in enumerate(self.convs):
            if i > 0:   # dynamic edges: kNN re-computed in the latent space of the previous layer
                index, valid = knn(x, mask, self.k)
            x = conv(x, index, valid)
            skips.append(x)
        return torch.cat(skips, dim=-1)


def global_variables(x: Tensor, mask: Tensor, index: Tensor, valid: Tensor, log_n_pulses: Tensor) -> Tensor:
    """Event-level inputs (GraphNeT): feature means, xyzt homophily, log10(n_pulses)."""
    return torch.cat([masked_mean(x, mask), homophily(x[..., :4], index, valid, mask),
                      log_n_pulses[:, None].to(x.dtype)], dim=-1)


class DynEdge(DirectionModel):
    name = "dynedge"

    def __init__(self, preset: dict):
        super().__init__(preset)
        self.k = int(preset.get("k", 8))
        self.backbone = DynEdgeBackbone(preset["conv_sizes"], self.k)
        self.post = mlp([self.backbone.out_dim] + list(preset["post_sizes"]))
        width = preset["post_sizes"][-1]
        self.readout = mlp([3 * width] + list(preset["readout_sizes"]))
        self.head = nn.Linear(preset["readout_sizes"][-1], 3)

    def predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        x, mask = batch["x"], batch["mask"]
        index, valid = knn(x[..., :3], mask, self.k)
        globals_ = global_variables(x, mask, index, valid, batch["log_n_pulses"])
        nodes = torch.cat([x, globals_[:, None, :].expand(-1, x.shape[1], -1)], dim=-1)
        nodes = self.post(self.backbone(nodes, mask, index, valid))
        pooled = torch.cat([masked_min(nodes, mask), masked_max(nodes, mask), masked_mean(nodes, mask)], dim=-1)
        vector = self.head(self.readout(pooled))
        return vector, vector.norm(dim=-1)

    def stages(self, training: dict) -> list[Stage]:
        def loss(batch: Batch, epoch: int) -> Tensor:
            vector, kappa = self.predict(batch)
            return vmf_loss(vector, kappa, batch["target"])
        return [Stage("dynedge", "gradient", loss=loss, parameters=trainable(self),
                      epochs=int(training["epochs"]), lr=float(training["lr"]))]
