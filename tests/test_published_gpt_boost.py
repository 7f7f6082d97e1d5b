"""The 3rd place's own models (icegrid.models.published.gpt_boost) against the goldens of its author's code:
presets vs the published manifests, features, import of the Lightning files, forward outputs, decoded
angles through infer_shard and the CLI, length routing, and one-line errors on bad files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import golden_support as gs
from icegrid.kaggle import InputError
from icegrid.models import registry
from icegrid.models.features import bucket_batches, collate, select_pulses
from icegrid.models.importer import expected_shapes, import_weights
from icegrid.models.published import gpt_boost as family
from icegrid.models.registry import CheckpointError

FAMILY = "gpt_3rd"
MANIFESTS = {"manifest_classifier_15L.json": ("classifier_15l", "classifier"),
             "manifest_classifier_18L.json": ("classifier_18l", "classifier"),
             "manifest_regression_stack_model.json": ("regression", "regression")}


def small_kwargs(config: str = "small") -> dict:
    configs = json.loads((gs.family_dir(FAMILY) / "source.json").read_text())["configs"]
    return {k: configs[config][k] for k in ("n_embd", "n_heads", "neck_features", "bias")}


def aux_files(table: str = "geometry_with_transparency.parquet") -> list:
    folder = gs.family_dir(FAMILY)
    return [folder / "angle_bins_128.json", (folder / table) if table != "ice" else gs.goldens_dir() / "ice" /
            "ice_transparency.txt"]


golden = gs.golden_shard_fixture(FAMILY, "gpt3_store")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(store path, shard) of the golden events; tests that predict into it overwrite each other's predictions."""
    return gs.golden_store(FAMILY, tmp_path_factory.mktemp("gpt3_predictions"))


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    folder = gs.family_dir(FAMILY)
    out = tmp_path_factory.mktemp("gpt3_ckpt") / "small.pt"
    summary = import_weights("3rd", [folder / "small/weights.ckpt", folder / "small/regression_weights.ckpt"],
                             out, kwargs=small_kwargs(), aux=aux_files())
    assert summary["preset"] == "stacked"
    assert summary["n_parameters"] == 496014 + 128003      # source.json: classifier + regression model
    return out


def _raw(loaded, golden, event_ids, batch_size=64):
    """The model's raw outputs for ``event_ids`` (in that order), batched by length as inference does."""
    data, geometry, event_id = golden
    selection = select_pulses(data.offset, data.pulses["time"], data.pulses["auxiliary"], loaded.infer_limit,
                              loaded.truncation, seed=0)
    features = loaded.transform(data, selection, geometry)
    events = gs.align(event_id, event_ids)
    parts, order = [], []
    with torch.no_grad():
        for batch in bucket_batches(selection.lengths[events], batch_size):
            parts.append(loaded.model.raw_outputs(collate(features, events[batch])))
            order.append(batch)
    inverse = np.argsort(np.concatenate(order))
    return {k: torch.cat([p[k] for p in parts]).double().numpy()[inverse] for k in parts[0]}


def _subset(expected, every=4):
    """Every ``every``-th golden event: the larger models' checks need not run all 320 on 2 CPU cores."""
    return {k: v[::every] for k, v in expected.items()}


def _assert_matches(out, expected, rtol=1e-5, atol=1e-5):
    """Every golden column (blocks az_logit_*, zn_logit_*, pool_* as 2-D) equals the model's output."""
    checked = 0
    for key, value in out.items():
        columns = sorted(c for c in expected if c.startswith(key + "_") and c[len(key) + 1:].isdigit())
        want = np.stack([expected[c] for c in columns], 1) if value.ndim == 2 else expected[key]
        assert value.shape == want.shape, key
        np.testing.assert_allclose(value, want, rtol=rtol, atol=atol, err_msg=key)
        checked += 1
    return checked


