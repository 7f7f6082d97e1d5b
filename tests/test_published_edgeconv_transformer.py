"""The 1st place's own models (icegrid.models.published.edgeconv_transformer) against the goldens of tito's
code: presets vs the published manifests, features and kNN edges, import of his GraphNeT state dicts,
raw outputs of members and stacker, decoded angles through infer_shard and the CLI, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import golden_support as gs
from icegrid.kaggle import InputError
from icegrid.models import registry
from icegrid.models.features import bucket_batches, collate, select_pulses
from icegrid.models.importer import expected_shapes, import_weights
from icegrid.models.published import edgeconv_transformer as family
from icegrid.models.published.edgeconv_transformer_layers import knn_edges
from icegrid.models.registry import CheckpointError
from icegrid.store import angles_from_direction

FAMILY = "edgeconv_transformer_1st"
MEMBER_FILES = {"model1": "members_small/weights_G_PP.pth", "model3": "members_small/weights_noG_noPP.pth",
                "model4": "members_small/weights_G_PP.pth"}


def member_kwargs(name: str) -> dict:
    config = json.loads((gs.family_dir(FAMILY) / "source.json").read_text())["configs"][f"{name}_small"]
    return {k: config[k] for k in ("DYNEDGE_LAYER_SIZE", "COLUMNS_NEAREST_NEIGHBOURS", "USE_G", "USE_PP")}


def stack_kwargs() -> dict:
    return {"members": [member_kwargs(m) for m in MEMBER_FILES], "HIDDEN_SIZE": 128}


def stack_sources() -> list:
    folder = gs.family_dir(FAMILY)
    return [folder / f for f in MEMBER_FILES.values()] + [folder / "stacker_small/weights.pth"]


golden = gs.golden_shard_fixture(FAMILY, "tito_store")


@pytest.fixture(scope="module")
def features(golden):
    data, geometry, _ = golden
    selection = select_pulses(data.offset, data.pulses["time"], data.pulses["auxiliary"], family.FORCE_MAX_PULSE + 1,
                              "first_in_time")
    return family.AuthorsEdgeTransformerFeatures()(data, selection, geometry)


@pytest.fixture(scope="module")
def stack_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("tito_ckpt") / "stack.pt"
    summary = import_weights("1st", stack_sources(), out, kwargs=stack_kwargs())
    assert summary["n_parameters"] == 2 * 480598 + 323078 + 86150      # source.json: members + stacker
    return out


def raw_outputs(loaded, features, events=None) -> dict[str, np.ndarray]:
    """The model's raw outputs for ``events`` (default all), in bucketed batches as inference runs."""
    events = np.arange(features.n_events) if events is None else np.asarray(events)
    parts = []
    with torch.inference_mode():
        for batch in bucket_batches(features.selection.lengths[events], 256, max_tokens=16384):
            parts.append((events[batch], loaded.model.raw_outputs(collate(features, events[batch]))))
    order = np.concatenate([e for e, _ in parts])
    sorter = np.argsort(order)
    back = sorter[np.searchsorted(order, events, sorter=sorter)]       # concatenated row of each event
    return {k: np.concatenate([out[k].numpy() for _, out in parts])[back] for k in parts[0][1]}


def _angle_error(a, b):
    return np.abs(np.angle(np.exp(1j * (a - b))))


def assert_member_columns(got: dict, expected: dict, position: np.ndarray, prefix: str = "") -> None:
    columns = [c for c in expected if c.startswith(("direction_", "head", "idx"))]
    assert len(columns) == 8 + 6 + 128
    for column in columns:
        np.testing.assert_allclose(got[prefix + column][position], expected[column], rtol=1e-5, atol=1e-5,
                                   err_msg=column)


