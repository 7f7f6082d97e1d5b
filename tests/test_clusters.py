"""Cluster profiles, submit descriptions and the helpers the pool tests share.

The HTCondor submit files (condor/*.sub) and the job script dask-jobqueue generates from a profile are
parsed with the PyPI bindings (``htcondor2.Submit``), offline. The real-pool tests (test_condor.py,
test_slurm.py) use :func:`require_pool`: they skip, saying why, where no pool answers — and fail
instead when ``ICEGRID_REQUIRE_POOLS=1`` (set by .ci/run after .ci/pools.sh started the pools).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from icegrid.clusters import batch_cluster, load_profile
from icegrid.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
POOLS_ENV = Path(os.environ.get("ICEGRID_POOLS_ENV", "/var/tmp/icegrid-pools.env"))
ICEGRID = [sys.executable, "-m", "icegrid"]


# ---------------------------------------------------------------------------------------------- helpers
def pools_env() -> dict[str, str]:
    """What .ci/pools.sh exported (its env file), overridden by the process environment."""
    values = {}
    if POOLS_ENV.exists():
        for line in POOLS_ENV.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                values[key.strip()] = value.strip()
    for key in ("ICEGRID_SUBMIT_USER", "ICEGRID_POOL_SCRATCH"):
        if key in os.environ:
            values[key] = os.environ[key]
    return values


def _run_ok(cmd: list[str], timeout: float = 20) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def pool_problem(kind: str) -> str | None:
    """Why the ``kind`` pool cannot be used from here, or None when it can."""
    if kind == "condor":
        if not shutil.which("condor_submit"):
            return "HTCondor is not installed (run .ci/pools.sh as root)"
        out = _run_ok(["condor_status", "-af", "Name"])
        if not out or not out.strip():
            return "no HTCondor collector/slot answers (start it: .ci/pools.sh)"
        if _run_ok(["condor_q", "-totals"]) is None:
            return "no HTCondor schedd answers condor_q"
    elif kind == "slurm":
        if not shutil.which("sbatch"):
            return "SLURM is not installed (run .ci/pools.sh as root)"
        out = _run_ok(["sinfo", "-h", "-o", "%t"])
        if not out or not any(s.startswith(("idle", "mix", "alloc")) for s in out.split()):
            return f"no SLURM node is up (sinfo: {(out or 'no answer').strip()})"
    if os.geteuid() == 0:
        user = submit_user()
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"running as root and the submit user '{user}' does not exist (run .ci/pools.sh)"
        scratch = Path(pools_env().get("ICEGRID_POOL_SCRATCH", "/srv/icegrid-ci"))
        if not scratch.is_dir() or scratch.stat().st_uid != pwd.getpwnam(user).pw_uid:
            return f"{scratch}: no scratch folder owned by '{user}' (run .ci/pools.sh)"
    return None


def require_pool(kind: str) -> None:
    problem = pool_problem(kind)
    if problem is None:
        return
    if os.environ.get("ICEGRID_REQUIRE_POOLS") == "1":
        pytest.fail(f"{kind} pool required (ICEGRID_REQUIRE_POOLS=1) but {problem}")
    pytest.skip(f"{kind} pool not reachable: {problem}")


def submit_user() -> str:
    """Jobs are submitted as this user: HTCondor refuses to queue jobs for root."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    return pools_env().get("ICEGRID_SUBMIT_USER", "icegrid-ci")


def as_submit_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", submit_user(), "--", *cmd] if os.geteuid() == 0 else cmd


def scratch_dir(label: str, tmp_path: Path) -> Path:
    """A folder the submit user owns and the jobs can see (not /tmp: HTCondor jobs get a private one)."""
    if os.geteuid() != 0:
        base = Path(pools_env().get("ICEGRID_POOL_SCRATCH", tmp_path))
    else:
        base = Path(pools_env().get("ICEGRID_POOL_SCRATCH", "/srv/icegrid-ci"))
    path = base / f"{label}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    if os.geteuid() == 0:
        shutil.chown(path, submit_user(), submit_user())
    return path


def remove_scratch_unless_failed(path: Path, request, failures_before: int) -> None:
    """Scratch folders of passing tests go; a failing test's stays for its logs (named in the failure)."""
    if request.session.testsfailed == failures_before:
        shutil.rmtree(path, ignore_errors=True)


