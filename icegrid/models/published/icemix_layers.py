"""The 2nd place's networks as the authors' code computes them (DrHB/icecube-2nd-place@484cdcf,
``src/models.py``): ``DeepIceModel`` and ``EncoderWithDirectionReconstructionV22/V23``, on icegrid's
padded batches.

Submodules carry the authors' attribute names, so a published state dict loads key for key. Where the
authors' code differs from the paper it is reproduced as written: the relative space-time bias acts on
the attention logits AND on the values, only the first ``n_rel`` of the 4 bias blocks carry it, there is
no final LayerNorm, the embedding order is pos, charge, time, aux, length, and the output is
(sin az sin zen, cos az sin zen, cos zen) * kappa (x and y swapped w.r.t. Kaggle).

Inputs (a batch from ``icegrid.models.features.collate``): ``pos`` (B, L, 3) = xyz / 500, ``time``
(B, L) = (t - 1e4) / 3e4, ``charge`` (B, L) = log10(q) / 3, ``auxiliary`` (B, L) int, ``qe`` (B, L)
int and ``ice_properties`` (B, L, 2) (V22/V23 only), ``mask`` (B, L) and ``L0`` (B,) = pulses before
truncation. The Fourier phases reach ~4096 rad, so each one is computed with the authors' exact
float32 operations (one rounding difference would move a phase by ~5e-4).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Rel_ds: (t in units of 3e4 ns) -> (metres / 500) at 0.3 m/ns, the authors' expression verbatim.
TIME_TO_LENGTH = 3e4 / 500 * 3e-1
N_GRAPH_INPUTS = 9            # V22/V23 DynEdge inputs: pos (3), time, aux, qe, charge, ice (2)
N_GRAPH_GLOBALS = 5 + N_GRAPH_INPUTS
GRAPH_CONV_SIZES = ((128, 256), (336, 256), (336, 256), (336, 256))
GRAPH_K = 8


def sinusoidal(x: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """sin/cos of x at dim/2 frequencies, with the authors' float32 frequency formula."""
    half = dim // 2
    step = math.log(base) / half
    frequencies = torch.exp(torch.arange(half, device=x.device) * (-step))
    phase = x[..., None] * frequencies[None, ...]
    return torch.cat((phase.sin(), phase.cos()), dim=-1)


class ScaledSinusoidal(nn.Module):
    """A sinusoidal encoding times one learnable scale (V22/V23's extractor)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.scale = nn.Parameter(torch.ones(1) * dim ** -0.5)

    def forward(self, x: Tensor) -> Tensor:
        return sinusoidal(x, self.dim) * self.scale


def _projection(dim_base: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(6 * dim_base, 6 * dim_base), nn.LayerNorm(6 * dim_base), nn.GELU(),
                         nn.Linear(6 * dim_base, dim))


class Extractor(nn.Module):
    """DeepIceModel's per-pulse embedding; ``scaled``: V22/V23's (learnable scale per encoding)."""

    def __init__(self, dim_base: int, dim: int, scaled: bool = False):
        super().__init__()
        self.dim_base, self.scaled = dim_base, scaled
        if scaled:
            self.pos = ScaledSinusoidal(dim_base)
            self.emb_charge = ScaledSinusoidal(dim_base)
            self.time = ScaledSinusoidal(dim_base)
        self.aux_emb = nn.Embedding(2, dim_base // 2)
        if scaled:
            self.emb2 = ScaledSinusoidal(dim_base // 2)
        self.proj = _projection(dim_base, dim)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        pos, charge, time = batch["pos"], batch["charge"], batch["time"]
        length = torch.log10(batch["L0"].to(dtype=pos.dtype))
        if self.scaled:
            parts = [self.pos(4096 * pos).flatten(-2), self.emb_charge(1024 * charge), self.time(4096 * time),
                     self.aux_emb(batch["auxiliary"]), self.emb2(length)]
        else:
            db = self.dim_base
            parts = [sinusoidal(4096 * pos, db).flatten(-2), sinusoidal(1024 * charge, db),
                     sinusoidal(4096 * time, db), self.aux_emb(batch["auxiliary"]), sinusoidal(length, db // 2)]
        parts[-1] = parts[-1].unsqueeze(1).expand(-1, pos.shape[1], -1)
        return self.proj(torch.cat(parts, -1))


class RelativeSpaceTime(nn.Module):
    """Rel_ds: the Minkowski interval sign(ds2) sqrt|ds2| of every pulse pair, clipped to +-4,
    Fourier-encoded at head size and projected: (B, L, L, head_size)."""

    def __init__(self, head_size: int):
        super().__init__()
        self.head_size = head_size
        self.proj = nn.Linear(head_size, head_size)

    def forward(self, pos: Tensor, time: Tensor) -> Tensor:
        ds2 = (pos[:, :, None] - pos[:, None, :]).pow(2).sum(-1) \
            - ((time[:, :, None] - time[:, None, :]) * TIME_TO_LENGTH).pow(2)
        interval = torch.sign(ds2) * torch.sqrt(torch.abs(ds2))
        return self.proj(sinusoidal(1024 * interval.clip(-4, 4), self.head_size))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RelativeAttention(nn.Module):
    """Attention_rel: bias-free q/k/v; the pair tensor adds q.r to the logits and attn.r to the values."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.proj_q = nn.Linear(dim, dim, bias=False)
        self.proj_k = nn.Linear(dim, dim, bias=False)
        self.proj_v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_bias: Tensor, rel: Tensor | None) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = (proj(x).reshape(batch, length, self.num_heads, -1).permute(0, 2, 1, 3)
                   for proj in (self.proj_q, self.proj_k, self.proj_v))
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        if rel is not None:
            attn = attn + torch.einsum("bhic,bijc->bhij", q, rel)
        # Padded keys get -inf; padded queries see the real pulses (their rows are never read).
        attn = (attn + key_bias[:, None, None, :]).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2)
        if rel is not None:
            out = out + torch.einsum("bhij,bijc->bihc", attn, rel)
        return self.proj(out.reshape(batch, length, -1))


