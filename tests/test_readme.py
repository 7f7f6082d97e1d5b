"""The README's claims that code can check: the models table is exactly what `icegrid models` builds."""

from __future__ import annotations

from pathlib import Path

from icegrid.models import catalog

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_models_table() -> list[tuple[str, ...]]:
    text = README.read_text()
    block = text.split("<!-- models-table -->", 1)[1].split("<!-- /models-table -->", 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    return [tuple(cell.strip().strip("`") for cell in row.strip("|").split("|")) for row in rows]


def test_readme_models_table_is_every_preset_with_its_exact_parameter_count():
    built = []
    for row in catalog.preset_rows():
        limit, rule = ("all", "none") if row.infer_limit is None else (str(row.infer_limit), row.truncation)
        built.append((row.model, row.preset, row.origin, f"{row.n_parameters:,}", limit, rule))
    assert _readme_models_table() == built



def test_models_command_lists_presets_and_shipped_trained_and_imported_checkpoints(tmp_path):
    import subprocess
    import sys

    from golden_support import family_dir
    from icegrid.models.importer import import_weights

    import_weights("dynedge", [family_dir("dynedge_graphnet_v1") / "full" / "weights.pth"], tmp_path / "kaggle.pt")
    icegrid = str(Path(sys.executable).with_name("icegrid"))
    run = subprocess.run([icegrid, "models", "--model", "baseline", "--checkpoints", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert any(line.split()[:4] == ["dynedge", "kaggle_baseline", "authors", "1,348,627"] for line in lines)
    assert any("dynedge-small.pt  dynedge / small  shipped  validation" in line for line in lines)
    assert any("kaggle.pt  dynedge / kaggle_baseline  imported  from weights.pth" in line for line in lines)
    assert not any(line.startswith("icemix") for line in lines)


def _readme_block(marker: str) -> str:
    """The fenced code block right after ``<!-- marker -->``."""
    block = README.read_text().split(f"<!-- {marker} -->", 1)[1]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_xarray_recipe_reads_exactly_what_icegrid_reads(small_dataset, tmp_path, monkeypatch):
    """The store section's xarray recipe, run as written on a store of 64-event chunks (padded)."""
    import numpy as np

    from icegrid.linefit import linefit_directions
    from icegrid.preprocess import discover_batches, find_geometry, preprocess_shard
    from icegrid.store import PULSE_COLUMNS, EventStore

    monkeypatch.chdir(tmp_path)
    store = EventStore.create(Path("demo/events.zarr"), find_geometry(small_dataset), chunk_events=64)
    preprocess_shard(discover_batches(small_dataset)[0], store.path)
    shard = "train_batch_000001"
    data = store.read_shard(shard)
    azimuth, zenith = linefit_directions(data, store.geometry())
    store.write_predictions(shard, "linefit", azimuth, zenith, kappa=np.ones(azimuth.shape, np.float32))
    assert int(store.shard_attrs(shard)["chunk_pulses"]) < data.offset[-1]          # several chunks

    names: dict = {}
    exec(compile(_readme_block("xarray-recipe"), "README.md (xarray recipe)", "exec"), names)
    i, offset = names["i"], data.offset
    assert names["pulses"].sizes["pulse"] > offset[-1]                               # padding is visible
    for column in PULSE_COLUMNS:
        assert np.array_equal(names["event"][column].values, data.pulses[column][offset[i]:offset[i + 1]])
        assert np.array_equal(names["real"][column].values, data.pulses[column])
    assert names["table"]["event_id"].tolist() == data.event_id.tolist()
    assert np.array_equal(names["linefit"]["azimuth"].values, azimuth)
    sensors = data.pulses["sensor_id"][offset[i]:offset[i + 1]]
    assert np.array_equal(names["xyz"]["z"].values, store.geometry().z[sensors])