# ---- presets vs the published manifests ----------------------------------------------------------------------
@pytest.mark.parametrize("number", range(1, 7))
def test_member_presets_match_the_manifests(number):
    manifest = json.loads((gs.family_dir(FAMILY) / f"manifest_model{number}.json").read_text())
    expected = gs.manifest(gs.family_dir(FAMILY) / f"manifest_model{number}.json")[0]
    with torch.device("meta"):
        model = registry.build("1st", f"m{number}").model
    assert sum(p.numel() for p in model.parameters()) == manifest["n_parameters"]
    assert {k[len("members.0."):]: v for k, v in expected_shapes(model).items()} == expected
    globals_ = manifest["notebook_globals"]
    member = family.PRESETS[f"m{number}"]["members"][0]
    assert member["DYNEDGE_LAYER_SIZE"] == globals_["DYNEDGE_LAYER_SIZE"]
    assert member["COLUMNS_NEAREST_NEIGHBOURS"] == family._knn_columns(globals_["COLUMNS_NEAREST_NEIGHBOURS"])
    assert (member["USE_G"], member["USE_PP"]) == (globals_["USE_G"], globals_["USE_PP"])


def test_stacked_preset_matches_the_manifests():
    folder = gs.family_dir(FAMILY)
    stacker = json.loads((folder / "manifest_stacker.json").read_text())
    with torch.device("meta"):
        model = registry.build("1st", "stacked").model
    members = sum(json.loads((folder / f"manifest_model{n}.json").read_text())["n_parameters"] for n in range(1, 7))
    assert sum(p.numel() for p in model.parameters()) == members + stacker["n_parameters"] == 35_989_946
    assert {k[len("stacker."):]: v for k, v in expected_shapes(model).items() if k.startswith("stacker.")} \
        == gs.manifest(folder / "manifest_stacker.json")[0]
    assert stacker["N_INPUT_FEA"] == 6 * 136 and stacker["HIDDEN_SIZE"] == 512


def _meta_file(tmp_path, name, shapes):
    path = tmp_path / name
    torch.save(gs.meta_state_dict(shapes), path)
    return path


@pytest.mark.parametrize("number", range(1, 7))
def test_manifest_state_dicts_convert_to_the_member_presets(tmp_path, number):
    shapes = gs.manifest(gs.family_dir(FAMILY) / f"manifest_model{number}.json")[0]
    converted = family.convert([_meta_file(tmp_path, f"model{number}-last.pth", shapes)], None, {})
    assert converted.preset == f"m{number}"
    with torch.device("meta"):
        model = family.build(converted.preset_config)
    assert expected_shapes(model) == {k: tuple(v.shape) for k, v in converted.state_dict.items()}


def test_manifest_state_dicts_convert_to_the_stacked_preset(tmp_path):
    folder = gs.family_dir(FAMILY)
    files = [_meta_file(tmp_path, f"model{n}-last.pth", gs.manifest(folder / f"manifest_model{n}.json")[0])
             for n in range(1, 7)]
    files.append(_meta_file(tmp_path, "stacking-6models-last.pth", gs.manifest(folder / "manifest_stacker.json")[0]))
    converted = family.convert(files, None, {})
    assert converted.preset == "stacked" and converted.preset_config == family.PRESETS["stacked"]
    with torch.device("meta"):
        model = family.build(converted.preset_config)
    assert expected_shapes(model) == {k: tuple(v.shape) for k, v in converted.state_dict.items()}
    with pytest.raises(CheckpointError, match="model6-last.pth: given as member 1"):
        family.convert([files[5], *files[1:5], files[0], files[6]], None, {})


def test_same_shaped_members_need_the_file_name_or_kwargs(tmp_path):
    shapes = gs.manifest(gs.family_dir(FAMILY) / "manifest_model6.json")[0]
    with pytest.raises(CheckpointError, match=r"weights\.pth: shapes fit members m1, m2, m5, m6"):
        family.convert([_meta_file(tmp_path, "weights.pth", shapes)], None, {})
    kwargs = {"DYNEDGE_LAYER_SIZE": [[256, 256]] * 4, "COLUMNS_NEAREST_NEIGHBOURS": "[slice(0, 4, None)]",
              "USE_G": True, "USE_PP": True}
    assert family.convert([_meta_file(tmp_path, "weights.pth", shapes)], kwargs, {}).preset == "m6"


