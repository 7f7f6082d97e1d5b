"""The 3rd place's networks as the author wrote them (dipamc/kaggle-icecube-neutrinos@b118d6c,
``inference/inference.py`` and ``stack_model_training/model.py``), and their decoding of classes to angles.

Module and parameter names follow the author's, so a Lightning state dict with ``model.`` stripped
loads key for key:

- the classifier: ``inp`` (9 -> d, with bias), ``encoder.attn.N`` nanoGPT pre-norm blocks (LayerNorm and
  Linear without biases unless ``bias``, tanh-GELU, no final norm), a masked mean pool, two separate
  necks ``neck_az``/``neck_zn`` (LayerNorm, d -> 4d -> F, plus the pool repeated F/d times) and the
  heads ``azimuth`` (bins) / ``zenith`` (bins + 14 padding bins);
- the regression ("stack") model: ``neck.mlp`` (Linear, LayerNorm, tanh-GELU twice) then ``xyz``, fed
  ``concat(pool, azimuth logits, zenith logits)``.

icegrid's own 3rd-place variant (``icegrid.models.gpt_boost``) differs (aux embedding, final norm,
one shared neck), so nothing here is shared with it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

N_FEATURES = 9
ZENITH_PADDING = 7          # (smoothing kernel 15 - 1) / 2 padding bins on each side of the zenith head
TOPK_ZENITH = 3


def _check_config(config: dict) -> None:
    n_embd, n_heads = list(config["n_embd"]), list(config["n_heads"])
    if not n_embd or len(n_embd) != len(n_heads):
        raise ValueError(f"n_embd ({len(n_embd)} layers) and n_heads ({len(n_heads)}) must be equal, non-empty lists")
    if len(set(n_embd)) != 1:
        # The author's blocks add the residual x + attn(x): a width change cannot run (his assert lets it build).
        raise ValueError(f"n_embd must be one width for every layer (got {sorted(set(n_embd))})")
    if any(e % h for e, h in zip(n_embd, n_heads)):
        raise ValueError(f"every n_embd must be divisible by its n_heads (got {n_embd} / {n_heads})")
    if int(config["neck_features"]) % n_embd[-1]:
        raise ValueError(f"neck_features {config['neck_features']} must be a multiple of n_embd {n_embd[-1]}")


class SelfAttention(nn.Module):
    def __init__(self, prev_embd: int, n_embd: int, n_heads: int, bias: bool):
        super().__init__()
        self.n_embd, self.n_heads = n_embd, n_heads
        self.c_attn = nn.Linear(prev_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        batch, length, _ = x.shape
        head = self.n_embd // self.n_heads
        q, k, v = (t.view(batch, length, self.n_heads, head).transpose(1, 2)
                   for t in self.c_attn(x).split(self.n_embd, dim=2))
        # The author's (B, 1, T, T) mask also lets padded queries see padded keys; valid rows see
        # exactly the valid keys either way, and padded rows are never pooled.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.c_proj(y.transpose(1, 2).contiguous().view(batch, length, self.n_embd))


class AttentionBlock(nn.Module):
    def __init__(self, prev_embd: int, n_embd: int, n_heads: int, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(prev_embd, bias=bias)
        self.attn = SelfAttention(prev_embd, n_embd, n_heads, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd, bias=bias), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * n_embd, n_embd, bias=bias))

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), key_mask)
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, n_embd: list[int], n_heads: list[int], bias: bool):
        super().__init__()
        widths = [n_embd[0], *n_embd]
        self.attn = nn.ModuleList([AttentionBlock(widths[i], widths[i + 1], n_heads[i], bias)
                                   for i in range(len(n_embd))])

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        for block in self.attn:
            x = block(x, key_mask)
        return x


class Neck(nn.Module):
    """LayerNorm, d -> 4d -> F MLP, plus the input tiled F/d times (the author's skip)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        hidden = 4 * in_features
        self.mlp = nn.Sequential(nn.LayerNorm(in_features, bias=bias), nn.Linear(in_features, hidden, bias=bias),
                                 nn.GELU(approximate="tanh"), nn.Linear(hidden, out_features, bias=bias))
        self.n_repeats = out_features // in_features

    def forward(self, x: Tensor) -> Tensor:
        return x.repeat(1, self.n_repeats) + self.mlp(x)


class Classifier(nn.Module):
    """inference.py's MultiLabelClassifier: (x (B, T, 9), length (B,)) -> (az logits, zn logits, pool)."""

    def __init__(self, config: dict):
        super().__init__()
        _check_config(config)
        n_embd, bias = [int(e) for e in config["n_embd"]], bool(config.get("bias", False))
        self.inp = nn.Linear(N_FEATURES, n_embd[0])
        self.encoder = Encoder(n_embd, [int(h) for h in config["n_heads"]], bias)
        self.neck_az = Neck(n_embd[-1], int(config["neck_features"]), bias)
        self.neck_zn = Neck(n_embd[-1], int(config["neck_features"]), bias)
        n_bins = int(config.get("num_classes", 128))
        self.azimuth = nn.Linear(int(config["neck_features"]), n_bins)
        self.zenith = nn.Linear(int(config["neck_features"]), n_bins + 2 * ZENITH_PADDING)

    @property
    def pool_features(self) -> int:
        return self.neck_az.mlp[0].normalized_shape[0]

    def forward(self, x: Tensor, mask: Tensor, length: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.encoder(self.inp(x), mask[:, None, None, :])
        pool = (out * mask.unsqueeze(2)).sum(dim=1) / length.to(out.dtype).view(-1, 1)
        return self.azimuth(self.neck_az(pool)), self.zenith(self.neck_zn(pool)), pool


class StackRegression(nn.Module):
    """stack_model_training's MultiLabelClassifier: concat(pool, az logits, zn logits) -> xyz (its norm is kappa)."""

    def __init__(self, config: dict):
        super().__init__()
        n_in, middle, out = int(config["n_embd"]), int(config["middle_features"]), int(config["neck_features"])
        bias = bool(config.get("bias", True))
        # Identity where the author has Dropout, so the parameter indices (0, 1, 4, 5) stay his.
        self.neck = nn.Module()
        self.neck.mlp = nn.Sequential(nn.Linear(n_in, middle, bias=bias), nn.LayerNorm(middle),
                                      nn.GELU(approximate="tanh"), nn.Identity(), nn.Linear(middle, out, bias=bias),
                                      nn.LayerNorm(out), nn.GELU(approximate="tanh"), nn.Identity())
        self.xyz = nn.Linear(out, 3)

    @property
    def in_features(self) -> int:
        return self.neck.mlp[0].in_features

    def forward(self, x: Tensor) -> Tensor:
        return self.xyz(self.neck.mlp(x))


# ---- decoding (inference.py discrete_to_angle / topksum, stack loss_metrics.xyz_to_angle) ----------------
def padded_zenith_centres(centres: np.ndarray) -> np.ndarray:
    """The zenith centres padded by 7 on each side: -z reflected below 0, 2 pi - z above pi (float64)."""
    c = np.asarray(centres, dtype=np.float64)
    pad = ZENITH_PADDING
    return np.concatenate([-c[pad - 1::-1], c, 2 * np.pi - c[:-pad - 1:-1]])


def circular_mean_azimuth(az_logits: Tensor, centres: Tensor) -> Tensor:
    """Circular mean of softmax(azimuth logits) over the bin centres, as arccos(x / r) * sign(y) mod 2 pi
    (the author's formula, computed in the dtype of ``centres``)."""
    p = torch.softmax(az_logits.to(centres.dtype), dim=1)
    mx, my = p @ torch.cos(centres), p @ torch.sin(centres)
    return torch.remainder(torch.arccos(mx / torch.sqrt(mx ** 2 + my ** 2)) * torch.sign(my), 2 * math.pi)


def topk_zenith(zn_logits: Tensor, centres: Tensor, k: int = TOPK_ZENITH) -> Tensor:
    """softmax of the top-k zenith logits times their padded centres (can leave [0, pi])."""
    top, index = torch.topk(zn_logits, k=k, dim=1)
    return torch.sum(torch.softmax(top.to(centres.dtype), dim=1) * centres[index], dim=1)


def xyz_to_angle(xyz: Tensor) -> tuple[Tensor, Tensor]:
    azimuth = torch.remainder(torch.arccos(xyz[:, 0] / torch.norm(xyz[:, :2], dim=1)) * torch.sign(xyz[:, 1]),
                              2 * math.pi)
    return azimuth, torch.arccos(xyz[:, 2] / torch.norm(xyz, dim=1))
