"""The synthetic detector: Kaggle layout, determinism, physics features and the HLC flag."""

import hashlib

import numpy as np
import pyarrow.parquet as pq
import pytest

from icegrid.kaggle import PULSE_SCHEMA
from icegrid.simulate import hlc_flags, sample_energy, simulate_batch, write_dataset


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    write_dataset(tmp_path / "a", batches=2, events_per_batch=300, seed=11)
    write_dataset(tmp_path / "b", batches=2, events_per_batch=300, seed=11)
    write_dataset(tmp_path / "c", batches=2, events_per_batch=300, seed=12)
    first, second, other = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert set(first) == {"sensor_geometry.csv", "train_meta.parquet", "train/batch_1.parquet",
                          "train/batch_2.parquet"}
    assert first == second
    assert first["train/batch_1.parquet"] != other["train/batch_1.parquet"]


def test_files_have_the_kaggle_schema(small_dataset):
    pulses = pq.read_table(small_dataset / "train" / "batch_1.parquet")
    assert pulses.schema.remove_metadata() == PULSE_SCHEMA
    meta = pq.read_table(small_dataset / "train_meta.parquet")
    assert meta.column_names == ["batch_id", "event_id", "first_pulse_index", "last_pulse_index",
                                 "azimuth", "zenith", "energy", "shape"]
    assert set(meta["shape"].to_pylist()) == {"track", "cascade"}
    batch1 = meta.filter(meta["batch_id"].to_numpy() == 1)
    assert batch1["last_pulse_index"].to_numpy()[-1] == pulses.num_rows - 1
    # Pulses are ordered by event then time, as in the Kaggle files.
    event = pulses["event_id"].to_numpy()
    time = pulses["time"].to_numpy()
    assert np.all(np.diff(event) >= 0)
    same_event = np.diff(event) == 0
    assert np.all(np.diff(time)[same_event] >= 0)


def test_energy_spectrum_matches_kaggle_ranges():
    energy = sample_energy(np.random.default_rng(0), 400_000)
    assert energy.min() >= 100 and energy.max() <= 1e8
    # E^-1.5 below 1 PeV: the fraction per decade falls by sqrt(10) each decade.
    counts = np.histogram(np.log10(energy), bins=[2, 3, 4, 5, 6])[0]
    assert np.allclose(counts[:-1] / counts[1:], np.sqrt(10), rtol=0.05)
    # E^-1 above: flat in log energy, 2.3% of all events.
    high = np.histogram(np.log10(energy[energy > 1e6]), bins=[6, 7, 8])[0]
    assert abs(high[0] / high[1] - 1) < 0.1
    assert 0.018 < (energy > 1e6).mean() < 0.028


def test_event_population_looks_like_kaggle():
    batch = simulate_batch(5, 6000, seed=3)
    n = batch.n_pulses
    assert batch.n_events == 6000
    assert 35 <= np.median(n) <= 100
    assert n.max() > 2000                       # long tail into the thousands at high energy
    assert 0.27 < batch.shape.mean() < 0.40     # about a third tracks
    assert np.median(n[batch.energy > 1e5]) > 5 * np.median(n[batch.energy < 1e3])
    assert np.all(np.diff(batch.event_id) > 0)
    assert batch.time.min() >= 0 and batch.charge.min() > 0
    # Charges come in 0.025 PE steps.
    assert np.allclose(np.round(batch.charge / 0.025) * 0.025, batch.charge)


def test_auxiliary_flag_is_the_hlc_complement():
    batch = simulate_batch(2, 200, seed=5)
    event = np.repeat(np.arange(batch.n_events), batch.n_pulses)
    # Brute force HLC over each event (slow, test only).
    expected = np.zeros(event.shape[0], dtype=bool)
    for e in range(batch.n_events):
        idx = np.flatnonzero(event == e)
        s = batch.sensor_id[idx].astype(int)
        t = batch.time[idx]
        same_string = (s[:, None] // 60) == (s[None, :] // 60)
        neighbour = np.abs(s[:, None] - s[None, :]) == 1
        close = np.abs(t[:, None] - t[None, :]) <= 1000
        expected[idx] = (same_string & neighbour & close).any(axis=1)
    assert np.array_equal(~batch.auxiliary, expected)
    assert 0.05 < batch.auxiliary.mean() < 0.95
    # Each kept event passed the trigger (at least 4 HLC pulses).
    assert np.bincount(event, weights=~batch.auxiliary).min() >= 4


def test_hlc_flags_ignore_other_strings_and_far_times():
    event = np.array([0, 0, 0, 0, 1])
    sensor = np.array([59, 60, 100, 101, 100])
    time = np.array([0, 10, 5000, 7000, 5000])
    # 59/60 are neighbours in number but on different strings; 100/101 are 2 us apart; event 1 is alone.
    assert not hlc_flags(event, sensor, time, 5160).any()
    time[3] = 5900
    assert hlc_flags(event, sensor, time, 5160).tolist() == [False, False, True, True, False]


def test_simulate_rejects_zero_events():
    with pytest.raises(ValueError):
        simulate_batch(1, 0, seed=0)
