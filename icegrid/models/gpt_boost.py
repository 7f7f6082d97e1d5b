"""3rd place (paper sec. 3.3): a GPT-style encoder over time-sorted pulses, classification heads
for azimuth and zenith, a vMF regression head, and gradient-boosted selectors.

Per copy: pre-norm transformer blocks (GELU MLP) over pulse embeddings, masked average pooling,
a classification neck + heads (128 azimuth bins; 128 zenith bins uniform in cos zenith plus 7
padding bins on each side for the Gaussian label smoothing: kernel 15, sigma 3, wrapping for
azimuth), then, with the backbone frozen, a regression neck + head on (pooled embedding, both
softmaxes) predicting a 3D vector whose length is kappa (vMF loss). A scikit-learn
HistGradientBoostingClassifier picks per event which head to trust from the engineered features of
Table 5 plus the heads' outputs (angles, kappa, softmax peaks, their disagreement). With several
copies a second HistGradientBoostingClassifier picks, per event, which copy's answer to use.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icegrid.models.base import Batch, DirectionModel, Stage, trainable
from icegrid.models.layers import Block, masked_mean, mlp, opening_angle_np, vmf_loss

N_INPUTS = 6
N_BINS = 128
ZENITH_PAD = 7
SMOOTH_LENGTH, SMOOTH_SIGMA = 15, 3.0

AZIMUTH_CENTRES = (np.arange(N_BINS) + 0.5) * 2 * np.pi / N_BINS
_COS_EDGES = np.linspace(1.0, -1.0, N_BINS + 1)
COS_ZENITH_CENTRES = 0.5 * (_COS_EDGES[:-1] + _COS_EDGES[1:])


def azimuth_bin(azimuth: Tensor) -> Tensor:
    return (torch.remainder(azimuth, 2 * math.pi) / (2 * math.pi) * N_BINS).long().clamp(0, N_BINS - 1)


def zenith_bin(zenith: Tensor) -> Tensor:
    return ((1.0 - torch.cos(zenith)) / 2.0 * N_BINS).long().clamp(0, N_BINS - 1)


def smoothed_targets(index: Tensor, n_classes: int, wrap: bool) -> Tensor:
    """One-hot targets convolved with a normalised Gaussian kernel (length 15, sigma 3)."""
    offsets = torch.arange(SMOOTH_LENGTH, device=index.device) - SMOOTH_LENGTH // 2
    kernel = torch.exp(-0.5 * (offsets.float() / SMOOTH_SIGMA) ** 2)
    kernel = kernel / kernel.sum()
    columns = index[:, None] + offsets[None, :]
    columns = torch.remainder(columns, n_classes) if wrap else columns.clamp(0, n_classes - 1)
    target = torch.zeros(index.shape[0], n_classes, device=index.device)
    return target.scatter_add_(1, columns, kernel.expand(index.shape[0], -1).contiguous())


def classifier_angles(az_logits: Tensor, zen_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Angles from the class probabilities: circular mean for azimuth, mean cos zenith (padding
    bins count as the boundary bins, i.e. predictions beyond the boundary are clipped)."""
    p_az = az_logits.float().softmax(-1)
    centres = torch.as_tensor(AZIMUTH_CENTRES, dtype=torch.float32, device=p_az.device)
    azimuth = torch.remainder(torch.atan2(p_az @ centres.sin(), p_az @ centres.cos()), 2 * math.pi)
    p_zen = zen_logits.float().softmax(-1)
    cos_centres = torch.as_tensor(COS_ZENITH_CENTRES, dtype=torch.float32, device=p_zen.device)
    padded = torch.cat([cos_centres[:1].expand(ZENITH_PAD), cos_centres, cos_centres[-1:].expand(ZENITH_PAD)])
    zenith = torch.acos((p_zen @ padded).clamp(-1.0, 1.0))
    return azimuth, zenith


def _angles_of(vector: Tensor) -> tuple[Tensor, Tensor]:
    unit = F.normalize(vector.float(), dim=-1, eps=1e-8)
    return torch.remainder(torch.atan2(unit[:, 1], unit[:, 0]), 2 * math.pi), torch.acos(unit[:, 2].clamp(-1, 1))


