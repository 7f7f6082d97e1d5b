"""Packaging: the sdist and wheel carry the config defaults and the shipped checkpoints, an installed (not
editable) icegrid runs every model from outside the checkout, and a user's config files override the
packaged defaults key by key, with errors naming the user's file. No network: builds use this venv's
setuptools (the ``[test]`` extra) without build isolation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from icegrid import config
from icegrid.config import ConfigError, load_section
from icegrid.models import registry

REPO = Path(__file__).resolve().parents[1]
NETWORKS = ("dynedge", "edgeconv_transformer", "icemix", "gpt_boost")
PACKAGE_DATA = ["icegrid/config/analysis.yaml", "icegrid/config/clusters.yaml", "icegrid/config/models.yaml",
                *(f"icegrid/checkpoints/{name}-small.pt" for name in NETWORKS)]


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path, monkeypatch):
    """Every test starts from an empty user config folder, whatever the developer's ~/.config holds."""
    empty = tmp_path / "no-user-config"
    empty.mkdir()
    monkeypatch.setenv("ICEGRID_CONFIG", str(empty))


def _pip(*args: str, cwd: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """An sdist of a copy of the package source and a wheel built from that sdist (as `python -m build`
    does), so the wheel only has what the sdist carries. The copy keeps build/ out of the shared checkout."""
    from setuptools import build_meta  # noqa: F401  (the [test] extra; a clear failure if it is missing)

    work = tmp_path_factory.mktemp("build")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "icegrid", source / "icegrid", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    run = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                          "print(b.build_sdist(sys.argv[1]))", str(work / "sdist")],
                         cwd=source, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    sdist = work / "sdist" / run.stdout.strip().splitlines()[-1]
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(work / "dist"), str(sdist),
         cwd=work)
    wheel, = (work / "dist").glob("icegrid-*.whl")
    return {"sdist": sdist, "wheel": wheel, "work": work}


def test_sdist_and_wheel_carry_config_defaults_and_small_checkpoints(built):
    with tarfile.open(built["sdist"]) as sdist:
        members = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert set(PACKAGE_DATA) <= members, sorted(set(PACKAGE_DATA) - members)
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = set(wheel.namelist())
        assert set(PACKAGE_DATA) <= names, sorted(set(PACKAGE_DATA) - names)
        for name in NETWORKS:   # byte-identical to the checkout's, not an empty placeholder
            shipped = (REPO / f"icegrid/checkpoints/{name}-small.pt").read_bytes()
            assert wheel.read(f"icegrid/checkpoints/{name}-small.pt") == shipped
    # Nothing outside the package: a top-level config/ or checkpoints/ would land in site-packages/.
    assert {name.split("/")[0] for name in names} == {"icegrid", "icegrid-0.1.0.dist-info"}


INSTALLED_RUN = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import icegrid, torch
    from icegrid import config
    from icegrid.inference import infer_shard
    from icegrid.models import registry
    from icegrid.preprocess import discover_batches, preprocess_shard
    from icegrid.simulate import write_dataset
    from icegrid.store import EventStore
    from icegrid.geometry import icecube86

    torch.set_num_threads(1)
    write_dataset(Path("data"), batches=1, events_per_batch=60, seed=5)
    EventStore.create("events.zarr", icecube86())
    batch, = discover_batches(Path("data"))
    shard = preprocess_shard(batch, "events.zarr")["shard"]
    summary = infer_shard("events.zarr", shard, "all")["models"]
    print(json.dumps({"icegrid": icegrid.__file__, "config_dir": str(config.CONFIG_DIR),
                      "checkpoints": {m: s.get("checkpoint") for m, s in summary.items()},
                      "n_events": {m: s["n_events"] for m, s in summary.items()},
                      "stored": EventStore("events.zarr").prediction_models(shard)}))
