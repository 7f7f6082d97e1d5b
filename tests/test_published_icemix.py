"""2nd place (DrHB's DeepIceModel / V22 / V23), authors-exact, against ../shared/goldens/icemix_2nd: every
manifest is a preset to the parameter (meta device), the features from icegrid's own pipeline equal the
authors' dataset items, raw outputs and stored angles match after `import_weights` (n_rel 1 and 4, V22,
V23, the predict.py ensemble by --kwargs), and bad weight files get one-line errors and write nothing.

The forward tests run on an evenly spread subset of the 320 golden events (every 2nd for DeepIceModel,
every 10th or 16th where the DynEdge members are involved, ~0.05 s per event on one CPU core); the
`infer_shard` test runs all 320."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from golden_support import align, expected, family_dir, features, golden_store_shard, goldens_dir, manifest, meta_state_dict
from icegrid.cli import main
from icegrid.inference import infer_shard
from icegrid.kaggle import InputError
from icegrid.models import registry
from icegrid.models.features import bucket_batches, collate, select_pulses
from icegrid.models.importer import import_weights
from icegrid.models.published import icemix as family
from icegrid.models.published.icemix_features import authors_qe
from icegrid.models.registry import CheckpointError
from icegrid.store import EventStore, angles_from_direction

FAMILY = "icemix_2nd"
V22, V23 = family.V22, family.V23
MANIFEST_PRESET = {"paper_S_d32": "paper_s", "paper_T_d32": "paper_t", "member1": "b_d32", "member2": "b_d64",
                   "member3": "b_d32_4rel", "member4": "s_dynedge_v22", "member5": "b_dynedge_v23"}
OUTPUTS = ("out_0", "out_1", "out_2", "kappa")


def configs() -> dict:
    return json.loads((family_dir(FAMILY) / "source.json").read_text())["configs"]


def weights(config: str):
    return family_dir(FAMILY) / config / "weights.pth"


def ice_table():
    return goldens_dir() / "ice" / "ice_transparency.txt"


def small_kwargs() -> dict:
    """The goldens' configs as --kwargs (the authors' argument names), per forward variant."""
    deepice, graph = configs()["deepice_small"]["kwargs"], configs()["v22_v23_small"]["kwargs"]
    return {"n_rel_1": {**deepice, "n_rel": 1}, "n_rel_4": {**deepice, "n_rel": 4},
            "v22": {**graph, "class": V22}, "v23": {**graph, "class": V23}}


def ensemble_kwargs() -> dict:
    """ensemble_small: predict.py's weights of members 1, 3, 4 and 5 on the four small variants."""
    w = [family.PREDICT_MEMBERS[n][2] for n in ("b_d32", "b_d32_4rel", "s_dynedge_v22", "b_dynedge_v23")]
    return {"members": [{**kw, "weight": wi} for kw, wi in zip(small_kwargs().values(), w)]}


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """(store path, shard, ShardData, Geometry, event_id) of the golden events, via icegrid's preprocessing."""
    return golden_store_shard(FAMILY, tmp_path_factory.mktemp("icemix_golden"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("icemix_ckpt")
    sources = {"n_rel_1": [weights("deepice_small")], "n_rel_4": [weights("deepice_small")],
               "v22": [weights("v22_v23_small")], "v23": [weights("v22_v23_small")]}
    out = {}
    for name, kwargs in {**small_kwargs(), "ensemble": ensemble_kwargs()}.items():
        files = sources.get(name) or [f for key in ("n_rel_1", "n_rel_4", "v22", "v23") for f in sources[key]]
        summary = import_weights("2nd", files, folder / f"{name}.pt", kwargs=kwargs, aux=[ice_table()])
        out[name] = (summary, folder / f"{name}.pt")
    return out


def raw_outputs(loaded, golden, events: np.ndarray) -> dict[str, np.ndarray]:
    """The model's raw outputs on ``events`` (store order), in icegrid's length-bucketed batches."""
    _, _, data, geometry, _ = golden
    selection = select_pulses(data.offset, data.pulses["time"], data.pulses["auxiliary"], loaded.infer_limit,
                              loaded.truncation, seed=0)
    feats = loaded.transform(data, selection, geometry)
    out = {k: np.zeros(events.shape[0], np.float32) for k in OUTPUTS}
    direction = np.zeros((events.shape[0], 3))
    with torch.no_grad():
        for batch in bucket_batches(selection.lengths[events], 32, max_tokens=4096):
            tensors = collate(feats, events[batch])
            for key, value in loaded.model.raw_outputs(tensors).items():
                out[key][batch] = value.numpy()
            direction[batch] = loaded.model.predict(tensors)[0].double().numpy()
    out["azimuth"], out["zenith"] = angles_from_direction(direction)
    return out


def test_every_manifest_is_a_preset_to_the_parameter():
    manifests = sorted(family_dir(FAMILY).glob("manifest_*.json"))
    assert len(manifests) == 7
    for path in manifests:
        shapes, n_parameters = manifest(path)
        preset = next(p for tag, p in MANIFEST_PRESET.items() if tag in path.name)
        with torch.device("meta"):
            loaded = registry.build("icemix", preset)
        assert sum(p.numel() for p in loaded.model.parameters()) == n_parameters
        assert {k.removeprefix("members.0."): tuple(v.shape) for k, v in loaded.model.state_dict().items()} == shapes
        assert (loaded.infer_limit, loaded.truncation, loaded.transform.name) == (192, "random", "icemix_authors")
        aux = {"ice_transparency.txt": ice_table()}
        if preset == "b_d32" or preset == "b_d32_4rel":      # same shapes: n_rel tells them apart
            with pytest.raises(CheckpointError, match="fit presets b_d32 and b_d32_4rel.*n_rel"):
                family.convert_states([(path, meta_state_dict(shapes))], None, aux)
            kwargs = {k: v for k, v in json.loads(path.read_text())["kwargs"].items()}
            converted = family.convert_states([(path, meta_state_dict(shapes))], kwargs, aux)
        else:
            converted = family.convert_states([(path, meta_state_dict(shapes))], None, aux)
        assert converted.preset == preset and converted.preset_config == family.PRESETS[preset]
        result = loaded.model.load_state_dict(converted.state_dict, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        assert ("icemix_ice_transparency" in converted.aux) == (preset in ("s_dynedge_v22", "b_dynedge_v23"))


def test_the_five_predict_members_are_one_ensemble_checkpoint():
    ordered = [next(p for p in family_dir(FAMILY).glob(f"manifest_predict_member{i}_*.json")) for i in range(1, 6)]
    states = [(p, meta_state_dict(manifest(p)[0])) for p in ordered]
    converted = family.convert_states(states, None, {"ice_transparency.txt": ice_table()})
    assert converted.preset == "predict_ensemble"
    assert converted.preset_config["weights"] == [0.08254897, 0.15350807, 0.19367443, 0.23597202, 0.3342965]
    with torch.device("meta"):
        loaded = registry.build("icemix", "predict_ensemble")
    assert sum(p.numel() for p in loaded.model.parameters()) == sum(manifest(p)[1] for p in ordered)
    result = loaded.model.load_state_dict(converted.state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with pytest.raises(CheckpointError, match=r"member2_.*member 1, DeepIceModel.*head_size=32"):
        family.convert_states(states[1:2] + states[1:], None, {})     # member 2's file in member 1's place


def test_features_equal_the_authors_dataset_items(golden):
    _, _, data, geometry, event_id = golden
    loaded = registry.build("icemix", "s_dynedge_v22")
    loaded.transform.load_aux({"icemix_ice_transparency": family.read_ice_table(ice_table())})
    selection = select_pulses(data.offset, data.pulses["time"], data.pulses["auxiliary"], 192, "random", seed=0)
    ours = loaded.transform(data, selection, geometry)
    gold = features(FAMILY)
    position = align(event_id, gold["event_id"])
    assert np.array_equal(selection.lengths[position], np.diff(gold["offsets"]))
    rows = np.concatenate([np.arange(selection.offset[i], selection.offset[i + 1]) for i in position])
    for key in ("pos", "time", "charge", "auxiliary", "qe", "ice_properties"):
        assert ours.pulse[key].dtype == gold[key].dtype, key
        np.testing.assert_allclose(ours.pulse[key][rows], gold[key], rtol=1e-6, atol=0, err_msg=key)
    assert np.array_equal(data.pulses["sensor_id"][selection.index][rows], gold["sensor_id"])
    assert np.array_equal(ours.event["L0"][position], gold["L0"])
    # The .loc off-by-one: DOMs 11..59 of 1-based strings 79..86 and DOM 0 of strings 80..86 (0-based ids).
    qe = authors_qe(np.arange(5160))
    assert qe.sum() == 8 * 49 + 7 and qe[78 * 60 + 10] == 0 and qe[78 * 60 + 11] == 1 and qe[79 * 60] == 1
    assert qe[78 * 60] == 0 and qe[86 * 60 - 1] == 1


@pytest.mark.parametrize("name, relpath, every", [
    ("n_rel_1", "deepice_small/expected_n_rel_1.parquet", 2),
    ("n_rel_4", "deepice_small/expected_n_rel_4.parquet", 2),
    ("v22", "v22_v23_small/expected_v22.parquet", 10),
    ("v23", "v22_v23_small/expected_v23.parquet", 10),
    ("ensemble", "ensemble_small/expected.parquet", 16),
])
def test_raw_outputs_and_angles_match_the_authors(golden, checkpoints, name, relpath, every):
    torch.set_num_threads(1)
    summary, path = checkpoints[name]
    assert summary["preset"] == ("custom_ensemble" if name == "ensemble" else "custom")
    loaded = registry.load_checkpoint(path, "2nd")
    gold = expected(FAMILY, relpath)
    chosen = np.arange(0, gold["event_id"].shape[0], every)
    events = align(golden[4], gold["event_id"][chosen])
    ours = raw_outputs(loaded, golden, events)
    for key in OUTPUTS:
        np.testing.assert_allclose(ours[key], gold[key][chosen], rtol=1e-5, atol=1e-5, err_msg=key)
    # predict() is in the Kaggle convention: the same angles as the authors' swapped axes decode to
    np.testing.assert_allclose(ours["zenith"], gold["zenith_f64"][chosen], atol=1e-5)
    delta = np.angle(np.exp(1j * (ours["azimuth"] - gold["azimuth_f64"][chosen])))
    np.testing.assert_allclose(delta, 0.0, atol=1e-5)


def test_infer_shard_stores_the_authors_angles_in_the_kaggle_convention(golden, checkpoints):
    torch.set_num_threads(1)
    store_path, shard, _, _, event_id = golden
    summary = infer_shard(store_path, shard, "2nd", checkpoint=checkpoints["n_rel_4"][1], batch_size=64)
    assert summary["n_events"] == 320 and summary["truncated_events"] == 0
    stored = EventStore(store_path).read_predictions(shard, "icemix")
    gold = expected(FAMILY, "deepice_small/expected_n_rel_4.parquet")
    position = align(event_id, gold["event_id"])
    np.testing.assert_allclose(stored["zenith"][position], gold["zenith_f64"], atol=1e-5)
    delta = np.angle(np.exp(1j * (stored["azimuth"][position] - gold["azimuth_f64"])))
    np.testing.assert_allclose(delta, 0.0, atol=1e-5)
    np.testing.assert_allclose(stored["azimuth"][position], gold["azimuth"], atol=1e-3)   # authors' float32


def test_checkpoint_carries_the_ice_table_and_provenance(checkpoints):
    payload = registry.read_checkpoint(checkpoints["v23"][1])
    table = payload["aux"]["icemix_ice_transparency"]
    assert len(table["depth"]) == 110 and table["depth"][0] == pytest.approx(1398.4)
    provenance = payload["provenance"]
    assert [s["file"] for s in provenance["sources"]] == ["weights.pth"]
    assert provenance["aux"][0]["file"] == "ice_transparency.txt" and len(provenance["sources"][0]["sha256"]) == 64
    assert provenance["kwargs"]["class"] == V23 and provenance["kwargs"]["L"] == 192
    assert payload["features"] == {**payload["features"], "name": "icemix_authors", "with_ice": True}
    deepice = registry.read_checkpoint(checkpoints["n_rel_1"][1])
    assert deepice["aux"] == {} and deepice["features"]["with_ice"] is False


def _broken_files(tmp_path) -> dict:
    state = torch.load(weights("deepice_small"), map_location="cpu", weights_only=True)
    renamed = dict(state)
    renamed["sandwich.0.attn.proj_q.weights"] = renamed.pop("sandwich.0.attn.proj_q.weight")
    reshaped = {**state, "proj_out.weight": torch.zeros(3, 65)}
    files = {"renamed": renamed, "reshaped": reshaped}
    for name, value in files.items():
        torch.save(value, tmp_path / f"{name}.pth")
    raw = weights("deepice_small").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(raw[: len(raw) // 2])
    return {name: tmp_path / f"{name}.pth" for name in ("renamed", "reshaped", "truncated")}


@pytest.mark.parametrize("case, message", [
    ("truncated", r"truncated\.pth: not a readable torch file"),
    ("another_model", r"weights\.pth: unexpected key '.*': not a 2nd-place"),
    ("renamed", r"renamed\.pth: missing key 'sandwich\.0\.attn\.proj_q\.weight'"),
    ("reshaped", r"reshaped\.pth: key 'proj_out\.weight' has shape \(3, 65\), .* needs \(3, 64\)"),
    ("missing_aux", r"--aux ice_transparency\.txt: missing"),
    ("v22_or_v23", r"V22/V23 member .* add \"class\""),
    ("unknown_kwarg", r"--kwargs: unknown argument 'heads' for DeepIceModel"),
])
def test_bad_weight_files_get_one_line_errors_and_write_nothing(tmp_path, case, message):
    files = _broken_files(tmp_path)
    deepice = small_kwargs()["n_rel_1"]
    source, kwargs, aux = {
        "truncated": (files["truncated"], deepice, []),
        "another_model": (family_dir("dynedge_graphnet_v1") / "small" / "weights.pth", None, []),
        "renamed": (files["renamed"], deepice, []),
        "reshaped": (files["reshaped"], deepice, []),
        "missing_aux": (weights("v22_v23_small"), small_kwargs()["v22"], []),
        "v22_or_v23": (weights("v22_v23_small"), configs()["v22_v23_small"]["kwargs"], [ice_table()]),
        "unknown_kwarg": (weights("deepice_small"), {**deepice, "heads": 2}, []),
    }[case]
    out = tmp_path / "out.pt"
    with pytest.raises(InputError, match=message) as err:
        import_weights("2nd", [source], out, kwargs=kwargs, aux=aux)
    assert "\n" not in str(err.value) and not out.exists()
    if case == "renamed":      # the CLI says the same in one line and exits non-zero
        result = CliRunner().invoke(main, ["import-weights", "--model", "2nd", "--from", str(source),
                                           "--kwargs", json.dumps(kwargs), "--out", str(out)])
        assert result.exit_code != 0 and "missing key 'sandwich.0.attn.proj_q.weight'" in result.output
        assert not out.exists()


def test_sequence_limit_and_truncation_are_icegrid_settings(golden, tmp_path):
    """L (config.json's name) and truncation: above L a uniform random subset (the authors' randperm);
    log10 of the untruncated length still enters the model, as L0 does in the authors' dataset."""
    from icegrid.inference import predict_events

    torch.set_num_threads(1)
    _, _, data, geometry, _ = golden
    out = tmp_path / "short.pt"
    summary = import_weights("2nd", [weights("deepice_small")], out, kwargs={**small_kwargs()["n_rel_1"], "L": 24})
    loaded = registry.load_checkpoint(out)
    assert summary["preset"] == "custom" and (loaded.infer_limit, loaded.truncation) == (24, "random")
    direction, kappa, lengths = predict_events(loaded, data, geometry)
    assert lengths.max() == 24 and np.isfinite(direction).all() and (kappa > 0).all()
    selection = select_pulses(data.offset, data.pulses["time"], data.pulses["auxiliary"], 24, "random", seed=0)
    assert np.array_equal(loaded.transform(data, selection, geometry).event["L0"], np.diff(data.offset))
    hlc = family.convert([weights("deepice_small")], {**small_kwargs()["n_rel_1"], "truncation": "hlc_first"}, {})
    assert hlc.preset_config["truncation"] == "hlc_first"
    with pytest.raises(InputError, match="truncation 'newest' is not one of"):
        family.convert([weights("deepice_small")], {"truncation": "newest"}, {})
    readme = {"dim": 768, "dim_base": 192, "depth": 12, "head_size": 32, "n_rel": 1}
    shapes = family.expected_shapes(family.PRESETS["b_d32"]["members"][0])
    assert family.convert_states([("b.pth", meta_state_dict(shapes))], readme, {}).preset == "b_d32"
