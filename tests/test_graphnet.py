"""GraphNeT input: SQLite and parquet datasets in graphnet's schema give the store the Kaggle layout gives.

The datasets are written here from simulated Kaggle-layout events the way graphnet's ``SQLiteWriter``
(truth: ``event_no INTEGER PRIMARY KEY``, every other column FLOAT; pulse map: ``event_no NOT NULL``
with an index) and ``ParquetWriter.merge_files`` (``<table>/<table>_<N>.parquet``, event_no the pandas
index, events shuffled) write them, with the columns of ``I3FeatureExtractorIceCube86`` and
``I3TruthExtractor``.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from icegrid.geometry import icecube86
from icegrid.cli import main
from icegrid.graphnet import list_sources, preprocess_graphnet, preprocess_graphnet_shard
from icegrid.inference import infer_shard
from icegrid.kaggle import InputError, read_batch
from icegrid.preprocess import discover_batches, find_geometry, preprocess_shard
from icegrid.simulate import write_dataset
from icegrid.store import EventStore

PULSEMAP = "SRTInIcePulses"
EVENTS = 150


def _graphnet_frames(batch, geometry, rng, shift=0.0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One Kaggle batch as graphnet's truth and pulse-map tables (events in Kaggle order)."""
    track = batch.shape == 1
    # Cascades: nu_e / nu_tau CC and every flavour's NC; tracks: nu_mu (or anti) CC.
    cascade_kind = rng.integers(0, 5, batch.n_events)
    pid = np.where(track, rng.choice([14, -14], batch.n_events), np.array([12, 12, 14, 16, -16])[cascade_kind])
    interaction = np.where(track, 1, np.array([1, 2, 2, 1, 2])[cascade_kind])
    truth = pd.DataFrame({"event_no": batch.event_id, "energy": batch.energy,
                          "position_x": rng.normal(0, 200, batch.n_events),
                          "azimuth": batch.azimuth, "zenith": batch.zenith, "pid": pid.astype(float),
                          "interaction_type": interaction.astype(float), "elasticity": rng.random(batch.n_events)})
    sensor = batch.sensor_id.astype(np.int64)
    pulses = pd.DataFrame({
        "charge": batch.charge, "dom_time": batch.time.astype(np.float64), "width": 8.0,
        "dom_x": geometry.x[sensor] + shift, "dom_y": geometry.y[sensor], "dom_z": geometry.z[sensor],
        "pmt_area": 0.0444, "rde": 1.0, "hlc": (~batch.auxiliary).astype(float),
        "string": (geometry.string_of(sensor)).astype(float), "dom_number": geometry.dom_of(sensor).astype(float),
        "event_no": np.repeat(batch.event_id, batch.n_pulses)})
    return truth, pulses


def write_sqlite(path: Path, frames: list[tuple[pd.DataFrame, pd.DataFrame]]) -> None:
    """SQLiteWriter's schema: FLOAT columns, the truth's event_no its integer primary key, an index on the map's."""
    truth = pd.concat([t for t, _ in frames])
    pulses = pd.concat([p for _, p in frames])
    with sqlite3.connect(path) as conn:
        for table, frame, key in (("truth", truth, "INTEGER PRIMARY KEY NOT NULL"), (PULSEMAP, pulses, "NOT NULL")):
            columns = ", ".join(f"{c} {key if c == 'event_no' else 'FLOAT'}" for c in frame.columns)
            conn.execute(f"CREATE TABLE {table} ({columns})")
            conn.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * frame.shape[1])})",
                             frame.astype(object).itertuples(index=False))
        conn.execute(f"CREATE INDEX event_no_{PULSEMAP} ON {PULSEMAP} (event_no)")