# ---- features ------------------------------------------------------------------------------------------------
def test_features_and_edges_equal_the_authors(golden, features):
    _, _, event_id = golden
    reference = gs.features(FAMILY)
    position = gs.align(event_id, reference["event_id"])
    offset = features.selection.offset
    rows = np.concatenate([np.arange(offset[p], offset[p + 1]) for p in position])
    np.testing.assert_allclose(features.pulse["x"][rows], reference["x"], rtol=1e-6, atol=0)
    batch = collate(features, position)       # golden event order: golden row = batch slot in order
    flat = np.flatnonzero(batch["mask"].numpy().ravel())
    length = batch["mask"].shape[1]
    for dims, tag in ((3, "3d"), (4, "4d")):
        index, valid = knn_edges(batch["knn"][..., :dims], batch["mask"], 6)
        event = np.repeat(np.arange(len(position)), 6 * length).reshape(index.shape)
        node = np.broadcast_to(np.arange(length)[None, :, None], index.shape)
        keep = valid.numpy()
        global_row = np.searchsorted(flat, (event * length + index.numpy())[keep])
        global_node = np.searchsorted(flat, (event * length + node)[keep])
        n = flat.shape[0]
        got = np.sort(global_node.astype(np.int64) * n + global_row)
        want = np.sort(reference[f"edge_dst_{tag}"].astype(np.int64) * n + reference[f"edge_src_{tag}"])
        np.testing.assert_array_equal(got, want)          # same (source, target) pairs, none twice
        assert np.unique(got).shape[0] == got.shape[0]


def test_global_variables_equal_the_authors(golden, features):
    from icegrid.models.dynedge import global_variables

    _, _, event_id = golden
    reference = gs.features(FAMILY)
    batch = collate(features, gs.align(event_id, reference["event_id"]))
    index, valid = knn_edges(batch["knn"][..., :3], batch["mask"], 6)
    got = global_variables(batch["x"], batch["mask"], index, valid, batch["log_n_pulses"])
    np.testing.assert_allclose(got.numpy(), reference["global_variables"], rtol=1e-5, atol=1e-6)


# ---- forward: members and stacker on every golden event ----------------------------------------------------
def test_stack_outputs_equal_the_authors(golden, features, stack_checkpoint):
    _, _, event_id = golden
    loaded = registry.load_checkpoint(stack_checkpoint, "1st")
    assert loaded.preset == "custom" and loaded.provenance["kwargs"] == {
        "members": [{**member_kwargs(m), "COLUMNS_NEAREST_NEIGHBOURS": 4 if m == "model4" else 3,
                     "NB_NEAREST_NEIGHBOURS": [6]} for m in MEMBER_FILES], "HIDDEN_SIZE": 128}
    got = raw_outputs(loaded, features)
    for i, name in enumerate(MEMBER_FILES):
        expected = gs.expected(FAMILY, f"members_small/expected_{name}.parquet")
        assert_member_columns(got, expected, gs.align(event_id, expected["event_id"]), prefix=f"member{i + 1}:")
    reference = gs.features(FAMILY)
    np.testing.assert_array_equal(np.char.partition(reference["stacker_input_columns"], ":")[:, 2][:8],
                                  ["direction_x", "direction_y", "direction_z", "direction_kappa",
                                   "direction_x1", "direction_y1", "direction_z1", "direction_kappa1"])
    expected = gs.expected(FAMILY, "stacker_small/expected.parquet")
    position = gs.align(event_id, expected["event_id"])
    for column in ("direction_x", "direction_y", "direction_z", "direction_kappa1",
                   "direction_x1", "direction_y1", "direction_z1", "direction_kappa"):
        np.testing.assert_allclose(got[column][position], expected[column], rtol=1e-5, atol=1e-5, err_msg=column)
    # the stack predicts with the stacker's head 0, decoded in the Kaggle convention
    azimuth, zenith = angles_from_direction(np.stack([got[f"direction_{a}"] for a in "xyz"], axis=1)[position])
    assert _angle_error(azimuth, expected["azimuth"]).max() < 1e-5
    assert np.abs(zenith - expected["zenith"]).max() < 1e-5
    few = position[:16]
    with torch.inference_mode():
        direction, kappa = loaded.model.predict(collate(features, few))
    np.testing.assert_array_equal(direction.numpy()[:, 0], got["direction_x"][few])
    np.testing.assert_array_equal(kappa.numpy(), got["direction_kappa1"][few])