class RelativeBlock(nn.Module):
    """Block_rel (pre-norm, no layer scale) around RelativeAttention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = RelativeAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: Tensor, key_bias: Tensor, rel: Tensor | None) -> Tensor:
        x = x + self.attn(self.norm1(x), key_bias, rel)
        return x + self.mlp(self.norm2(x))


class ClsBlock(nn.Module):
    """The BEiT-v2 Block with layer scale (init_values=1) and torch's MultiheadAttention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.gamma_1 = nn.Parameter(torch.ones(dim))
        self.gamma_2 = nn.Parameter(torch.ones(dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: Tensor, key_bias: Tensor) -> Tensor:
        xn = self.norm1(x)
        x = x + self.gamma_1 * self.attn(xn, xn, xn, key_padding_mask=key_bias, need_weights=False)[0]
        return x + self.gamma_2 * self.mlp(self.norm2(x))


def key_bias_of(mask: Tensor) -> Tensor:
    """The authors' float key-padding mask: 0 for real pulses, -inf for padding."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, -torch.inf)


# ---- the V22/V23 local DynEdge encoder (DynEdgeFEXTRACTRO), on padded batches ----------------------
def knn_padded(coords: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch_cluster.knn_graph per event: the k nearest other real nodes (B, L, k') and their validity.

    Squared distances of explicit differences in float64 (a matrix-product cdist loses ~1e-4 of the
    neighbour margins at these scales); coordinates are at most 4-dimensional here."""
    length = coords.shape[1]
    c = coords.double()
    dist = (c[:, :, None, :] - c[:, None, :, :]).pow(2).sum(-1)
    eye = torch.eye(length, dtype=torch.bool, device=coords.device)
    dist = dist.masked_fill(~mask[:, None, :] | eye[None], torch.inf)
    values, index = dist.topk(min(k, max(length - 1, 0)), dim=-1, largest=False)
    return index, torch.isfinite(values) & mask[:, :, None]


def _neighbours(x: Tensor, index: Tensor) -> Tensor:
    """x (B, L, D), index (B, L, k) -> (B, L, k, D)."""
    batch, length, dim = x.shape
    flat = index + (torch.arange(batch, device=x.device) * length)[:, None, None]
    return x.reshape(batch * length, dim)[flat]


def graph_globals(x: Tensor, mask: Tensor, index: Tensor, valid: Tensor, n_pulses: Tensor) -> Tensor:
    """GraphNeT's global variables: feature means, edge homophily of x, y, z, t, log10(n_pulses)."""
    weights = mask.to(x.dtype)[..., None]
    means = (x * weights).sum(1) / weights.sum(1)
    same = (_neighbours(x[..., :4], index) == x[:, :, None, :4]) & valid[..., None]
    homophily = same.to(x.dtype).sum(dim=(1, 2)) / valid.sum(dim=(1, 2)).clamp_min(1)[:, None].to(x.dtype)
    return torch.cat([means, homophily, torch.log10(n_pulses.float())[:, None].to(x.dtype)], dim=1)


class EdgeConvLayer(nn.Module):
    """DynEdgeConv: EdgeConv, the sum of nn([x_i, x_j - x_i]) over the neighbours j of node i."""

    def __init__(self, n_in: int, sizes: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip((n_in,) + tuple(sizes[:-1]), sizes)):
            layers += [nn.Linear(2 * a if i == 0 else a, b), nn.LayerNorm(b), nn.GELU()]
        self.nn = nn.Sequential(*layers)

    def forward(self, x: Tensor, index: Tensor, valid: Tensor) -> Tensor:
        # W [x_i, x_j - x_i] = (W_a - W_b) x_i + W_b x_j: the first layer runs once per node instead of
        # once per edge (k = 8 times less work; the same maths up to float rounding).
        first, width = self.nn[0], x.shape[-1]
        w_centre, w_diff = first.weight[:, :width], first.weight[:, width:]
        node = F.linear(x, w_centre - w_diff, first.bias)
        hidden = node[:, :, None, :] + _neighbours(F.linear(x, w_diff), index)
        messages = self.nn[1:](hidden)
        return (messages * valid[..., None].to(messages.dtype)).sum(2)


def _mlp_ln(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.LayerNorm(b), nn.GELU()]
    return nn.Sequential(*layers)


class LocalDynEdge(nn.Module):
    """DynEdgeFEXTRACTRO(9, post_processing_layer_sizes=[336, out_dim]): node features, no pooling.
    The dynamic kNN after each convolution uses the first 3 latent dimensions (GraphNeT's default
    ``features_subset``). ``_readout`` is in the authors' state dict but never used in the forward."""

    def __init__(self, out_dim: int, k: int = GRAPH_K):
        super().__init__()
        self.k = k
        n_in = N_GRAPH_INPUTS + N_GRAPH_GLOBALS
        self._conv_layers = nn.ModuleList()
        width = n_in
        for sizes in GRAPH_CONV_SIZES:
            self._conv_layers.append(EdgeConvLayer(width, sizes))
            width = sizes[-1]
        self._post_processing = _mlp_ln([n_in + sum(s[-1] for s in GRAPH_CONV_SIZES), 336, out_dim])
        self._readout = _mlp_ln([out_dim, 128])

    def forward(self, x: Tensor, mask: Tensor, index: Tensor, valid: Tensor, n_pulses: Tensor) -> Tensor:
        globals_ = graph_globals(x, mask, index, valid, n_pulses)
        h = torch.cat([x, globals_[:, None, :].expand(-1, x.shape[1], -1)], dim=-1)
        skips = [h]
        for i, conv in enumerate(self._conv_layers):
            h = conv(h, index, valid)
            skips.append(h)
            if i + 1 < len(self._conv_layers):
                index, valid = knn_padded(h[..., :3], mask, self.k)
        return self._post_processing(torch.cat(skips, dim=-1)) * mask[..., None].to(h.dtype)


# ---- the two member networks -----------------------------------------------------------------------
class _Trunk(nn.Module):
    """What DeepIceModel and V22/V23 share: 4 relative-bias blocks (the first ``n_rel`` carry the
    bias), a cls token (a bias-free Linear's weight), ``depth`` BEiT blocks and the output Linear."""

    def _build_trunk(self, dim: int, depth: int, head_size: int, depth_rel: int) -> None:
        self.rel_pos = RelativeSpaceTime(head_size)
        self.sandwich = nn.ModuleList([RelativeBlock(dim, dim // head_size) for _ in range(depth_rel)])
        self.cls_token = nn.Linear(dim, 1, bias=False)
        self.blocks = nn.ModuleList([ClsBlock(dim, dim // head_size) for _ in range(depth)])
        self.proj_out = nn.Linear(dim, 3)

    def _trunk(self, x: Tensor, batch: dict[str, Tensor], n_rel: int) -> Tensor:
        mask = batch["mask"]
        rel = self.rel_pos(batch["pos"], batch["time"])
        key_bias = key_bias_of(mask)
        for i, block in enumerate(self.sandwich):
            x = block(x, key_bias, rel if i < n_rel else None)
        cls = self.cls_token.weight.unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], 1)
        key_bias = key_bias_of(torch.cat([torch.ones_like(mask[:, :1]), mask], 1))
        for block in self.blocks:
            x = block(x, key_bias)
        return self.proj_out(x[:, 0])


class DeepIceNet(_Trunk):
    """DeepIceModel(dim, dim_base, depth, head_size, depth_rel, n_rel): (B, 3) in the authors' axes."""

    def __init__(self, dim: int, dim_base: int, depth: int, head_size: int, depth_rel: int = 4, n_rel: int = 1):
        super().__init__()
        self.n_rel = n_rel
        self.extractor = Extractor(dim_base, dim)
        self._build_trunk(dim, depth, head_size, depth_rel)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self._trunk(self.extractor(batch), batch, self.n_rel)


class DynEdgeIceNet(_Trunk):
    """EncoderWithDirectionReconstructionV22 (kNN on xyz, bias in the first block) or V23 (kNN on
    xyzt, bias in all 4): the scaled extractor and the local DynEdge, each dim/2 wide, concatenated."""

    def __init__(self, variant: str, dim: int, dim_base: int, depth: int, head_size: int):
        super().__init__()
        self.knn_dims, self.n_rel = {"V22": (3, 1), "V23": (4, 4)}[variant]
        self.extractor = Extractor(dim_base, dim // 2, scaled=True)
        self._build_trunk(dim, depth, head_size, 4)
        self.local_root = LocalDynEdge(dim // 2)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        mask, pos = batch["mask"], batch["pos"]
        dtype = pos.dtype
        graph = torch.cat([pos, batch["time"][..., None], batch["auxiliary"][..., None].to(dtype),
                           batch["qe"][..., None].to(dtype), batch["charge"][..., None],
                           batch["ice_properties"].to(dtype)], dim=-1)
        index, valid = knn_padded(graph[..., :self.knn_dims], mask, GRAPH_K)
        local = self.local_root(graph, mask, index, valid, batch["L0"])
        return self._trunk(torch.cat([self.extractor(batch), local], 2), batch, self.n_rel)