# ---- presets vs the published manifests -------------------------------------------------------------
@pytest.mark.parametrize("manifest_name", sorted(MANIFESTS))
def test_preset_is_the_manifest_to_the_parameter_and_its_state_dict_converts(manifest_name, tmp_path):
    preset, role = MANIFESTS[manifest_name]
    manifest = json.loads((gs.family_dir(FAMILY) / manifest_name).read_text())
    with torch.device("meta"):
        model = family.build(family.PRESETS[preset])
    assert sum(p.numel() for p in model.parameters()) == manifest["n_parameters"]
    authors = {e["key"]: tuple(e["shape"]) for e in manifest["state_dict"]}
    assert {f"{role}.{k}": s for k, s in authors.items()} == expected_shapes(model)
    # The author's Lightning layout, as meta tensors (nothing allocated), through convert's checks.
    ckpt = tmp_path / "authors.ckpt"
    torch.save({"state_dict": {f"model.{k}": torch.empty(s, device="meta") for k, s in authors.items()},
                "epoch": 0, "pytorch-lightning_version": "1.9.2"}, ckpt)
    converted = family.convert([ckpt], None, {p.name: p for p in aux_files()})
    assert converted.preset == preset
    with torch.device("meta"):
        rebuilt = family.build(converted.preset_config)
    assert {k: tuple(v.shape) for k, v in converted.state_dict.items()} == expected_shapes(rebuilt)
    rebuilt.load_state_dict(converted.state_dict, strict=True, assign=True)
    if role == "classifier":        # the author's own argument names give the same preset
        kwargs = {k: family.PRESETS[preset]["classifier"][k] for k in ("n_embd", "n_heads", "neck_features", "bias")}
        assert family.convert([ckpt], kwargs, {p.name: p for p in aux_files()}).preset == preset


def test_routed_preset_from_three_files_by_role_and_order(tmp_path):
    folder = gs.family_dir(FAMILY)
    files = {}
    for name in ("manifest_classifier_18L.json", "manifest_classifier_15L.json",
                 "manifest_regression_stack_model.json"):
        manifest = json.loads((folder / name).read_text())
        files[name] = tmp_path / name.replace(".json", ".ckpt")
        torch.save({"state_dict": {f"model.{e['key']}": torch.empty(e["shape"], device="meta")
                                   for e in manifest["state_dict"]}}, files[name])
    # the stack model may come first: roles come from the keys, short/long from the classifiers' order
    converted = family.convert([files["manifest_regression_stack_model.json"], files["manifest_classifier_18L.json"],
                                files["manifest_classifier_15L.json"]], None, {p.name: p for p in aux_files()})
    assert converted.preset == "routed"
    assert len(converted.preset_config["classifier"]["n_embd"]) == 18
    assert len(converted.preset_config["long_classifier"]["n_embd"]) == 15
    assert converted.preset_config["infer_limit"] == 3072 and converted.preset_config["short_limit"] == 256
    with torch.device("meta"):
        model = family.build(converted.preset_config)
    assert {k: tuple(v.shape) for k, v in converted.state_dict.items()} == expected_shapes(model)
    assert sum(p.numel() for p in model.parameters()) == 72157454 + 62717198 + 23220227


def test_registry_lists_the_presets_with_their_limits():
    presets = registry.presets("3rd")
    for name in family.PRESETS:
        assert presets[name]["arch"] == "authors"
    with torch.device("meta"):
        loaded = registry.build("3rd", "classifier_18l")
    assert (loaded.infer_limit, loaded.truncation) == (256, "hlc_first")
    assert loaded.transform.name == "gpt_boost_authors"


# ---- features ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("table", ["geometry_with_transparency.parquet", "ice"])
def test_features_equal_the_authors(golden, table):
    data, geometry, event_id = golden
    transform = family.GPTAuthorsFeatures()
    from icegrid.models.published.gpt_boost_aux import read_aux
    transform.load_aux(read_aux({p.name: p for p in aux_files(table)}, 128, "gpt_boost"))
    selection = select_pulses(data.offset, data.pulses["time"], data.pulses["auxiliary"], 256, "hlc_first", seed=0)
    x = transform(data, selection, geometry).pulse["x"]
    want = gs.features(FAMILY)
    position = gs.align(event_id, want["event_id"])
    assert np.array_equal(selection.lengths[position], want["seq_len"])
    rows = np.concatenate([np.arange(selection.offset[p], selection.offset[p + 1]) for p in position])
    assert x.dtype == np.float32
    np.testing.assert_allclose(x[rows], want["x"], rtol=1e-6, atol=0)