@pytest.mark.parametrize("name", list(MEMBER_FILES))
def test_single_member_checkpoints_equal_the_authors(tmp_path, golden, features, name):
    _, _, event_id = golden
    out = tmp_path / f"{name}.pt"
    summary = import_weights("1st", [gs.family_dir(FAMILY) / MEMBER_FILES[name]], out, kwargs=member_kwargs(name))
    assert summary["n_parameters"] == (323078 if name == "model3" else 480598)
    loaded = registry.load_checkpoint(out, "1st")
    assert (loaded.truncation, loaded.infer_limit) == ("first_in_time", 3001)
    expected = gs.expected(FAMILY, f"members_small/expected_{name}.parquet")
    position = gs.align(event_id, expected["event_id"])
    subset = position[::8]                   # the stack test covers every event with the same member weights
    got = raw_outputs(loaded, features, subset)
    assert_member_columns(got, {k: v[::8] for k, v in expected.items()}, np.arange(subset.shape[0]))


def test_cli_import_weights_then_infer_predicts_with_head_0(tmp_path):
    from icegrid.cli import main
    from icegrid.store import EventStore

    store_path, shard = gs.golden_store(FAMILY, tmp_path)
    ckpt = tmp_path / "model4.pt"
    result = CliRunner().invoke(main, ["import-weights", "--model", "1st", "--from",
                                       str(gs.family_dir(FAMILY) / MEMBER_FILES["model4"]),
                                       "--kwargs", json.dumps(member_kwargs("model4")), "--out", str(ckpt)])
    assert result.exit_code == 0, result.output
    assert "preset 'custom'" in result.output and "480,598 parameters" in result.output
    result = CliRunner().invoke(main, ["infer", "--store", str(store_path), "--models", "1st",
                                       "--checkpoint", str(ckpt)])
    assert result.exit_code == 0, result.output
    store = EventStore(store_path)
    got = store.read_predictions(shard, "edgeconv_transformer")
    expected = gs.expected(FAMILY, "members_small/expected_model4.parquet")
    position = gs.align(store.read_event_arrays(shard, ("event_id",))["event_id"], expected["event_id"])
    assert _angle_error(got["azimuth"][position], expected["azimuth"]).max() < 1e-5
    assert np.abs(got["zenith"][position] - expected["zenith"]).max() < 1e-5
    np.testing.assert_allclose(got["kappa"][position], expected["direction_kappa1"], rtol=1e-5)   # head 0's kappa
    assert _angle_error(got["azimuth"][position], expected["azimuth_head1"]).max() > 0.1


