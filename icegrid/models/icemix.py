"""2nd place, IceMix (paper sec. 3.2): Fourier-encoded pulses, Minkowski relative attention bias,
a cls-token transformer, and a weighted average of member direction vectors as the ensemble.

Per pulse: x, y, z and t (x4096) and log-charge (x1024) go through a Fourier encoding of width
``dim_base`` each, auxiliary through a learnable embedding and log10(n_pulses) through a half-width
Fourier encoding; an MLP maps the concatenation to ``dim``. An optional DynEdge-inspired encoder
(GELU, no pooling) adds latent node features. The first ``n_rel`` blocks get the space-time
interval ds = sign(ds^2) sqrt|ds^2| (clipped to +-4, x1024, Fourier-encoded at head size) as a
relative attention bias; then a cls token joins and ``depth`` regular blocks with learnable
shortcuts (BEiT layer scale) follow; the cls token is projected to a 3D vector (length = kappa).
Loss: vMF for the first epochs, then angle + 0.05 vMF (eq. 8).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from icegrid.models.base import Batch, DirectionModel, Stage, trainable
from icegrid.models.dynedge import N_GLOBALS, N_INPUTS, DynEdgeBackbone, global_variables
from icegrid.models.layers import Block, FourierEncoding, angle_vmf_loss, knn, opening_angle, vmf_loss

# (t scaled by 3e4 ns) -> metres-over-500 at the speed of light in vacuum (0.3 m/ns), as the authors.
TIME_TO_LENGTH = 3.0e4 / 500.0 * 0.3


class SpaceTimeBias(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.encode = FourierEncoding(head_dim)
        self.project = nn.Linear(head_dim, head_dim)

    def forward(self, x: Tensor) -> Tensor:
        pos, time = x[..., :3].float(), x[..., 3].float()
        ds2 = (pos[:, :, None] - pos[:, None, :]).pow(2).sum(-1) \
            - ((time[:, :, None] - time[:, None, :]) * TIME_TO_LENGTH).pow(2)
        ds = torch.sign(ds2) * torch.sqrt(ds2.abs())
        return self.project(self.encode(1024.0 * ds.clamp(-4.0, 4.0)))


class IceMixMember(nn.Module):
    def __init__(self, dim: int, dim_base: int, head_size: int, n_rel: int, depth: int,
                 dynedge_encoder: list[list[int]] | None = None, k: int = 8,
                 position_multiplier: float = 4096.0, charge_multiplier: float = 1024.0):
        super().__init__()
        self.position_multiplier, self.charge_multiplier = position_multiplier, charge_multiplier
        self.encode = FourierEncoding(dim_base)
        self.encode_length = FourierEncoding(dim_base // 2)
        self.aux_embedding = nn.Embedding(2, dim_base // 2)
        width = 5 * dim_base + dim_base // 2 + dim_base // 2
        self.k = k
        self.dynedge = DynEdgeBackbone(dynedge_encoder, k, activation=nn.GELU) if dynedge_encoder else None
        if self.dynedge is not None:
            width += self.dynedge.out_dim
        self.project = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, dim))
        n_heads = dim // head_size
        self.rel_bias = SpaceTimeBias(head_size)
        self.rel_blocks = nn.ModuleList([Block(dim, n_heads) for _ in range(n_rel)])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList([Block(dim, n_heads, layer_scale=1.0) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, batch: Batch) -> Tensor:
        x, mask = batch["x"], batch["mask"]
        log_n = batch["log_n_pulses"].to(x.dtype)
        parts = [self.encode(self.position_multiplier * x[..., :3]).flatten(-2),
                 self.encode(self.position_multiplier * x[..., 3]),
                 self.encode(self.charge_multiplier * x[..., 4]),
                 self.aux_embedding(batch["aux"]),
                 self.encode_length(log_n)[:, None, :].expand(-1, x.shape[1], -1)]
        if self.dynedge is not None:
            index, valid = knn(x[..., :3], mask, self.k)
            globals_ = global_variables(x, mask, index, valid, log_n)
            nodes = torch.cat([x, globals_[:, None, :].expand(-1, x.shape[1], -1)], dim=-1)
            parts.append(self.dynedge(nodes, mask, index, valid))
        h = self.project(torch.cat(parts, dim=-1))
        rel = self.rel_bias(x) if len(self.rel_blocks) else None
        for block in self.rel_blocks:
            h = block(h, mask, rel)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        for block in self.blocks:
            h = block(h, mask)
        return self.out(self.norm(h[:, 0]))


def _with_kappa(vector: Tensor) -> tuple[Tensor, Tensor]:
    return vector, vector.norm(dim=-1)


class IceMix(DirectionModel):
    name = "icemix"

    def __init__(self, preset: dict):
        super().__init__(preset)
        shared = {k: preset[k] for k in ("dim", "dim_base", "head_size", "n_rel", "depth") if k in preset}
        self.members = nn.ModuleList([IceMixMember(**{**shared, **member}) for member in preset["members"]])
        # Weighted average of member vectors (paper Table 4 W_e); fitted on validation data.
        self.register_buffer("weights", torch.full((len(self.members),), 1.0 / len(self.members)))

    def predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        vectors = torch.stack([member(batch) for member in self.members], dim=0)
        vector = (self.weights[:, None, None].to(vectors.dtype) * vectors).sum(0)
        return vector, vector.norm(dim=-1)

    def stages(self, training: dict) -> list[Stage]:
        vmf_epochs = int(training.get("vmf_only_epochs", 1))
        stages = []
        for i, member in enumerate(self.members):
            def member_loss(batch: Batch, epoch: int, member=member) -> Tensor:
                vector = member(batch)
                kappa = vector.norm(dim=-1)
                if epoch < vmf_epochs:
                    return vmf_loss(vector, kappa, batch["target"])
                return angle_vmf_loss(vector, kappa, batch["target"], vmf_weight=0.05)
            stages.append(Stage(f"member{i + 1}", "gradient", loss=member_loss, parameters=trainable(member),
                                epochs=int(training["epochs"]), lr=float(training["lr"]),
                                weight_decay=float(training.get("weight_decay", 0.05)),
                                predict=lambda batch, member=member: _with_kappa(member(batch))))
        if len(self.members) > 1:
            stages.append(Stage("ensemble_weights", "fit", fit=self.fit_weights))
        return stages

    def fit_weights(self, batches) -> dict:
        """Choose the convex weights of the member vectors that minimise the validation mean angle."""
        vectors, targets = [], []
        with torch.no_grad():
            for batch in batches():
                vectors.append(torch.stack([m(batch) for m in self.members], dim=0).float())
                targets.append(batch["target"])
        if not vectors:
            return {}
        vectors, targets = torch.cat(vectors, dim=1), torch.cat(targets)
        logits = torch.zeros(len(self.members), requires_grad=True)
        optimiser = torch.optim.Adam([logits], lr=0.05)
        for _ in range(200):     # a tiny convex-ish problem: a few hundred Adam steps suffice
            optimiser.zero_grad()
            w = logits.softmax(0)
            loss = opening_angle((w[:, None, None] * vectors).sum(0), targets).mean()
            loss.backward()
            optimiser.step()
        self.weights.copy_(logits.detach().softmax(0))
        return {"ensemble_weights": [round(float(v), 4) for v in self.weights],
                "ensemble_val_angle": float(loss.detach())}
