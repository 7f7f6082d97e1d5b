"""Layers and losses shared by the models: the 3D von Mises-Fisher loss, opening angles, kNN on
padded batches, EdgeConv, Fourier encoding, masked pooling and transformer blocks (with optional
relative attention bias).

Batches are padded: node tensors are (B, L, D) with a (B, L) boolean ``mask`` (True = real pulse).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_4PI = math.log(4.0 * math.pi)
INF_BITS = int(torch.tensor(float("inf")).view(torch.int32))


# ---- losses and angles --------------------------------------------------------------------------
def log_c3(kappa: Tensor) -> Tensor:
    """log of the 3D vMF normaliser C3(k) = k / (4 pi sinh k), stable for small and large k."""
    kappa = kappa.clamp_min(1e-6)
    # log(k / sinh k) = log(2k) - k - log(1 - exp(-2k)); expm1 keeps it exact as k -> 0.
    return torch.log(2.0 * kappa) - kappa - torch.log(-torch.expm1(-2.0 * kappa)) - LOG_4PI


def cos_angle(direction: Tensor, target: Tensor) -> Tensor:
    unit = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return (unit * target).sum(-1).clamp(-1.0 + 1e-7, 1.0 - 1e-7)


def opening_angle(direction: Tensor, target: Tensor) -> Tensor:
    """Angle (rad) between predicted vectors (any length) and unit target vectors."""
    return torch.acos(cos_angle(direction, target))


def vmf_loss(direction: Tensor, kappa: Tensor, target: Tensor) -> Tensor:
    """Negative log-likelihood of the 3D vMF (paper eq. 2), mean over the batch."""
    kappa = kappa.float()
    return (-kappa * cos_angle(direction.float(), target) - log_c3(kappa)).mean()


def angle_vmf_loss(direction: Tensor, kappa: Tensor, target: Tensor, vmf_weight: float = 1.0) -> Tensor:
    """Opening angle plus a weighted vMF term: 1st place eq. 7 (weight 1; the paper prints -theta,
    a sign slip: minimising -theta would maximise the angle) and 2nd place eq. 8 (weight 0.05)."""
    return opening_angle(direction.float(), target).mean() + vmf_weight * vmf_loss(direction, kappa, target)


def opening_angle_np(az_a: np.ndarray, zen_a: np.ndarray, az_b: np.ndarray, zen_b: np.ndarray) -> np.ndarray:
    """Opening angle (rad) between two sets of (azimuth, zenith), the Kaggle metric per event."""
    cos = (np.sin(zen_a) * np.sin(zen_b) * np.cos(az_a - az_b) + np.cos(zen_a) * np.cos(zen_b))
    return np.arccos(np.clip(cos, -1.0, 1.0))


# ---- graph operations on padded batches -----------------------------------------------------------
def knn(coords: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Indices (B, L, k) of each node's k nearest other real nodes and their validity (B, L, k).

    An event's graph is the one it has alone in an unpadded batch, whatever its padding and batch
    mates: distances are explicit differences (``cdist``'s default takes a matrix-product shortcut
    above 25 rows, |a|^2 + |b|^2 - 2ab, whose rounding moves pulses on one DOM off distance 0 and
    depends on the padded length), and ties go to the lower pulse index (``topk`` on float values
    breaks them differently for different row lengths), by ranking unique (distance bits, index) keys.
    Events with fewer than k + 1 pulses get invalid slots (pointing at the node itself)."""
    batch, length, _ = coords.shape
    k_eff = min(k, max(length - 1, 1))
    blocked = ~mask[:, None, :] | torch.eye(length, dtype=torch.bool, device=coords.device)[None]
    with torch.no_grad():       # indices only: no graph through the distances (training)
        c = coords.detach().float()
        dist = torch.cdist(c, c, compute_mode="donot_use_mm_for_euclid_dist").masked_fill_(blocked, float("inf"))
        # Non-negative float32 bits order as the floats do; the low 32 bits make every key unique.
        key = (dist.view(torch.int32).to(torch.int64) << 32) | torch.arange(length, device=coords.device)
        del dist
        key, index = key.topk(k_eff, dim=-1, largest=False)
    valid = ((key >> 32) != INF_BITS) & mask[:, :, None]
    self_index = torch.arange(length, device=coords.device)[None, :, None].expand_as(index)
    index = torch.where(valid, index, self_index)
    if k_eff < k:   # tiny sequences: pad the neighbour list with invalid self slots
        pad = k - k_eff
        index = torch.cat([index, self_index[..., :1].expand(-1, -1, pad)], dim=-1)
        valid = torch.cat([valid, torch.zeros_like(valid[..., :1]).expand(-1, -1, pad)], dim=-1)
    return index, valid


