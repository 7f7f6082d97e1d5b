"""GraphNeT v1.0 DynEdge (the Kaggle baseline), authors-exact, against ../shared/goldens/dynedge_graphnet_v1:
parameter counts and keys per manifest (meta device), features and input graphs from icegrid's own
pipeline, raw outputs and stored angles after `import_weights`, and one-line errors on bad weight files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from golden_support import align, expected, family_dir, features, golden_store_shard, manifest, meta_state_dict
from icegrid.inference import infer_shard
from icegrid.models import catalog, registry
from icegrid.models.features import bucket_batches, collate, select_pulses
from icegrid.models.importer import import_weights
from icegrid.models.published import dynedge as family
from icegrid.models.published import dynedge_layers as layers
from icegrid.store import EventStore

FAMILY = "dynedge_graphnet_v1"


def source() -> dict:
    return json.loads((family_dir(FAMILY) / "source.json").read_text())


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """(store path, shard, ShardData, Geometry, event_id) of the golden events, via icegrid's preprocessing."""
    return golden_store_shard(FAMILY, tmp_path_factory.mktemp("dynedge_golden"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The goldens' full (shapes identify the preset) and small (--kwargs) weights, imported."""
    folder = tmp_path_factory.mktemp("dynedge_ckpt")
    kwargs = {"full": None, "small": source()["configs"]["small"]["kwargs"]}
    return {cfg: (import_weights("dynedge", [family_dir(FAMILY) / cfg / "weights.pth"], folder / f"{cfg}.pt",
                                 kwargs=kw), folder / f"{cfg}.pt") for cfg, kw in kwargs.items()}


def test_every_manifest_is_a_preset_to_the_parameter():
    manifests = sorted(family_dir(FAMILY).glob("manifest_*.json"))
    assert [m.name for m in manifests] == ["manifest_kaggle_baseline.json"]
    for path in manifests:
        shapes, n_parameters = manifest(path)
        preset = path.stem.removeprefix("manifest_")
        with torch.device("meta"):
            loaded = registry.build("dynedge", preset)
        assert sum(p.numel() for p in loaded.model.parameters()) == n_parameters == 1_348_627
        assert {k: tuple(v.shape) for k, v in loaded.model.state_dict().items()} == shapes
        meta_state = meta_state_dict(shapes)
        converted = family.convert_state_dict(meta_state, path, kwargs=None)
        assert converted.preset == preset and converted.preset_config == family.PRESETS[preset]
        result = loaded.model.load_state_dict(converted.state_dict, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        assert loaded.infer_limit is None and loaded.transform.name == "dynedge_graphnet"
    rows = {r.preset: r for r in catalog.preset_rows(["dynedge"])}
    assert rows["kaggle_baseline"].n_parameters == 1_348_627 and rows["kaggle_baseline"].origin == "authors"


@pytest.mark.parametrize("config", ["small", "full"])
def test_goldens_configs_by_kwargs(config):
    """The goldens' --kwargs resolve to the manifests' shapes; the full ones are the Kaggle baseline."""
    shapes, n_parameters = manifest(family_dir(FAMILY) / config / "manifest.json")
    name, preset_config = family.preset_for(source()["configs"][config]["kwargs"])
    assert name == {"small": "custom", "full": "kaggle_baseline"}[config]
    assert family.preset_shapes(preset_config) == shapes
    with torch.device("meta"):
        model = family.build(preset_config)
    assert sum(p.numel() for p in model.parameters()) == n_parameters == source()["configs"][config]["n_parameters"]


def test_features_graph_and_globals_match_goldens(golden):
    _, _, data, geometry, event_id = golden
    gold = features(FAMILY)
    position = align(event_id, gold["event_id"])
    transform = registry.build("dynedge", "kaggle_baseline").transform
    selection = select_pulses(data.offset, data.pulses["time"], data.pulses["auxiliary"], None, "first_in_time")
    shard_features = transform(data, selection, geometry)
    batch = collate(shard_features, position)                 # golden event order
    mask = batch["mask"]
    np.testing.assert_allclose(batch["x"][mask].numpy(), gold["x"], rtol=1e-6, atol=0)
    np.testing.assert_array_equal(batch["length"].numpy(), gold["n_pulses"])
    index, valid = layers.knn_exact(batch["xyz"], mask, 8)
    start = torch.from_numpy(gold["offsets"][:-1])[:, None, None]
    node = torch.arange(mask.shape[1])[None, :, None].expand_as(index)
    pairs = torch.stack([(node + start)[valid], (index + start)[valid]], dim=1).numpy()   # (target, source)
    golden_pairs = np.stack([gold["edge_dst"], gold["edge_src"]], axis=1).astype(np.int64)
    assert pairs.shape == golden_pairs.shape
    np.testing.assert_array_equal(np.unique(pairs, axis=0), np.unique(golden_pairs, axis=0))
    globals_ = layers.graphnet_global_variables(batch["x"], mask, index, valid, batch["length"])
    np.testing.assert_allclose(globals_.numpy(), gold["global_variables"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("config", ["small", "full"])
def test_imported_weights_reproduce_graphnet(golden, checkpoints, config):
    store_path, shard, data, geometry, event_id = golden
    summary, path = checkpoints[config]
    assert summary["preset"] == {"small": "custom", "full": "kaggle_baseline"}[config]
    assert summary["n_parameters"] == source()["configs"][config]["n_parameters"]
    loaded = registry.load_checkpoint(path, "dynedge")
    assert loaded.provenance["sources"][0]["sha256"] == source()["files_sha256"][f"{config}/weights.pth"]["sha256"]
    selection = select_pulses(data.offset, data.pulses["time"], data.pulses["auxiliary"], None, "first_in_time")
    shard_features = loaded.transform(data, selection, geometry)
    outputs: dict[str, np.ndarray] = {}
    with torch.no_grad():      # inference's own bucketing: padded batches of mixed lengths
        for events in bucket_batches(selection.lengths, 256, max_tokens=16384, max_pairs=1 << 21):
            for name, value in loaded.model.raw_outputs(collate(shard_features, events)).items():
                outputs.setdefault(name, np.zeros(data.n_events, np.float32))[events] = value.numpy()
    gold = expected(FAMILY, f"{config}/expected.parquet")
    position = align(event_id, gold["event_id"])
    for name in ("raw_x", "raw_y", "raw_z", "dir_x", "dir_y", "dir_z", "kappa"):
        np.testing.assert_allclose(outputs[name][position], gold[name], rtol=1e-5, atol=1e-5, err_msg=name)
    if config == "full":        # its stored angles: tests/test_import_cli.py, through `icegrid infer`
        return
    infer_shard(store_path, shard, "dynedge", checkpoint=path, overwrite=True)
    stored = EventStore(store_path).read_predictions(shard, "dynedge")
    assert stored["attrs"]["infer_limit"] is None
    np.testing.assert_allclose(stored["azimuth"][position], gold["azimuth"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(stored["zenith"][position], gold["zenith"], atol=1e-5, rtol=0)


def test_batching_padding_and_tiny_events_do_not_change_an_event(monkeypatch):
    """Per-event outputs do not depend on the batch (padding, other events); events with at most k
    pulses get every other pulse as neighbours (torch_cluster); chunked kNN equals one-shot kNN."""
    torch.manual_seed(0)
    model = family.build(family.preset_for(source()["configs"]["small"]["kwargs"])[1]).eval()
    lengths = [1, 3, 9, 40]
    batch = {"x": torch.randn(4, 40, 6), "xyz": torch.randn(4, 40, 3) * 100,
             "mask": torch.arange(40)[None, :] < torch.tensor(lengths)[:, None], "length": torch.tensor(lengths)}
    index, valid = layers.knn_exact(batch["xyz"], batch["mask"], 8)
    assert valid.sum((1, 2)).tolist() == [0, 3 * 2, 9 * 8, 40 * 8]
    dist = torch.cdist(batch["xyz"][3, :40].double(), batch["xyz"][3, :40].double()).fill_diagonal_(float("inf"))
    assert torch.equal(index[3].sort(-1).values, dist.topk(8, largest=False).indices.sort(-1).values)
    monkeypatch.setattr(layers, "KNN_CHUNK_ELEMENTS", 200)
    chunked = layers.knn_exact(batch["xyz"], batch["mask"], 8)
    assert torch.equal(chunked[0], index) and torch.equal(chunked[1], valid)
    with torch.no_grad():
        together = model.raw_outputs(batch)["raw_x"]
        alone = [model.raw_outputs({k: v[i:i + 1] if k == "length" else v[i:i + 1, :lengths[i]]
                                    for k, v in batch.items()})["raw_x"] for i in range(4)]
    assert torch.isfinite(together).all()
    torch.testing.assert_close(torch.cat(alone), together, rtol=1e-5, atol=1e-6)


def test_authors_preset_is_not_trained_by_icegrid():
    with pytest.raises(NotImplementedError, match="import-weights"):
        registry.build("dynedge", "kaggle_baseline").model.stages({})


def _bad_files(tmp_path):
    full = family_dir(FAMILY) / "full" / "weights.pth"
    state = torch.load(full, weights_only=True)
    renamed = dict(state)
    renamed["_gnn._readout.0.weight_renamed"] = renamed.pop("_gnn._readout.0.weight")
    reshaped = dict(state, **{"_gnn._post_processing.2.bias": torch.zeros(255)})
    torch.save(renamed, tmp_path / "renamed.pth")
    torch.save(reshaped, tmp_path / "reshaped.pth")
    (tmp_path / "truncated.pth").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return {"truncated": (tmp_path / "truncated.pth", "not a readable torch file"),
            "other_family": (family_dir("icemix_2nd") / "deepice_small" / "weights.pth", "not a GraphNeT DynEdge"),
            "renamed": (tmp_path / "renamed.pth", "missing key '_gnn._readout.0.weight'"),
            "reshaped": (tmp_path / "reshaped.pth", "key '_gnn._post_processing.2.bias' has shape (255,)"),
            "small_without_kwargs": (family_dir(FAMILY) / "small" / "weights.pth",
                                     "key '_gnn._conv_layers.0.nn.0.weight' has shape (48, 34)")}


def test_bad_weight_files_fail_in_one_line_and_write_nothing(tmp_path):
    for case, (path, message) in _bad_files(tmp_path).items():
        out = tmp_path / f"{case}.pt"
        with pytest.raises(ValueError) as err:
            import_weights("dynedge", [path], out)
        text = str(err.value)
        assert "\n" not in text and "\r" not in text, case
        assert str(path) in text and message in text, (case, text)
        assert not out.exists() and not list(tmp_path.glob(f".{case}.pt*")), case


def test_bad_kwargs_aux_and_sources_fail_in_one_line(tmp_path):
    full, small = (family_dir(FAMILY) / c / "weights.pth" for c in ("full", "small"))
    small_kwargs = source()["configs"]["small"]["kwargs"]
    cases = {
        "full with the small kwargs": ([full], small_kwargs, [], "has shape (128, 34), dynedge preset 'custom'"),
        "unknown argument": ([full], {"nb_neighbors": 8}, [], "--kwargs: unknown argument 'nb_neighbors'"),
        "no pooling": ([small], {**small_kwargs, "global_pooling_schemes": None}, [], "global_pooling_schemes missing"),
        "two files": ([full, small], None, [], "--from: dynedge takes one"),
        "an aux file": ([full], None, [family_dir("ice") / "ice_transparency.txt"], "dynedge needs no side files"),
    }
    for case, (sources, kwargs, aux, message) in cases.items():
        out = tmp_path / "out.pt"
        with pytest.raises(ValueError) as err:
            import_weights("dynedge", sources, out, kwargs=kwargs, aux=aux)
        assert "\n" not in str(err.value) and message in str(err.value), (case, str(err.value))
        assert not out.exists(), case
