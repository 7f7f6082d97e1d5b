"""Builders for the analysis tests: opening-angle samples with a known mode, and real event stores whose
predictions sit at chosen opening angles from the truth (no mocks: EventStore.create/write_shard/
write_predictions on tmp_path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from icegrid.geometry import icecube86
from icegrid.kaggle import KaggleBatch
from icegrid.store import EventStore, angles_from_direction, direction_from_angles


def rayleigh_with_background(rng: np.random.Generator, sigma_deg: float, n: int, background: float = 0.3,
                             repetitions: int | None = None) -> np.ndarray:
    """Opening angles (deg): Rayleigh(σ) — a 2-D Gaussian on the sphere — mixed with a fraction of events
    whose reconstructed direction is uniform on the sphere (opening angle density sin θ / 2)."""
    size = (n,) if repetitions is None else (repetitions, n)
    uniform = rng.random(size)
    rayleigh = np.degrees(np.radians(sigma_deg) * np.sqrt(-2.0 * np.log1p(-uniform)))
    isotropic = np.degrees(np.arccos(1.0 - 2.0 * rng.random(size)))
    return np.where(rng.random(size) < background, isotropic, np.minimum(rayleigh, 180.0))


def true_mode_deg(sigma_deg: float, background: float = 0.3) -> float:
    """Mode of the mixture density (the background's slope moves it slightly above σ for wide peaks)."""
    theta = np.linspace(sigma_deg * 0.5, sigma_deg * 1.5, 200_001)
    sigma, t = np.radians(sigma_deg), np.radians(theta)
    density = (1 - background) * t / sigma**2 * np.exp(-0.5 * (t / sigma) ** 2) + background * np.sin(t) / 2
    return float(theta[np.argmax(density)])


def random_directions(rng: np.random.Generator, n: int) -> np.ndarray:
    return direction_from_angles(rng.uniform(0, 2 * np.pi, n), np.arccos(rng.uniform(-1, 1, n)))


def rotate_away(truth: np.ndarray, angle_rad: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors at exactly ``angle_rad`` from each ``truth`` vector, at a random position angle."""
    helper = np.where(np.abs(truth[:, 2:3]) < 0.9, [[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]])
    e1 = np.cross(truth, helper)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(truth, e1)
    phi = rng.uniform(0, 2 * np.pi, truth.shape[0])[:, None]
    angle = np.asarray(angle_rad)[:, None]
    return np.cos(angle) * truth + np.sin(angle) * (np.cos(phi) * e1 + np.sin(phi) * e2)


def make_truth(rng: np.random.Generator, n: int, energy_range=(1e2, 1e8)) -> dict[str, np.ndarray]:
    direction = random_directions(rng, n)
    azimuth, zenith = angles_from_direction(direction)
    energy = 10 ** rng.uniform(np.log10(energy_range[0]), np.log10(energy_range[1]), n)
    return {"direction": direction, "azimuth": azimuth, "zenith": zenith, "energy": energy,
            "shape": rng.integers(0, 2, n).astype(np.int8)}


def write_store(path: Path, shards: list[dict], predictions: dict[str, list[np.ndarray | None]],
                with_energy: bool = True) -> Path:
    """A real store: one shard per truth dict (one pulse per event) and per-model predicted unit vectors
    (``None`` leaves that shard without the model's predictions)."""
    store = EventStore.create(path, icecube86())
    next_id = 0
    for index, truth in enumerate(shards):
        n = truth["azimuth"].shape[0]
        batch = KaggleBatch(batch_id=index + 1, source=f"batch_{index + 1}.parquet",
                            event_id=np.arange(next_id, next_id + n, dtype=np.int64),
                            n_pulses=np.ones(n, dtype=np.int64), sensor_id=np.zeros(n, dtype=np.int16),
                            time=np.full(n, 10_000, dtype=np.int64), charge=np.ones(n),
                            auxiliary=np.zeros(n, dtype=bool), azimuth=truth["azimuth"], zenith=truth["zenith"],
                            energy=truth["energy"] if with_energy else None, shape=truth["shape"])
        next_id += n
        name = f"batch_{index + 1}"
        store.write_shard(name, batch)
        for model, per_shard in predictions.items():
            vectors = per_shard[index]
            if vectors is None:
                continue
            azimuth, zenith = angles_from_direction(vectors)
            nan = ~np.isfinite(vectors).all(axis=1)
            store.write_predictions(name, model, np.where(nan, np.nan, azimuth), np.where(nan, np.nan, zenith))
    return path