""")


def test_installed_wheel_runs_every_shipped_model_from_outside_the_checkout(built, tmp_path):
    """Installed with pip (non-editable) into a target folder that shadows the editable checkout on
    sys.path; run from an unrelated directory, every model finds its config and its shipped checkpoint
    inside the installed package."""
    target = built["work"] / "site"
    if not target.exists():
        _pip("install", "--no-deps", "--no-index", "-q", "--target", str(target), str(built["wheel"]), cwd=tmp_path)
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    env.pop("ICEGRID_CHECKPOINTS", None)
    run = subprocess.run([sys.executable, "-P", "-c", INSTALLED_RUN], cwd=run_dir, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(result["icegrid"]).is_relative_to(target)
    assert Path(result["config_dir"]) == target / "icegrid" / "config"
    assert sorted(result["stored"]) == sorted(registry.MODEL_NAMES)
    assert set(result["n_events"].values()) == {60}
    for name in NETWORKS:
        assert Path(result["checkpoints"][name]) == target / "icegrid" / "checkpoints" / f"{name}-small.pt"


def test_packaged_defaults_are_read_through_importlib_resources():
    assert (config.CONFIG_DIR / "models.yaml").is_file()
    assert Path(os.fspath(config.CONFIG_DIR)) == REPO / "icegrid" / "config"     # this (editable) checkout
    assert registry.CHECKPOINT_DIR == REPO / "icegrid" / "checkpoints"
    assert not (REPO / "config").exists() and not (REPO / "checkpoints").exists()


def test_user_config_overrides_packaged_defaults_key_by_key(tmp_path, monkeypatch):
    user = tmp_path / "user"
    user.mkdir()
    monkeypatch.setenv("ICEGRID_CONFIG", str(user))
    packaged = registry.settings("dynedge")
    (user / "models.yaml").write_text("models:\n  dynedge:\n    infer_limit: 123\n"
                                      "    presets: {small: {dropout_test_key: 0.5}}\n")
    mine = registry.settings("dynedge")
    assert mine.infer_limit == 123 and packaged.infer_limit != 123
    # Deep merge: the rest of dynedge and of its small preset, and the other models, are the packaged ones.
    assert mine.truncation == packaged.truncation and mine.features == packaged.features
    assert mine.presets["small"] == {**packaged.presets["small"], "dropout_test_key": 0.5}
    assert registry.settings("icemix") == _without_user(monkeypatch, tmp_path, lambda: registry.settings("icemix"))
    # A campaign's overrides still win over the user's file.
    from icegrid.analysis import load_settings

    (user / "analysis.yaml").write_text("bootstrap: {resamples: 7}\n")
    assert load_settings().bootstrap.resamples == 7
    assert load_settings({"bootstrap": {"resamples": 9}}).bootstrap.resamples == 9


def _without_user(monkeypatch, tmp_path, call):
    with monkeypatch.context() as patch:
        patch.setenv("ICEGRID_CONFIG", str(tmp_path / "no-user-config"))
        return call()


def test_default_user_folder_is_xdg_config_home_then_home_dot_config(tmp_path, monkeypatch):
    monkeypatch.delenv("ICEGRID_CONFIG")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    assert config.user_config_dir() == tmp_path / "home" / ".config" / "icegrid"
    folder = config.user_config_dir()
    folder.mkdir(parents=True)
    (folder / "clusters.yaml").write_text("condor: {jobs: 3}\n")
    from icegrid.clusters import load_profile

    assert load_profile("condor").jobs == 3
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config.user_config_dir() == tmp_path / "xdg" / "icegrid"
    assert load_profile("condor").jobs != 3


def test_errors_in_a_user_file_name_that_file(tmp_path, monkeypatch):
    user = tmp_path / "user"
    user.mkdir()
    monkeypatch.setenv("ICEGRID_CONFIG", str(user))
    packaged = str(config.CONFIG_DIR / "models.yaml")
    cases = [("models:\n  dynedge:\n    truncation: sideways\n", "models.models.dynedge.truncation"),
             ("models:\n  icemix: {presets: 3}\n", "models.models.icemix.presets"),
             ("models:\n  dynedge: {typo_key: [\n", "cannot read YAML"),
             ("- a list\n", "top level must be a mapping")]
    for text, expected in cases:
        (user / "models.yaml").write_text(text)
        with pytest.raises(ConfigError) as err:
            registry.settings("dynedge")
        message = str(err.value)
        assert message.startswith(f"{user / 'models.yaml'}: ") and expected in message, message
        assert "\n" not in message and packaged not in message
    # A bad key that a caller's overrides bring still names the defaults (the caller names its own file).
    (user / "models.yaml").write_text("models:\n  dynedge: {infer_limit: 10}\n")
    with pytest.raises(ConfigError, match=r"^.*icegrid/config/models\.yaml: models\.models\.dynedge\.truncation"):
        registry.settings("dynedge", {"models": {"dynedge": {"truncation": "sideways"}}})
    monkeypatch.setenv("ICEGRID_CONFIG", str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match=r"absent: ICEGRID_CONFIG names no directory$"):
        registry.settings("dynedge")


def test_cli_reports_a_bad_user_file_in_one_line(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "models.yaml").write_text("models:\n  dynedge: {infer_limit: many}\n")
    env = {**os.environ, "ICEGRID_CONFIG": str(user)}
    run = subprocess.run([sys.executable, "-m", "icegrid", "models", "--model", "dynedge"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().count("\n") == 0, run.stderr
    assert run.stderr.startswith(f"icegrid: error: {user / 'models.yaml'}: models.models.dynedge.infer_limit")


def test_icegrid_checkpoints_folder_is_used_and_named_when_a_model_is_missing(tmp_path, monkeypatch):
    from icegrid.inference import resolve_model

    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(registry.CHECKPOINT_DIR / "dynedge-small.pt", folder / "dynedge-small.pt")
    monkeypatch.setenv("ICEGRID_CHECKPOINTS", str(folder))
    assert registry.default_checkpoint("baseline") == folder / "dynedge-small.pt"
    assert registry.default_checkpoint("2nd") is None
    with pytest.raises(registry.CheckpointError, match=rf"^{folder / 'icemix-small.pt'}: no checkpoint for model"):
        resolve_model("icemix")
