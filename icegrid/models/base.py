"""The contract every direction model follows: ``predict`` for inference and a list of training
stages (gradient stages optimise some parameters with a loss; fit stages set non-gradient parts,
such as ensemble weights or a gradient-boosting selector, from held-out predictions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

Batch = dict[str, Tensor]


@dataclass
class Stage:
    """One step of a model's training recipe."""

    name: str
    kind: str                                        # "gradient" or "fit"
    loss: Callable[[Batch, int], Tensor] | None = None
    parameters: Callable[[], list[nn.Parameter]] | None = None
    fit: Callable[[Callable[[], Iterable[Batch]]], dict] | None = None
    epochs: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    # Only events with at most this many pulses are used (1st place trains on short events only).
    max_event_pulses: int | None = None
    # What validation scores after each epoch of this stage (default: the whole model's predict).
    predict: Callable[[Batch], tuple[Tensor, Tensor]] | None = None
    grad_clip: float = 1.0
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MemoryCost:
    """Peak bytes of one forward pass per event of a batch padded to L slots:
    ``per_event + per_token * L + per_pair * L**2`` (L² only where a pair matrix is materialised)."""

    per_event: float = 0.0
    per_token: float = 0.0
    per_pair: float = 0.0

    def batch_bytes(self, n_events, longest):
        """Bytes of batches of ``n_events`` padded to ``longest`` (scalars or numpy arrays)."""
        return n_events * (self.per_event + self.per_token * longest + self.per_pair * longest * longest)


class DirectionModel(nn.Module):
    """Base class: subclasses build their layers from a preset dict."""

    name = "base"

    def __init__(self, preset: dict):
        super().__init__()
        self.preset = dict(preset)

    def predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(direction (B, 3) vectors of any length, kappa (B,)) for a padded batch."""
        raise NotImplementedError

    def stages(self, training: dict) -> list[Stage]:
        raise NotImplementedError

    def extra_state_for_checkpoint(self) -> dict:
        """Non-tensor state (for example a fitted scikit-learn selector), as tensors/primitives."""
        return {}

    def load_extra_state(self, extra: dict) -> None:
        pass

    def load_aux(self, aux: dict) -> None:
        """Side-file data an imported checkpoint carries (the 3rd place's angle bins, for example)."""

    def memory_cost(self) -> MemoryCost | None:
        """This model's forward-pass memory per event (see :class:`MemoryCost`); None (the default):
        inference measures it on probe batches (``icegrid.models.memory``)."""
        return None

    def raw_outputs(self, batch: Batch) -> dict[str, Tensor]:
        """The authors' raw outputs, named as in the goldens' columns (published presets only)."""
        raise NotImplementedError(f"{self.name}: no authors' raw outputs")


def unit_and_kappa(vector: Tensor) -> tuple[Tensor, Tensor]:
    """vMF convention: a predicted vector's length is kappa."""
    kappa = vector.norm(dim=-1)
    return vector, kappa


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def trainable(*modules: nn.Module) -> Callable[[], list[nn.Parameter]]:
    return lambda: [p for m in modules for p in m.parameters()]


def no_grad_predict(model: DirectionModel, batches: Iterable[Batch]) -> Iterable[tuple[Batch, Tensor, Tensor]]:
    with torch.no_grad():
        for batch in batches:
            direction, kappa = model.predict(batch)
            yield batch, direction, kappa