def _vector_of(azimuth: Tensor, zenith: Tensor) -> Tensor:
    return torch.stack([azimuth.cos() * zenith.sin(), azimuth.sin() * zenith.sin(), zenith.cos()], dim=-1)


class GPTCopy(nn.Module):
    """One full instance of the architecture (paper Fig. 6) without the selector."""

    def __init__(self, dim: int, n_heads: int, depth: int, neck_hidden: int, neck_out: int):
        super().__init__()
        self.embed = nn.Linear(N_INPUTS, dim)
        self.aux_embedding = nn.Embedding(2, dim)
        self.blocks = nn.ModuleList([Block(dim, n_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.cls_neck = mlp([dim, neck_hidden, neck_out], nn.GELU)
        self.azimuth_head = nn.Linear(neck_out, N_BINS)
        self.zenith_head = nn.Linear(neck_out, N_BINS + 2 * ZENITH_PAD)
        self.reg_neck = mlp([dim + N_BINS + N_BINS + 2 * ZENITH_PAD, neck_hidden, neck_out], nn.GELU)
        self.reg_head = nn.Linear(neck_out, 3)

    def backbone(self, batch: Batch) -> Tensor:
        mask = batch["mask"]
        h = self.embed(batch["x"]) + self.aux_embedding(batch["aux"])
        for block in self.blocks:
            h = block(h, mask)
        return masked_mean(self.norm(h), mask)

    def classify(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        neck = self.cls_neck(pooled)
        return self.azimuth_head(neck), self.zenith_head(neck)

    def regress(self, pooled: Tensor, az_logits: Tensor, zen_logits: Tensor) -> Tensor:
        features = torch.cat([pooled, az_logits.softmax(-1), zen_logits.softmax(-1)], dim=-1)
        return self.reg_head(self.reg_neck(features))

    def heads(self, batch: Batch) -> dict[str, Tensor]:
        pooled = self.backbone(batch)
        az_logits, zen_logits = self.classify(pooled)
        vector = self.regress(pooled, az_logits, zen_logits)
        cls_az, cls_zen = classifier_angles(az_logits, zen_logits)
        reg_az, reg_zen = _angles_of(vector)
        return {"cls_azimuth": cls_az, "cls_zenith": cls_zen, "reg_azimuth": reg_az, "reg_zenith": reg_zen,
                "kappa": vector.float().norm(dim=-1),
                "p_azimuth": az_logits.float().softmax(-1).amax(-1), "p_zenith": zen_logits.float().softmax(-1).amax(-1)}


def _selector_features(engineered: np.ndarray, heads: dict[str, np.ndarray]) -> np.ndarray:
    disagreement = opening_angle_np(heads["cls_azimuth"], heads["cls_zenith"], heads["reg_azimuth"], heads["reg_zenith"])
    columns = [heads[k] for k in ("cls_azimuth", "cls_zenith", "reg_azimuth", "reg_zenith", "p_azimuth", "p_zenith")]
    columns += [np.log(np.maximum(heads["kappa"], 1e-6)), disagreement]
    return np.concatenate([engineered, np.stack(columns, axis=1)], axis=1)


def _hgb(seed: int = 0):
    from sklearn.ensemble import HistGradientBoostingClassifier
    return HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1, random_state=seed)


class GPTBoost(DirectionModel):
    name = "gpt_boost"

    def __init__(self, preset: dict):
        super().__init__(preset)
        shared = {k: preset[k] for k in ("dim", "n_heads", "neck_hidden", "neck_out")}
        self.copies = nn.ModuleList([GPTCopy(depth=int(depth), **shared) for depth in preset["depths"]])
        self.head_selectors: list = [None] * len(self.copies)
        self.copy_selector = None

    # ---- inference ------------------------------------------------------------------------------
    def _copy_answer(self, i: int, heads: dict[str, Tensor], engineered: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        h = {k: v.detach().cpu().double().numpy() for k, v in heads.items()}
        selector = self.head_selectors[i]
        if selector is None:
            use_regression = np.ones(h["kappa"].shape[0], dtype=bool)
        else:
            use_regression = selector.predict(_selector_features(engineered, h)).astype(bool)
        azimuth = np.where(use_regression, h["reg_azimuth"], h["cls_azimuth"])
        zenith = np.where(use_regression, h["reg_zenith"], h["cls_zenith"])
        return azimuth, zenith, h

    def _copy_selector_features(self, engineered: np.ndarray, answers: list) -> np.ndarray:
        columns = [engineered]
        for azimuth, zenith, h in answers:
            columns.append(np.stack([azimuth, zenith, np.log(np.maximum(h["kappa"], 1e-6)),
                                     h["p_azimuth"], h["p_zenith"]], axis=1))
        for a in range(len(answers)):
            for b in range(a + 1, len(answers)):
                columns.append(opening_angle_np(answers[a][0], answers[a][1], answers[b][0], answers[b][1])[:, None])
        return np.concatenate(columns, axis=1)

    def predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        engineered = batch["engineered"].detach().cpu().double().numpy()
        answers = [self._copy_answer(i, copy.heads(batch), engineered) for i, copy in enumerate(self.copies)]
        if len(answers) == 1 or self.copy_selector is None:
            choice = np.zeros(engineered.shape[0], dtype=np.int64)
        else:
            choice = self.copy_selector.predict(self._copy_selector_features(engineered, answers)).astype(np.int64)
        rows = np.arange(engineered.shape[0])
        azimuth = np.stack([a[0] for a in answers])[choice, rows]
        zenith = np.stack([a[1] for a in answers])[choice, rows]
        kappa = np.stack([a[2]["kappa"] for a in answers])[choice, rows]
        device = batch["x"].device
        kappa_t = torch.as_tensor(kappa, dtype=torch.float32, device=device)
        vector = _vector_of(torch.as_tensor(azimuth, device=device), torch.as_tensor(zenith, device=device)).float()
        return vector * kappa_t[:, None], kappa_t

    # ---- training -------------------------------------------------------------------------------
    def stages(self, training: dict) -> list[Stage]:
        stages = []
        for i, copy in enumerate(self.copies):
            def cls_loss(batch: Batch, epoch: int, copy=copy) -> Tensor:
                az_logits, zen_logits = copy.classify(copy.backbone(batch))
                target = batch["target"]
                azimuth = torch.remainder(torch.atan2(target[:, 1], target[:, 0]), 2 * math.pi)
                zenith = torch.acos(target[:, 2].clamp(-1, 1))
                az_target = smoothed_targets(azimuth_bin(azimuth), N_BINS, wrap=True)
                zen_target = smoothed_targets(zenith_bin(zenith) + ZENITH_PAD, N_BINS + 2 * ZENITH_PAD, wrap=False)
                return (F.cross_entropy(az_logits.float(), az_target) + F.cross_entropy(zen_logits.float(), zen_target))

            def reg_loss(batch: Batch, epoch: int, copy=copy) -> Tensor:
                with torch.no_grad():       # stage 2: backbone and classifier frozen
                    pooled = copy.backbone(batch)
                    az_logits, zen_logits = copy.classify(pooled)
                vector = copy.regress(pooled, az_logits, zen_logits)
                return vmf_loss(vector, vector.norm(dim=-1), batch["target"])

            stages.append(Stage(f"copy{i + 1}_classifier", "gradient", loss=cls_loss,
                                parameters=trainable(copy.embed, copy.aux_embedding, copy.blocks, copy.norm,
                                                     copy.cls_neck, copy.azimuth_head, copy.zenith_head),
                                epochs=int(training["epochs"]), lr=float(training["lr"]),
                                weight_decay=float(training.get("weight_decay", 1e-5)), grad_clip=0.5,
                                predict=lambda batch, copy=copy: self._classifier_vector(copy, batch)))
            stages.append(Stage(f"copy{i + 1}_regressor", "gradient", loss=reg_loss,
                                parameters=trainable(copy.reg_neck, copy.reg_head),
                                epochs=int(training.get("regression_epochs", training["epochs"])),
                                lr=float(training["lr"]), grad_clip=0.5,
                                predict=lambda batch, copy=copy: self._regressor_vector(copy, batch)))
        stages.append(Stage("selectors", "fit", fit=self.fit_selectors))
        return stages

    @staticmethod
    def _classifier_vector(copy: GPTCopy, batch: Batch) -> tuple[Tensor, Tensor]:
        azimuth, zenith = classifier_angles(*copy.classify(copy.backbone(batch)))
        vector = _vector_of(azimuth, zenith)
        return vector, torch.ones_like(azimuth)

    @staticmethod
    def _regressor_vector(copy: GPTCopy, batch: Batch) -> tuple[Tensor, Tensor]:
        pooled = copy.backbone(batch)
        vector = copy.regress(pooled, *copy.classify(pooled))
        return vector, vector.norm(dim=-1)

    def fit_selectors(self, batches) -> dict:
        """Stage 3: label = which head (then which copy) landed closer to the truth."""
        engineered, truth, heads = [], [], [[] for _ in self.copies]
        with torch.no_grad():
            for batch in batches():
                engineered.append(batch["engineered"].double().numpy())
                truth.append(batch["target"].double().numpy())
                for i, copy in enumerate(self.copies):
                    heads[i].append({k: v.double().numpy() for k, v in copy.heads(batch).items()})
        if not engineered:
            return {}
        engineered, truth = np.concatenate(engineered), np.concatenate(truth)
        true_az = np.mod(np.arctan2(truth[:, 1], truth[:, 0]), 2 * np.pi)
        true_zen = np.arccos(np.clip(truth[:, 2], -1, 1))
        metrics, answers = {}, []
        for i in range(len(self.copies)):
            h = {k: np.concatenate([part[k] for part in heads[i]]) for k in heads[i][0]}
            cls_err = opening_angle_np(h["cls_azimuth"], h["cls_zenith"], true_az, true_zen)
            reg_err = opening_angle_np(h["reg_azimuth"], h["reg_zenith"], true_az, true_zen)
            label = (reg_err < cls_err).astype(np.int64)
            if np.unique(label).shape[0] > 1:
                selector = _hgb(i).fit(_selector_features(engineered, h), label)
                self.head_selectors[i] = selector
            answers.append(self._copy_answer(i, {k: torch.from_numpy(v) for k, v in h.items()}, engineered))
            chosen = opening_angle_np(answers[-1][0], answers[-1][1], true_az, true_zen)
            metrics[f"copy{i + 1}_angles"] = {"classifier": float(cls_err.mean()), "regressor": float(reg_err.mean()),
                                              "selected": float(chosen.mean())}
        if len(self.copies) > 1:
            errors = np.stack([opening_angle_np(a[0], a[1], true_az, true_zen) for a in answers], axis=1)
            label = errors.argmin(1)
            if np.unique(label).shape[0] > 1:
                self.copy_selector = _hgb(99).fit(self._copy_selector_features(engineered, answers), label)
        return metrics

    # ---- checkpoint state -----------------------------------------------------------------------
    def extra_state_for_checkpoint(self) -> dict:
        def blob(obj):
            return None if obj is None else torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        return {"head_selectors": [blob(s) for s in self.head_selectors], "copy_selector": blob(self.copy_selector)}

    def load_extra_state(self, extra: dict) -> None:
        # The selectors are scikit-learn objects stored as pickled bytes inside the checkpoint;
        # only load checkpoints you trust (as with any pickle).
        def unblob(tensor):
            return None if tensor is None else pickle.loads(tensor.numpy().tobytes())
        selectors = extra.get("head_selectors", [])
        self.head_selectors = [unblob(t) for t in selectors] + [None] * (len(self.copies) - len(selectors))
        self.copy_selector = unblob(extra.get("copy_selector"))