def write_parquet(root: Path, frames, batch_ids, rng) -> None:
    """ParquetWriter.merge_files' layout: a folder per table, one file per batch, events shuffled."""
    for table in ("truth", PULSEMAP):
        (root / table).mkdir(parents=True, exist_ok=True)
    for (truth, pulses), batch_id in zip(frames, batch_ids):
        order = rng.permutation(truth.shape[0])
        truth.iloc[order].set_index("event_no").to_parquet(root / "truth" / f"truth_{batch_id}.parquet")
        indexed = pulses.set_index("event_no")
        indexed.loc[truth["event_no"].to_numpy()[order]].to_parquet(root / PULSEMAP / f"{PULSEMAP}_{batch_id}.parquet")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The same simulated events in the Kaggle layout, as a GraphNeT SQLite file and as a parquet dataset."""
    root = tmp_path_factory.mktemp("graphnet")
    kaggle = root / "kaggle"
    write_dataset(kaggle, batches=2, events_per_batch=EVENTS, seed=11)
    geometry = icecube86()
    rng = np.random.default_rng(5)
    batches = [read_batch(path) for path in discover_batches(kaggle)]
    frames = [_graphnet_frames(b, geometry, rng) for b in batches]
    write_sqlite(root / "sim.db", frames)
    write_parquet(root / "sim_parquet", frames, [b.batch_id for b in batches], rng)
    return {"root": root, "kaggle": kaggle, "db": root / "sim.db", "parquet": root / "sim_parquet", "frames": frames,
            "batches": batches}


@pytest.fixture(scope="module")
def kaggle_store(datasets, tmp_path_factory):
    """The Kaggle-layout events preprocessed and predicted: what the GraphNeT inputs must give."""
    path = tmp_path_factory.mktemp("kaggle_store") / "kaggle.zarr"
    EventStore.create(path, find_geometry(datasets["kaggle"]))
    for batch in discover_batches(datasets["kaggle"]):
        preprocess_shard(batch, path)
    store = EventStore(path)
    _predict(store)
    return store


def _cli_preprocess(source, store, *extra):
    return subprocess.run([sys.executable, "-m", "icegrid", "preprocess", "--input", str(source), "--store", str(store),
                           "--format", "graphnet", "--pulsemap", PULSEMAP, "--workers", "1", "--no-progress", *extra],
                          capture_output=True, text=True, timeout=300)


def _predict(store):
    for shard in store.shards():
        for model in ("linefit", "dynedge"):
            infer_shard(store.path, shard, model)


def _assert_same_store(kaggle: EventStore, other: EventStore, names: list[str]):
    np.testing.assert_array_equal(other.geometry().xyz, kaggle.geometry().xyz)   # matched: Kaggle numbering
    assert other.shards() == names
    for kaggle_shard, other_shard in zip(kaggle.shards(), names):
        a, b = kaggle.read_shard(kaggle_shard), other.read_shard(other_shard)
        np.testing.assert_array_equal(a.event_id, b.event_id)
        np.testing.assert_array_equal(a.offset, b.offset)
        for column in ("sensor_id", "time", "charge", "auxiliary"):
            assert a.pulses[column].dtype == b.pulses[column].dtype, column
            np.testing.assert_array_equal(a.pulses[column], b.pulses[column], err_msg=column)
        assert sorted(a.truth) == sorted(b.truth) == ["azimuth", "energy", "shape", "zenith"]
        for column in a.truth:
            np.testing.assert_array_equal(a.truth[column], b.truth[column], err_msg=column)
        assert other.shard_attrs(other_shard)["input_format"] == "graphnet"
        for model in ("linefit", "dynedge"):
            pa, pb = kaggle.read_predictions(kaggle_shard, model), other.read_predictions(other_shard, model)
            for key in ("azimuth", "zenith"):
                np.testing.assert_array_equal(pa[key], pb[key], err_msg=f"{model} {key}")


def test_sqlite_through_the_cli_gives_the_kaggle_store(datasets, kaggle_store, tmp_path):
    done = _cli_preprocess(datasets["db"], tmp_path / "graphnet.zarr", "--events-per-shard", str(EVENTS))
    assert done.returncode == 0, done.stderr
    assert "2 shard(s) written" in done.stdout
    store = EventStore(tmp_path / "graphnet.zarr")
    _predict(store)
    _assert_same_store(kaggle_store, store, [f"sim_{PULSEMAP}_batch_{k:06d}" for k in (0, 1)])
    assert preprocess_graphnet(datasets["db"], store.path, PULSEMAP, EVENTS)[0]["skipped"]    # a rerun skips it


def test_parquet_dataset_gives_the_kaggle_store(datasets, kaggle_store, tmp_path):
    done = preprocess_graphnet(datasets["parquet"], tmp_path / "graphnet.zarr", PULSEMAP)
    assert [d["n_events"] for d in done] == [EVENTS, EVENTS] and not any(d["skipped"] for d in done)
    store = EventStore(tmp_path / "graphnet.zarr")
    _predict(store)
    _assert_same_store(kaggle_store, store, [f"sim_parquet_{PULSEMAP}_batch_{k:06d}" for k in (1, 2)])


def test_positions_off_the_reference_get_a_geometry_of_their_own(datasets, tmp_path):
    """Shifted DOMs match no Kaggle sensor: the store's geometry is built from them, pulses point at them."""
    rng = np.random.default_rng(1)
    batch = datasets["batches"][0]
    truth, pulses = _graphnet_frames(batch, icecube86(), rng, shift=1000.0)
    # DOM order inside each event (graphnet's pulse series): pulses come back in time order.
    pulses = pulses.sort_values(["event_no", "string", "dom_number"], kind="stable")
    write_sqlite(tmp_path / "shifted.db", [(truth, pulses)])
    preprocess_graphnet(tmp_path / "shifted.db", tmp_path / "s.zarr", PULSEMAP)
    store = EventStore(tmp_path / "s.zarr")
    geometry = store.geometry()
    assert geometry.n_sensors == np.unique(pulses[["dom_x", "dom_y", "dom_z"]].to_numpy(), axis=0).shape[0]
    (name,) = store.shards()
    shard = store.read_shard(name)
    n = np.diff(shard.offset)
    np.testing.assert_array_equal(n, batch.n_pulses)
    event = np.repeat(np.arange(n.size), n)
    assert (np.diff(shard.pulses["time"])[np.diff(event) == 0] >= 0).all()     # time order within each event
    # Every pulse, as a multiset per event: its position through the new geometry, its time and charge.
    sensor = shard.pulses["sensor_id"]
    got = np.column_stack([event, geometry.x[sensor], geometry.y[sensor], geometry.z[sensor], shard.pulses["time"],
                           shard.pulses["charge"]])
    want = np.column_stack([np.searchsorted(shard.event_id, pulses["event_no"].to_numpy()),
                            *(np.round(pulses[c].to_numpy(), 3) for c in ("dom_x", "dom_y", "dom_z")),
                            pulses["dom_time"].to_numpy(), pulses["charge"].to_numpy()])
    np.testing.assert_array_equal(got[np.lexsort(got.T[::-1])], want[np.lexsort(want.T[::-1])])