# ---- forward ----------------------------------------------------------------------------------------------
def test_imported_small_model_gives_the_authors_outputs(small_checkpoint, golden):
    loaded = registry.load_checkpoint(small_checkpoint)
    assert loaded.provenance["preset"] == "stacked"
    assert len(loaded.provenance["sources"]) == 2 and len(loaded.provenance["aux"]) == 2
    expected = gs.expected(FAMILY, "small/expected.parquet")
    assert _assert_matches(_raw(loaded, golden, expected["event_id"]), expected) == 14


def test_readme_small_classifier_alone(tmp_path, golden):
    folder = gs.family_dir(FAMILY)
    import_weights("3rd", [folder / "readme_small/weights.ckpt"], tmp_path / "r.pt",
                   kwargs=small_kwargs("readme_small"), aux=aux_files("ice"))
    loaded = registry.load_checkpoint(tmp_path / "r.pt")
    assert sum(p.numel() for p in loaded.model.parameters()) == 1278094
    expected = _subset(gs.expected(FAMILY, "readme_small/expected.parquet"))
    assert _assert_matches(_raw(loaded, golden, expected["event_id"]), expected) == 8


def test_infer_shard_writes_the_authors_angles_in_kaggle_convention(small_checkpoint, store):
    from icegrid.inference import infer_shard
    from icegrid.store import EventStore

    store_path, shard = store
    infer_shard(store_path, shard, "3rd", small_checkpoint, overwrite=True)
    events = EventStore(store_path)
    got = events.read_predictions(shard, "gpt_boost")
    expected = gs.expected(FAMILY, "small/expected.parquet")
    position = gs.align(events.read_event_arrays(shard, ("event_id",))["event_id"], expected["event_id"])
    zenith = np.clip(expected["zenith_raw_f64"], 0.0, math.pi)
    np.testing.assert_allclose(got["zenith"][position], zenith, atol=1e-5)
    off_pole = np.sin(zenith) > 1e-3          # azimuth is undefined at a clipped pole
    assert off_pole.sum() > 300
    error = np.angle(np.exp(1j * (got["azimuth"][position] - expected["azimuth_f64"])))
    assert np.abs(error[off_pole]).max() < 1e-5
    np.testing.assert_allclose(got["kappa"][position], expected["reg_kappa"], rtol=1e-5, atol=1e-5)