def run_icegrid(args: list[str], cwd: Path, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(as_submit_user(ICEGRID + args), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def reference_store(dataset: Path, models: list[str], path: Path, checkpoints: dict[str, str] | None = None) -> Path:
    """The undisturbed result: every shard preprocessed and inferred serially in this process."""
    from icegrid.inference import infer_shard
    from icegrid.preprocess import discover_batches, find_geometry, preprocess_shard
    from icegrid.store import EventStore

    import torch

    store = EventStore.create(path, find_geometry(dataset))
    # One math thread, as every worker runs (distributed's OMP_NUM_THREADS=1): an earlier in-process test
    # may have left torch on more, and another GEMM split rounds a few angles differently (~1e-7 rad).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for batch in discover_batches(dataset):
            shard = preprocess_shard(batch, path)["shard"]
            for model in models:
                infer_shard(path, shard, model, checkpoint=(checkpoints or {}).get(model))
    finally:
        torch.set_num_threads(threads)
    assert store.shards()
    return path


def frozen_checkpoints(models: list[str], folder: Path) -> dict[str, str]:
    """Copies of the shipped checkpoints, so a test's campaign and its reference use the same weights
    even if icegrid/checkpoints/ is rewritten meanwhile (e.g. by a training test)."""
    from icegrid.models.registry import default_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    copies = {}
    for model in models:
        source = default_checkpoint(model)
        if source is not None:
            copies[model] = str(shutil.copy2(source, folder / source.name))
    return copies


def prediction_files(store: Path) -> dict[str, bytes]:
    """Every prediction chunk of a store, by path: equal dicts mean byte-identical predictions."""
    return {str(p.relative_to(store)): p.read_bytes()
            for p in sorted(store.glob("shards/*/predictions/**/*")) if p.is_file() and p.name != "zarr.json"}


def assert_every_event_predicted(store_path: Path, reference: Path, models: list[str]) -> None:
    from icegrid.store import EventStore

    store, ref = EventStore(store_path), EventStore(reference)
    assert store.shards() == ref.shards()
    for shard in store.shards():
        n_events = store.shard_attrs(shard)["n_events"]
        assert store.prediction_models(shard) == sorted(models), shard
        for model in models:
            assert store.read_predictions(shard, model)["azimuth"].shape == (n_events,)
    got, want = prediction_files(store_path), prediction_files(reference)
    assert sorted(got) == sorted(want)
    different = [name for name in want if got[name] != want[name]]
    # Byte-identical is the rule; a network's prediction computed in another worker process may round a
    # handful of angles differently (~1e-7 rad, seen once in CI, cause open: issue 13), so a differing
    # file must still agree to float rounding, event by event.
    for shard, model in sorted({(n.split("/")[1], n.split("/")[3]) for n in different}):
        from icegrid.models.layers import opening_angle_np

        a, b = store.read_predictions(shard, model), ref.read_predictions(shard, model)
        angle = opening_angle_np(a["azimuth"], a["zenith"], b["azimuth"], b["zenith"])
        assert angle.max() < 1e-6, f"{shard}/{model} differs from the undisturbed run by {angle.max():.2g} rad"
    assert all(n.split("/")[3] != "linefit" for n in different), f"linefit predictions differ: {different[:5]}"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def executing_worker(client, timeout: float = 120) -> str:
    """Address of a worker that is executing a shard task right now (not merely assigned one)."""
    def _executing(dask_worker) -> list[str]:
        # Nested on purpose: shipped by value, since batch-job workers cannot import the tests.
        return [str(ts.key) for ts in dask_worker.state.executing]

    def find():
        try:
            running = client.run(_executing)
        except Exception:  # a worker went away between listing and asking: look again
            return None
        busy = [address for address, keys in running.items() if keys]
        return busy[0] if busy else None
    return wait_for(find, timeout, "a worker executing a shard", interval=0.1)


def scheduler_client(campaign_dir: Path, pool: str, tls: bool):
    """A client on a running campaign's scheduler (the manager writes scheduler-<pool>.json)."""
    from distributed import Client

    from icegrid.security import campaign_security

    info_file = campaign_dir / f"scheduler-{pool}.json"
    wait_for(info_file.exists, 120, f"{info_file}")
    address = json.loads(info_file.read_text())["address"]
    return Client(address, security=campaign_security(campaign_dir / "tls") if tls else None, timeout=30,
                  set_as_default=False)


FROZEN_SPEC = """\
name: frozen-{profile}
inputs: [sim]
store: store.zarr
models: []
analysis: false
timeout_task_s: {limit}
cluster: {{profile: {profile}, jobs: 1, memory: 1GiB, poll_seconds: 1, dashboard_address: ":0"}}
"""


def run_with_a_frozen_batch_worker(work: Path, profile: str, limit: float, in_queue) -> dict:
    """A preprocess campaign on one worker job of a real pool (``sim`` in ``work``), whose worker process
    is SIGSTOPped mid-shard; ``in_queue(job_id)`` says whether a job is still in the batch queue, looked
    at twice a second until the campaign ends. Returns its exit code, log, the frozen worker's job id,
    and the seconds from the freeze to that job leaving the queue (None: never) and to the end."""
    from faults import batch_job_of, liveness_dask_config, pids

    faults = work / "faults"
    env = liveness_dask_config(faults, seconds=2.0)   # each shard holds 2 s once its attempt is announced
    if os.geteuid() == 0:
        shutil.chown(faults, submit_user(), submit_user())   # the jobs' workers write their pids there
    (work / "campaign.yaml").write_text(FROZEN_SPEC.format(profile=profile, limit=limit))
    log = open(work / "run.log", "w")
    manager = subprocess.Popen(as_submit_user(ICEGRID + ["reprocess", "campaign.yaml", "--no-progress"]),
                               cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    frozen, gone_after = None, None
    try:
        wait_for(lambda: pids(faults / "running") or manager.poll() is not None, 120, "a worker job's first shard")
        if manager.poll() is not None:
            raise AssertionError(f"the campaign ended early:\n{(work / 'run.log').read_text()[-3000:]}")
        frozen = min(pids(faults / "running"))
        job = batch_job_of(frozen)
        time.sleep(0.5)                                      # mid-shard, its attempt announced
        os.kill(frozen, signal.SIGSTOP)
        stopped_at = time.monotonic()
        while manager.poll() is None and time.monotonic() - stopped_at < 180:
            if gone_after is None and not in_queue(job):
                gone_after = time.monotonic() - stopped_at
            time.sleep(0.5)
        took = time.monotonic() - stopped_at
    finally:
        if manager.poll() is None:
            os.killpg(manager.pid, signal.SIGKILL)   # the manager and its runuser, one session
        manager.wait()
        log.close()
        if frozen is not None and Path(f"/proc/{frozen}").exists():
            os.kill(frozen, signal.SIGKILL)
    return {"returncode": manager.returncode, "log": (work / "run.log").read_text(), "job": job,
            "gone_after": gone_after, "took": took}


# ---------------------------------------------------------------------------------------------- tests
def test_profiles_merge_overrides_and_reject_unknown_keys():
    condor = load_profile("condor", {"gpus": 1, "resources": {"GPU": 1}, "jobs": 7})
    assert (condor.gpus, condor.jobs, condor.resources, condor.tls) == (1, 7, {"GPU": 1.0}, True)
    assert load_profile("slurm").walltime == "01:00:00"
    with pytest.raises(ConfigError, match=r"^gpu: Extra inputs are not permitted$"):
        load_profile("condor", {"gpu": 1})     # the campaign's key is named, not config/clusters.yaml
    with pytest.raises(ConfigError, match="unknown cluster profile 'pbs'"):
        load_profile("pbs")


@pytest.mark.parametrize("sub_file", sorted((REPO / "condor").glob("*.sub")), ids=lambda p: p.name)
def test_condor_submit_files_parse(sub_file):
    import htcondor2

    submit = htcondor2.Submit(sub_file.read_text())
    assert submit["executable"]
    assert submit["universe"] in ("vanilla", "local")
    if sub_file.name == "worker.sub":
        assert submit["request_gpus"] == "$(GPUS:0)"
        assert "ICEGRID_SCHEDULER_FILE=$(SCHEDULER_FILE)" in submit["environment"]


def test_generated_htcondor_job_script_parses_with_gpus_requirements_and_tls(tmp_path):
    import htcondor2

    from icegrid.security import campaign_security, create_credentials

    settings = load_profile("condor", {"gpus": 1, "resources": {"GPU": 1}, "requirements": "CUDACapability >= 7.0",
                                       "submit_extra": {"+AccountingGroup": '"icecube.ml"'},
                                       "lifetime": "50m", "lifetime_stagger": "5m", "dashboard_address": ":0"})
    security = campaign_security(create_credentials(tmp_path / "tls"))
    cluster = batch_cluster("condor", settings, tmp_path, security)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    submit = htcondor2.Submit(script)
    assert submit["request_gpus"] == "1"
    assert submit["requirements"] == "CUDACapability >= 7.0"
    assert submit["MY.AccountingGroup"] == '"icecube.ml"'
    arguments = submit["Arguments"]
    assert sys.executable in arguments  # the virtualenv's python, not the job's PATH
    for flag in ("--resources", "GPU=1", "--lifetime", "50m", "--tls-ca-file", "--protocol"):
        assert flag in arguments, flag
    assert submit.getQArgs() == ""


def test_generated_slurm_script_requests_gpus_through_gres(tmp_path):
    settings = load_profile("slurm", {"gpus": 2, "resources": {"GPU": 2}, "partition": "gpu",
                                      "sbatch_extra": ["--qos=normal"], "dashboard_address": ":0"})
    cluster = batch_cluster("slurm", settings, tmp_path)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in ("#SBATCH --gres=gpu:2", "#SBATCH -p gpu", "#SBATCH --qos=normal", "#SBATCH -t 01:00:00"):
        assert line in script, line
    assert "--resources GPU=2" in script and sys.executable in script


@pytest.mark.parametrize("processes", [1, 2])
def test_a_stuck_workers_job_is_found_by_the_worker_name_dask_gives_it(tmp_path, processes):
    """The job replacer cancels a stuck worker's job by name: the job's own name with one process, the
    name with dask worker's ``-<i>`` (``--nworkers``, dask-jobqueue's spec group) with several."""
    from icegrid.grid.replacer import job_of

    settings = load_profile("condor", {"processes": processes, "cores": processes, "dashboard_address": ":0"})
    cluster = batch_cluster("condor", settings, tmp_path)
    try:
        name = cluster._new_worker_name(0)
        spec = {name: cluster.new_spec, cluster._new_worker_name(1): cluster.new_spec}
        script = cluster.job_script()
    finally:
        cluster.close()
    workers = [name] if processes == 1 else [f"{name}-{i}" for i in range(processes)]
    assert ("--nworkers" in script) == (processes > 1)
    assert [job_of(spec, worker) for worker in workers] == [name] * processes
    assert job_of(spec, f"{name}-{processes}") is None and job_of(spec, "other") is None

def test_glidein_sh_derives_gpus_threads_and_lifetime_from_the_slot(tmp_path):
    """glidein.sh with a fake python that prints its arguments: what the slot gives becomes worker flags."""
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho \"$@\"\n")
    fake_python.chmod(0o755)
    machine_ad = tmp_path / "machine.ad"
    machine_ad.write_text(f"Cpus = 4\nGLIDEIN_ToDie = {int(time.time()) + 1000}\n")
    env = {"PATH": os.environ["PATH"], "ICEGRID_SCHEDULER_FILE": "/shared/s.json", "ICEGRID_TLS_DIR": "/shared/tls",
           "ICEGRID_PYTHON": str(fake_python), "CUDA_VISIBLE_DEVICES": "0,1", "_CONDOR_NPROCS": "4",
           "_CONDOR_MACHINE_AD": str(machine_ad)}
    out = subprocess.run(["sh", str(REPO / "condor/glidein.sh")], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[:5] == ["-m", "icegrid", "worker", "--scheduler-file", "/shared/s.json"]
    assert out[out.index("--nthreads") + 1] == "4"
    assert out[out.index("--resources") + 1] == "GPU=2"
    assert out[out.index("--tls-dir") + 1] == "/shared/tls"
    lifetime = int(out[out.index("--lifetime") + 1].rstrip("s"))
    assert 850 <= lifetime <= 900  # 90% of the ~1000 s the glidein has left
    missing = subprocess.run(["sh", str(REPO / "condor/glidein.sh")], env={"PATH": os.environ["PATH"]},
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "ICEGRID_SCHEDULER_FILE" in missing.stderr


def stop_process(process) -> None:
    """Terminate a test's child process, killing it if it does not leave within 15 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