def test_tiny_events_and_batching_do_not_change_an_event():
    from icegrid.models.features import Selection, ShardFeatures

    torch.manual_seed(0)
    lengths = np.array([1, 2, 6, 7, 40])
    offset = np.concatenate([[0], np.cumsum(lengths)])
    rng = np.random.default_rng(1)
    n = int(offset[-1])
    features = ShardFeatures(selection=Selection(index=np.arange(n), offset=offset, n_pulses=lengths),
                             pulse={"x": rng.normal(size=(n, 6)).astype(np.float32),
                                    "knn": rng.normal(size=(n, 4)).astype(np.float32)},
                             event={"log_n_pulses": np.log10(lengths).astype(np.float32)})
    config = family.config_from_kwargs({"members": [member_kwargs("model4"), member_kwargs("model3")],
                                        "HIDDEN_SIZE": 16}, 2, True)
    model = family.build(config).eval()
    with torch.inference_mode():
        together = model.predict(collate(features, np.arange(5)))
        alone = [model.predict(collate(features, np.array([i]))) for i in range(5)]
    assert torch.isfinite(together[0]).all() and torch.isfinite(together[1]).all()
    for i, (direction, kappa) in enumerate(alone):
        np.testing.assert_allclose(together[0][i].numpy(), direction[0].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(together[1][i].numpy(), kappa[0].numpy(), rtol=1e-5, atol=1e-6)


# ---- bad files: one line, naming the file and the first offending key; nothing written ----------------------
def _member_state() -> dict:
    return torch.load(gs.family_dir(FAMILY) / MEMBER_FILES["model1"], weights_only=True)


def _bad_files(tmp_path):
    state = _member_state()
    renamed = dict(state)
    renamed["_gnn._readout.0.weight_renamed"] = renamed.pop("_gnn._readout.0.weight")
    reshaped = dict(state)
    reshaped["_tasks.1._affine.weight"] = torch.zeros(3, 64)
    extra = dict(state)
    extra["_gnn.extra"] = torch.zeros(1)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((gs.family_dir(FAMILY) / MEMBER_FILES["model1"]).read_bytes()[:4000])
    cases = {"renamed": (renamed, r"missing key '_gnn\._readout\.0\.weight'"),
             "reshaped": (reshaped, r"key '_tasks\.1\._affine\.weight' has shape \(3, 64\)"),
             "extra": (extra, r"unexpected key '_gnn\.extra'")}
    files = {}
    for name, (payload, message) in cases.items():
        torch.save({"state_dict": payload}, tmp_path / f"{name}.pth")     # the author's infer() unwraps this too
        files[name] = (tmp_path / f"{name}.pth", message)
    files["truncated"] = (truncated, "not a readable torch file")
    files["dynedge"] = (gs.goldens_dir() / "dynedge_graphnet_v1/small/weights.pth", "not a 1st-place member")
    files["icemix"] = (gs.goldens_dir() / "icemix_2nd/deepice_small/weights.pth", "not a 1st-place member")
    return files


@pytest.mark.parametrize("case", ["renamed", "reshaped", "extra", "truncated", "dynedge", "icemix"])
def test_bad_weight_files_fail_in_one_line(tmp_path, case):
    path, message = _bad_files(tmp_path)[case]
    out = tmp_path / "out.pt"
    with pytest.raises(InputError, match=message) as err:
        import_weights("1st", [path], out, kwargs=member_kwargs("model1"))
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert not out.exists()


def test_bad_stacks_and_kwargs_fail_in_one_line(tmp_path):
    folder = gs.family_dir(FAMILY)
    member, stacker = folder / MEMBER_FILES["model1"], folder / "stacker_small/weights.pth"
    out = tmp_path / "out.pt"
    cases = [
        ([member, stacker], stack_kwargs(), InputError, "'members' must list 1 member"),
        ([member, member, stacker], {"members": [member_kwargs("model1")] * 2, "HIDDEN_SIZE": 128},
         CheckpointError, r"stacker_small/weights\.pth: key '_mlp\.0\.weight' has shape \(128, 408\)"),
        ([stacker], None, CheckpointError, "needs its member files"),
        ([member, member], None, CheckpointError, "no stacker file"),
        ([member], None, CheckpointError, r"key '_gnn\._conv_layers\.0\.nn\.0\.weight' has shape \(32, 18\).*--kwargs"),
        ([member], {**member_kwargs("model1"), "USE_GLOBALS": True}, InputError, "unknown key 'USE_GLOBALS'"),
        ([member], {**member_kwargs("model1"), "COLUMNS_NEAREST_NEIGHBOURS": 5}, InputError, "must be 3 or 4"),
        ([member], {**member_kwargs("model1"), "USE_PP": False}, CheckpointError,
         r"key '_gnn\._readout\.0\.weight' has shape \(256, 267\), preset 'custom' needs \(256, 43\)"),
    ]
    for sources, kwargs, error, message in cases:
        with pytest.raises(error, match=message) as err:
            import_weights("1st", sources, out, kwargs=kwargs)
        assert "\n" not in str(err.value)
        assert not out.exists()
    with pytest.raises(InputError, match="takes no side files"):
        import_weights("1st", [member], out, kwargs=member_kwargs("model1"), aux=[folder / "source.json"])


def test_authors_presets_refuse_training():
    with torch.device("meta"):
        model = registry.build("1st", "m1").model
    with pytest.raises(NotImplementedError, match="import-weights"):
        model.stages({})