def test_cli_import_weights_then_infer(tmp_path, store):
    from icegrid.cli import main
    from icegrid.store import EventStore

    folder = gs.family_dir(FAMILY)
    store_path, shard = store
    ckpt = tmp_path / "cli.pt"
    args = ["import-weights", "--model", "3rd", "--from", str(folder / "small/weights.ckpt"),
            "--kwargs", json.dumps(small_kwargs()), "--out", str(ckpt)]
    for path in aux_files():
        args += ["--aux", str(path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "classifier_18l" in result.output and "496,014 parameters" in result.output
    result = CliRunner().invoke(main, ["infer", "--store", str(store_path), "--models", "3rd",
                                       "--checkpoint", str(ckpt), "--overwrite"])
    assert result.exit_code == 0, result.output
    events = EventStore(store_path)
    got = events.read_predictions(shard, "gpt_boost")
    expected = gs.expected(FAMILY, "small/expected.parquet")
    position = gs.align(events.read_event_arrays(shard, ("event_id",))["event_id"], expected["event_id"])
    np.testing.assert_allclose(got["zenith"][position], np.clip(expected["zenith_raw_f64"], 0, math.pi), atol=1e-5)


# ---- routing by length --------------------------------------------------------------------------------------
def test_routing_sends_long_events_to_the_long_sequence_classifier(tmp_path, golden):
    folder = gs.family_dir(FAMILY)
    payload = torch.load(folder / "small/weights.ckpt", weights_only=True)
    generator = torch.Generator().manual_seed(5)
    payload["state_dict"] = {k: v + 0.05 * torch.randn(v.shape, generator=generator)
                             for k, v in payload["state_dict"].items()}
    long_file = tmp_path / "long_seq.ckpt"
    torch.save(payload, long_file)
    aux = aux_files()
    import_weights("3rd", [folder / "small/weights.ckpt", long_file, folder / "small/regression_weights.ckpt"],
                   tmp_path / "routed.pt", kwargs=small_kwargs(), aux=aux)
    import_weights("3rd", [long_file], tmp_path / "long.pt", kwargs=small_kwargs(), aux=aux)
    routed = registry.load_checkpoint(tmp_path / "routed.pt")
    assert routed.preset == "routed" and routed.infer_limit == 3072
    routed.model.short_limit = 60          # the golden events are short: route at 60 pulses instead of 256
    expected = _subset(gs.expected(FAMILY, "small/expected.parquet"), every=2)
    out = _raw(routed, golden, expected["event_id"], batch_size=1000)     # one batch: short and long rows mixed
    long_out = _raw(registry.load_checkpoint(tmp_path / "long.pt"), golden, expected["event_id"])
    data, _, event_id = golden
    is_long = np.diff(data.offset)[gs.align(event_id, expected["event_id"])] > 60
    assert 20 < is_long.sum() < 140
    short_part = {k: v[~is_long] for k, v in expected.items()}
    _assert_matches({k: v[~is_long] for k, v in out.items()}, short_part)
    for key in ("az_logit", "zn_logit", "pool", "azimuth_f64", "zenith_raw_f64"):
        np.testing.assert_allclose(out[key][is_long], long_out[key][is_long], rtol=1e-5, atol=1e-5)
    golden_pool = np.stack([expected[f"pool_{i:03d}"] for i in range(96)], 1)
    assert np.abs(out["pool"][is_long] - golden_pool[is_long]).max() > 1e-2      # the long model did run


def test_truncation_above_the_limit_keeps_hlc_pulses_first():
    loaded = registry.build("3rd", "classifier_15l", preset_config={**family.PRESETS["classifier_15l"],
                                                                     "classifier": small_kwargs()})
    n = 300
    auxiliary = np.arange(n) % 3 == 0                       # 100 non-HLC pulses
    selection = select_pulses(np.array([0, n]), np.arange(n), auxiliary, loaded.infer_limit, loaded.truncation, seed=0)
    assert selection.lengths[0] == 256 and (~auxiliary[selection.index]).sum() == 200


# ---- one-line errors, nothing written ------------------------------------------------------------------------
def _bad_file(tmp_path, edit):
    payload = torch.load(gs.family_dir(FAMILY) / "small/weights.ckpt", weights_only=True)
    edit(payload["state_dict"])
    path = tmp_path / "bad.ckpt"
    torch.save(payload, path)
    return path


def _rename(sd):
    sd["model.encoder.attn.1.ln_9.weight"] = sd.pop("model.encoder.attn.1.ln_2.weight")


def _reshape(sd):
    sd["model.neck_zn.mlp.1.weight"] = torch.zeros(380, 96)


def _drop(sd):
    del sd["model.zenith.bias"]


@pytest.mark.parametrize("edit, message", [
    (_rename, "missing key 'encoder.attn.1.ln_2.weight'"),
    (_reshape, "key 'neck_zn.mlp.1.weight' has shape \\(380, 96\\)"),
    (_drop, "missing key 'zenith.bias'"),
])
def test_a_broken_file_names_its_first_offending_key(tmp_path, edit, message):
    path = _bad_file(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as err:
        import_weights("3rd", [path], tmp_path / "out.pt", kwargs=small_kwargs(), aux=aux_files())
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("case", ["truncated", "other_model", "unpublished", "unknown_kwarg", "no_bins",
                                  "no_sensor_table", "stranger_aux"])
def test_bad_input_fails_in_one_line_and_writes_nothing(tmp_path, case):
    folder = gs.family_dir(FAMILY)
    sources, kwargs, aux = [folder / "small/weights.ckpt"], small_kwargs(), aux_files()
    if case == "truncated":
        data = (folder / "small/weights.ckpt").read_bytes()
        sources = [tmp_path / "weights.ckpt"]
        sources[0].write_bytes(data[: len(data) // 2])
        expected = (CheckpointError, "not a readable torch file")
    elif case == "other_model":
        sources = [gs.goldens_dir() / "icemix_2nd/deepice_small/weights.pth"]
        expected = (CheckpointError, "not a 3rd-place classifier or stack model \\(first key")
    elif case == "unpublished":
        kwargs = None
        expected = (CheckpointError, "2-layer classifier of width 96 .* no published configuration; give")
    elif case == "unknown_kwarg":
        kwargs = {**kwargs, "depth": 2}
        expected = (InputError, "--kwargs: unknown key 'depth'")
    elif case == "no_bins":
        aux = aux[1:]
        expected = (InputError, "--aux angle_bins_128.json: missing")
    elif case == "no_sensor_table":
        aux = aux[:1]
        expected = (InputError, "--aux sensor_geometry_with_transparency.csv: missing")
    else:
        aux = [*aux, folder / "source.json"]
        expected = (InputError, "source.json: not a side file of the 3rd place")
    with pytest.raises(expected[0], match=expected[1]) as err:
        import_weights("3rd", sources, tmp_path / "out.pt", kwargs=kwargs, aux=aux)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out.pt").exists()


def test_stack_model_alone_converts_but_says_it_needs_a_classifier(tmp_path, golden):
    folder = gs.family_dir(FAMILY)
    summary = import_weights("3rd", [folder / "small/regression_weights.ckpt"], tmp_path / "reg.pt")
    assert summary["preset"] == "regression" and summary["n_parameters"] == 128003
    loaded = registry.load_checkpoint(tmp_path / "reg.pt")
    data, geometry, _ = golden
    from icegrid.inference import predict_events
    with pytest.raises(InputError, match="stack model alone.*import it together with a classifier") as err:
        predict_events(loaded, data, geometry)
    assert "\n" not in str(err.value)


def test_stack_model_that_does_not_fit_the_classifier(tmp_path):
    folder = gs.family_dir(FAMILY)
    with pytest.raises(CheckpointError, match="takes 366 inputs, the classifier gives 64 \\+ 128 \\+ 142 = 334"):
        import_weights("3rd", [folder / "readme_small/weights.ckpt", folder / "small/regression_weights.ckpt"],
                       tmp_path / "out.pt", kwargs=small_kwargs("readme_small"), aux=aux_files())
    assert not (tmp_path / "out.pt").exists()


# ---- icegrid's selector on the imported heads (icegrid's, not the author's) ----------------------------------
def test_selector_stage_fits_on_imported_heads_and_picks_per_event(small_checkpoint, tmp_path, golden, store):
    from icegrid.cli import main
    from icegrid.inference import infer_shard
    from icegrid.models.published import gpt_boost_selector as selection
    from icegrid.store import EventStore

    store_path, shard = store
    out = tmp_path / "selected.pt"
    result = CliRunner().invoke(main, ["train", "--model", "3rd", "--stage", "selector", "--checkpoint",
                                       str(small_checkpoint), "--store", str(store_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "stage 'selector' fitted on 320 events" in result.output
    loaded = registry.load_checkpoint(out)
    assert loaded.model.selector is not None and loaded.provenance["preset"] == "stacked"
    assert loaded.metrics["stages"][-1]["selector_report_events"] == 160
    infer_shard(store_path, shard, "3rd", out, overwrite=True)
    predictions = EventStore(store_path)
    got = predictions.read_predictions(shard, "gpt_boost")
    # each event gets the head the selector picks for it, from the features inference built
    data, geometry, event_id = golden
    events = gs.align(event_id, predictions.read_event_arrays(shard, ("event_id",))["event_id"])
    selection_ = select_pulses(data.offset, data.pulses["time"], data.pulses["auxiliary"], 256, "hlc_first", seed=0)
    batch = collate(loaded.transform(data, selection_, geometry), events)
    with torch.no_grad():
        heads = selection.heads(loaded.model.raw_outputs(batch))
    pick = selection.use_regression(loaded.model.selector, batch["engineered"].double().numpy(), heads)
    assert 0 < pick.sum() < pick.shape[0]
    want = np.where(pick, heads["reg_zenith"], heads["cls_zenith"])
    np.testing.assert_allclose(got["zenith"], want, atol=1e-5)


def test_authors_presets_are_not_trained_from_scratch(store):
    from icegrid.cli import main

    store_path, _ = store
    result = CliRunner().invoke(main, ["train", "--model", "3rd", "--preset", "routed", "--store", str(store_path)])
    assert result.exit_code == 2 and "is the authors' own: import their weights" in result.output
    result = CliRunner().invoke(main, ["train", "--model", "3rd", "--stage", "selector", "--store", str(store_path)])
    assert result.exit_code == 2 and "--stage needs --checkpoint" in result.output