# ---- one-line errors --------------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path):
    return EventStore.create(tmp_path / "e.zarr", icecube86())


def _expect(run, pattern, file_name, store=None):
    with pytest.raises(InputError) as info:
        run()
    message = str(info.value)
    patterns = (pattern,) if isinstance(pattern, str) else pattern
    assert "\n" not in message and file_name in message and all(p in message for p in patterns), message
    if store is not None:
        assert store.shards() == []


def _db(tmp_path, datasets, change):
    truth, pulses = (f.copy() for f in datasets["frames"][0])
    truth, pulses = change(truth, pulses)
    path = tmp_path / "bad.db"
    write_sqlite(path, [(truth, pulses)])
    return path


def _shard(path, store):
    (source,) = list_sources(path, PULSEMAP)
    return preprocess_graphnet_shard(source, store.path)


def test_missing_pulse_map_table(tmp_path, datasets):
    path = tmp_path / "one.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE truth (event_no INTEGER PRIMARY KEY NOT NULL, energy FLOAT)")
    _expect(lambda: list_sources(path, PULSEMAP), f"no table '{PULSEMAP}' (tables: truth)", "one.db")


def test_missing_column(tmp_path, datasets, store):
    path = _db(tmp_path, datasets, lambda t, p: (t, p.drop(columns=["charge"])))
    _expect(lambda: _shard(path, store), f"table '{PULSEMAP}' has no column 'charge'", "bad.db", store)


