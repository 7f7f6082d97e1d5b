"""icegrid's head selector on top of the 3rd place's imported heads (``icegrid train --model 3rd --stage
selector --checkpoint CKPT``). This part is icegrid's, not the author's: his selectors are scikit-learn
1.0.2 HistGradientBoosting objects, which no Python 3.11 environment can load.

Per event a HistGradientBoostingClassifier picks the classifier's or the stack model's direction, from
the same inputs as icegrid's own 3rd-place selector (``icegrid.models.gpt_boost``): the engineered event
features of paper Table 5, both heads' angles, log kappa, the softmax peaks and the heads' disagreement.
It is fitted on one half of the store's events (even positions) and scored on the other.
"""

from __future__ import annotations

import pickle
from typing import Callable, Iterable

import numpy as np
import torch

from icegrid.models.gpt_boost import _fit_hgb, _selector_features
from icegrid.models.layers import opening_angle_np


def heads(out: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The selector's view of the model's raw outputs (float64 numpy)."""
    def np64(t):
        return t.detach().double().cpu().numpy()
    return {"cls_azimuth": np64(out["azimuth_f64"]), "cls_zenith": np.clip(np64(out["zenith_raw_f64"]), 0.0, np.pi),
            "reg_azimuth": np64(out["reg_azimuth"]), "reg_zenith": np64(out["reg_zenith"]),
            "kappa": np64(out["reg_kappa"]),
            "p_azimuth": np64(torch.softmax(out["az_logit"].double(), 1).amax(1)),
            "p_zenith": np64(torch.softmax(out["zn_logit"].double(), 1).amax(1))}


def use_regression(selector, engineered: np.ndarray, h: dict[str, np.ndarray]) -> np.ndarray:
    if selector is None:
        return np.zeros(h["kappa"].shape[0], dtype=bool)
    return selector.predict(_selector_features(engineered, h)).astype(bool)


def fit(raw_outputs: Callable, batches: Callable[[], Iterable[dict]]) -> tuple[object | None, dict]:
    """(fitted selector or None when one head always wins, metrics on the held-out half)."""
    engineered, truth, parts = [], [], []
    with torch.no_grad():
        for batch in batches():
            engineered.append(batch["engineered"].double().cpu().numpy())
            truth.append(batch["target"].double().cpu().numpy())
            parts.append(heads(raw_outputs(batch)))
    if not parts:
        raise ValueError("selector: no events with truth to fit on")
    engineered, truth = np.concatenate(engineered), np.concatenate(truth)
    h = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    true_az = np.mod(np.arctan2(truth[:, 1], truth[:, 0]), 2 * np.pi)
    true_zen = np.arccos(np.clip(truth[:, 2], -1, 1))
    cls_err = opening_angle_np(h["cls_azimuth"], h["cls_zenith"], true_az, true_zen)
    reg_err = opening_angle_np(h["reg_azimuth"], h["reg_zenith"], true_az, true_zen)
    label = (reg_err < cls_err).astype(np.int64)
    fit_half = np.arange(label.shape[0]) % 2 == 0
    report = ~fit_half if (~fit_half).any() else fit_half
    selector = None
    if np.unique(label[fit_half]).shape[0] > 1:
        selector = _fit_hgb(_selector_features(engineered, h)[fit_half], label[fit_half], seed=0)
    chosen = np.where(use_regression(selector, engineered, h), reg_err, cls_err)
    return selector, {"selector_fit_events": int(fit_half.sum()), "selector_report_events": int(report.sum()),
                      "classifier": float(cls_err[report].mean()), "regression": float(reg_err[report].mean()),
                      "selected": float(chosen[report].mean())}


def to_blob(selector) -> torch.Tensor | None:
    return None if selector is None else torch.frombuffer(bytearray(pickle.dumps(selector)), dtype=torch.uint8)


def from_blob(blob: torch.Tensor | None):
    # A pickled scikit-learn object inside the checkpoint: load only checkpoints you trust.
    return None if blob is None else pickle.loads(blob.numpy().tobytes())