def gather_neighbours(x: Tensor, index: Tensor) -> Tensor:
    """x (B, L, D), index (B, L, k) -> neighbour features (B, L, k, D)."""
    batch, length, dim = x.shape
    flat = index + (torch.arange(batch, device=x.device) * length)[:, None, None]
    return x.reshape(batch * length, dim)[flat]


def homophily(x: Tensor, index: Tensor, valid: Tensor, mask: Tensor) -> Tensor:
    """Node homophily ratio per feature: the fraction of edges whose two ends share the value
    (B, D); GraphNeT computes it for x, y, z, t."""
    same = (gather_neighbours(x, index) == x[:, :, None, :]) & valid[..., None]
    edges = valid.sum(dim=(1, 2)).clamp_min(1)[:, None]
    return same.float().sum(dim=(1, 2)) / edges


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    weights = mask.to(x.dtype)[..., None]
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    return x.masked_fill(~mask[..., None], float("-inf")).amax(1).nan_to_num(0.0, neginf=0.0)


def masked_min(x: Tensor, mask: Tensor) -> Tensor:
    return x.masked_fill(~mask[..., None], float("inf")).amin(1).nan_to_num(0.0, posinf=0.0)


def mlp(sizes: list[int], activation: type[nn.Module] = nn.LeakyReLU, last_activation: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if last_activation or i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class EdgeConv(nn.Module):
    """x'_i = AGG_j h(x_i, x_j - x_i [, x_j]) over the given neighbours (paper eqs. 1 and 6)."""

    def __init__(self, in_dim: int, sizes: list[int], aggregation: str = "sum", with_neighbour: bool = False,
                 activation: type[nn.Module] = nn.LeakyReLU):
        super().__init__()
        self.with_neighbour = with_neighbour
        self.aggregation = aggregation
        self.message = mlp([in_dim * (3 if with_neighbour else 2)] + list(sizes), activation)

    def forward(self, x: Tensor, index: Tensor, valid: Tensor) -> Tensor:
        neighbours = gather_neighbours(x, index)
        centre = x[:, :, None, :].expand_as(neighbours)
        parts = [centre, neighbours - centre] + ([neighbours] if self.with_neighbour else [])
        messages = self.message(torch.cat(parts, dim=-1))
        if self.aggregation == "max":
            messages = messages.masked_fill(~valid[..., None], float("-inf"))
            return messages.amax(2).nan_to_num(0.0, neginf=0.0)
        return (messages * valid[..., None].to(messages.dtype)).sum(2)


# ---- Fourier encoding and transformer blocks -----------------------------------------------------
class FourierEncoding(nn.Module):
    """sin/cos of the input at d/2 frequencies 10000^(-2j/d), j = 0..d/2-1 (highest frequency 1)."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.register_buffer("frequencies", torch.exp(-math.log(10000.0) * torch.arange(half) / half),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        phase = x[..., None].float() * self.frequencies
        return torch.cat([phase.sin(), phase.cos()], dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention with a key padding mask and an optional relative bias
    rel (B, L, L, head_dim) entering the logits as q_i . rel_ij (2nd place, after Shaw et al.)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor, rel: Tensor | None = None) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        key_mask = mask[:, None, None, :]
        if rel is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        else:
            scale = self.head_dim ** -0.5
            logits = (q @ k.transpose(-1, -2)) * scale
            logits = logits + torch.einsum("bhic,bijc->bhij", q, rel.to(q.dtype)) * scale
            logits = logits.masked_fill(~key_mask, float("-inf"))
            y = logits.softmax(-1) @ v
        return self.out(y.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    """Pre-norm transformer block; ``layer_scale`` adds BEiT's learnable shortcut gains."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 4.0, layer_scale: float | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x: Tensor, mask: Tensor, rel: Tensor | None = None) -> Tensor:
        a = self.attn(self.norm1(x), mask, rel)
        x = x + (a * self.gamma1 if self.gamma1 is not None else a)
        m = self.mlp(self.norm2(x))
        return x + (m * self.gamma2 if self.gamma2 is not None else m)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