def test_non_numeric_value(tmp_path, datasets, store):
    def change(truth, pulses):
        pulses = pulses.astype({"dom_time": object})
        pulses.iloc[7, pulses.columns.get_loc("dom_time")] = "late"
        return truth, pulses
    path = _db(tmp_path, datasets, change)
    _expect(lambda: _shard(path, store), f"table '{PULSEMAP}' column 'dom_time' has non-numeric values", "bad.db",
            store)


def test_pulses_of_an_event_without_truth(tmp_path, datasets, store):
    path = _db(tmp_path, datasets, lambda t, p: (t.drop(index=t.index[3]), p))
    missing = int(datasets["frames"][0][0]["event_no"].iloc[3])
    _expect(lambda: _shard(path, store), f"event_no {missing} has pulses but no row in 'truth'", "bad.db", store)


def test_position_off_the_stores_geometry(tmp_path, datasets, store):
    def change(truth, pulses):
        pulses.loc[pulses.index[0], "dom_x"] += 3.0
        return truth, pulses
    path = _db(tmp_path, datasets, change)
    _expect(lambda: _shard(path, store), "is no sensor of the store's geometry", "bad.db", store)


def test_not_a_database(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    _expect(lambda: list_sources(path, PULSEMAP), "not a readable SQLite database", "junk.db")


def test_parquet_mistyped_and_missing(tmp_path, datasets, store):
    rng = np.random.default_rng(0)
    root = tmp_path / "pq"
    truth, pulses = datasets["frames"][0]
    write_parquet(root, [(truth, pulses.astype({"dom_time": str}))], [3], rng)
    (source,) = list_sources(root, PULSEMAP)
    _expect(lambda: preprocess_graphnet_shard(source, store.path),
            ("column 'dom_time' has type ", "string, expected float"),
            f"{PULSEMAP}_3.parquet", store)
    (root / "truth" / "truth_3.parquet").unlink()
    _expect(lambda: list_sources(root, PULSEMAP), "no truth file for it", f"{PULSEMAP}_3.parquet")
    _expect(lambda: list_sources(tmp_path, "InIcePulses"), "neither a GraphNeT parquet dataset", str(tmp_path))


def test_cli_error_is_one_line(tmp_path, datasets):
    done = CliRunner().invoke(main, ["preprocess", "--input", str(datasets["db"]), "--store", str(tmp_path / "x.zarr"),
                                     "--format", "graphnet", "--pulsemap", "NoSuchPulses"])
    assert done.exit_code == 2 and not (tmp_path / "x.zarr").exists()
    tables = f"(tables: {PULSEMAP}, truth)"
    assert done.stderr.strip() == f"icegrid: error: {datasets['db']}: no table 'NoSuchPulses' {tables}"


def test_campaign_spec_needs_a_pulsemap():
    from icegrid.config import ConfigError
    from icegrid.grid.spec import spec_from_flags

    with pytest.raises(ConfigError, match="input_format graphnet needs a pulsemap"):
        spec_from_flags({"inputs": ["sim.db"], "store": "s.zarr", "input_format": "graphnet"})
    spec = spec_from_flags({"inputs": ["sim.db"], "store": "s.zarr", "input_format": "graphnet", "pulsemap": PULSEMAP})
    assert (spec.input_format, spec.pulsemap, spec.events_per_shard) == ("graphnet", PULSEMAP, 200_000)


def test_unique_positions_agree_with_numpy():
    from icegrid.geometry import unique_positions

    rng = np.random.default_rng(3)
    doms = rng.normal(0, 300, (500, 3))
    xyz = doms[rng.integers(0, 500, 20_000)]
    unique, inverse = unique_positions(xyz)
    want, want_inverse = np.unique(xyz, axis=0, return_inverse=True)
    np.testing.assert_array_equal(unique, want)
    np.testing.assert_array_equal(inverse, want_inverse.reshape(-1))
