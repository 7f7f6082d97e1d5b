"""The profiles on dask-jobqueue's terms: the registry, the precedence (flags > campaign > the site's
dask config > icegrid's defaults) in the real job scripts, the worker environment, credentials.

Job scripts come from `icegrid reprocess --dry-run` run as a user would, with and without a site
``jobqueue.yaml`` (``DASK_CONFIG``), and are parsed with the HTCondor bindings (``htcondor2.Submit``).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from icegrid.grid.profiles import PROFILE_NAMES, profile_class
from icegrid.grid.profiles.base import NANNY_ENV_VARIABLE, WORKER_MALLOC_ENV

REPO = Path(__file__).resolve().parent.parent
ICEGRID = [sys.executable, "-m", "icegrid"]

SITE = {"jobqueue": {"htcondor": {
    "cores": 8, "memory": "24GiB", "disk": "50GiB", "log-directory": "/site/logs",
    "job-extra-directives": {"+AccountingGroup": '"icecube.ml"', "requirements": "OpSysMajorVer == 12"},
    "worker-extra-args": ["--lifetime", "2h", "--lifetime-stagger", "4m"]}}}


def test_profiles_are_the_modules_of_the_profiles_package():
    from icegrid.grid.commands import reprocess

    assert PROFILE_NAMES == ("local", "condor", "glidein", "slurm")
    for name in PROFILE_NAMES:
        assert profile_class(name).name == name
    cluster_option = next(p for p in reprocess.params if p.name == "cluster")
    assert tuple(cluster_option.type.choices) == PROFILE_NAMES   # the CLI lists them from the package


def dry_run(tmp_path: Path, *flags: str, site: dict | None = None) -> subprocess.CompletedProcess:
    """`icegrid reprocess --dry-run` on a tiny simulated set, with an optional site jobqueue.yaml."""
    from icegrid.simulate import write_dataset

    if not (tmp_path / "sim").exists():
        write_dataset(tmp_path / "sim", batches=1, events_per_batch=50, seed=1)
    env = {k: v for k, v in os.environ.items() if k != "DASK_CONFIG"}
    if site is not None:
        (tmp_path / "dask").mkdir(exist_ok=True)
        (tmp_path / "dask" / "jobqueue.yaml").write_text(yaml.safe_dump(site))
        env["DASK_CONFIG"] = str(tmp_path / "dask")
    run = subprocess.run(ICEGRID + ["reprocess", "--input", "sim", "--store", "s.zarr", "--models", "linefit",
                                    "--dry-run", *flags], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run


def submit_of(stdout: str):
    import htcondor2

    return htcondor2.Submit(stdout[stdout.index("#!/usr/bin/env condor_submit"):])


def test_a_site_jobqueue_yaml_survives_and_the_campaign_overrides_are_named(tmp_path):
    plain = dry_run(tmp_path, "--cluster", "condor")
    with_site = dry_run(tmp_path, "--cluster", "condor", site=SITE)
    overridden = dry_run(tmp_path, "--cluster", "condor", "--set", "memory=3GiB", "--set",
                         "requirements=TARGET.HasGPU", "--set", "lifetime=50m", site=SITE)

    # No site config: icegrid's defaults (config/clusters.yaml).
    job = submit_of(plain.stdout)
    assert (job["MY.DaskWorkerCores"], job["MY.DaskWorkerMemory"], job["MY.DaskWorkerDisk"]) == ("1", str(2 << 30), str(4 << 30))
    assert "requirements" not in job.keys() and "--lifetime" not in job["Arguments"]
    # The site's jobqueue.yaml, all of it: what a plain HTCondorCluster() would honour.
    job = submit_of(with_site.stdout)
    assert (job["MY.DaskWorkerCores"], job["MY.DaskWorkerMemory"], job["MY.DaskWorkerDisk"]) == \
        ("8", str(24 << 30), str(50 << 30))
    assert job["MY.AccountingGroup"] == '"icecube.ml"' and job["requirements"] == "OpSysMajorVer == 12"
    assert job["LogDirectory"] == "/site/logs" and "--lifetime 2h --lifetime-stagger 4m" in job["Arguments"]
    assert "warning" not in with_site.stderr
    # What the campaign itself always sets: its tag, TLS, the worker environment; never dummy names.
    for run in (plain, with_site):
        job = submit_of(run.stdout)
        assert job["MY.IcegridCampaign"] == '"dry-run-condor"' and "--tls-ca-file" in job["Arguments"]
        assert NANNY_ENV_VARIABLE in job["Arguments"] and "dummy-name" not in run.stdout
        assert "--name icegrid-condor-0" in job["Arguments"] and job["batch_name"] == "icegrid-condor-0"
    # Flags beat the site; each site value they replace is named in a warning, the rest stays.
    job = submit_of(overridden.stdout)
    assert job["MY.DaskWorkerMemory"] == str(3 << 30) and job["MY.DaskWorkerCores"] == "8"
    assert job["requirements"] == "TARGET.HasGPU" and job["MY.AccountingGroup"] == '"icecube.ml"'
    assert "--lifetime 50m" in job["Arguments"] and "--lifetime 2h" not in job["Arguments"]
    warnings = [line for line in overridden.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 3, overridden.stderr
    assert any("memory=3GiB (campaign) replaces jobqueue.htcondor.memory=24GiB" in w for w in warnings)
    assert any("requirements = TARGET.HasGPU replaces requirements = OpSysMajorVer == 12" in w for w in warnings)
    assert any("--lifetime replaces '--lifetime 2h'" in w for w in warnings)
    assert not (tmp_path / "s.zarr.campaign").exists() and not (tmp_path / "s.zarr").exists()  # nothing made


def test_slurm_job_script_takes_the_site_partition_and_exports_the_worker_malloc_env(tmp_path):
    site = {"jobqueue": {"slurm": {"queue": "gpu", "account": "icecube", "walltime": "04:00:00",
                                   "job-extra-directives": ["--qos=long", "--constraint=a100"]}}}
    run = dry_run(tmp_path, "--cluster", "slurm", "--set", "sbatch_extra=['--qos=short']", site=site)
    script = run.stdout[run.stdout.index("#!/usr/bin/env bash"):]
    for line in ("#SBATCH -p gpu", "#SBATCH -A icecube", "#SBATCH -t 04:00:00", "#SBATCH --constraint=a100",
                 "#SBATCH --qos=short", "#SBATCH -J icegrid-dry-run-slurm"):
        assert line in script, line
    assert "--qos=long" not in script and "the campaign's --qos replaces '--qos=long'" in run.stderr
    # The prologue line, run by a real shell, gives dask exactly WORKER_MALLOC_ENV (keys' case kept) on
    # top of distributed's own pre-spawn environment.
    export = next(line for line in script.splitlines() if line.startswith(f"export {NANNY_ENV_VARIABLE}="))
    probe = ("import dask, distributed, json; "
             "print(json.dumps(dask.config.get('distributed.nanny.pre-spawn-environ')))")
    out = subprocess.run(["sh", "-c", f"{export}; {sys.executable} -c \"{probe}\""], capture_output=True,
                         text=True, check=True).stdout
    environ = yaml.safe_load(out)
    assert {k: str(environ[k]) for k in WORKER_MALLOC_ENV} == WORKER_MALLOC_ENV
    assert str(environ["OMP_NUM_THREADS"]) == "1"


def test_local_workers_run_with_the_worker_malloc_env(tmp_path):
    """A spawned LocalCluster worker (a real nanny child process) sees WORKER_MALLOC_ENV."""
    from icegrid.grid.profiles import load_profile
    from icegrid.grid.profiles.base import wait_for_workers

    profile = profile_class("local")(load_profile("local", {"workers": 1, "dashboard_address": ":0"}), "local", tmp_path)
    pool = profile.start()
    try:
        pool.scale(1)
        assert wait_for_workers(pool.client, 1, 60) == 1
        environ = pool.client.submit(lambda: dict(os.environ), pure=False).result(timeout=60)
        pid = pool.client.submit(os.getpid, pure=False).result(timeout=60)
    finally:
        pool.close()
    assert pid != os.getpid()
    assert {k: environ.get(k) for k in WORKER_MALLOC_ENV} == WORKER_MALLOC_ENV
    assert environ.get("OMP_NUM_THREADS") == "1"     # distributed's own pre-spawn settings stay


def test_glidein_sh_passes_nat_addresses_scratch_and_extra_arguments(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done\n")
    fake_python.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "ICEGRID_SCHEDULER_FILE": "/s.json", "ICEGRID_PYTHON": str(fake_python),
           "ICEGRID_LISTEN_ADDRESS": "tcp://0.0.0.0:40000", "ICEGRID_CONTACT_ADDRESS": "tcp://203.0.113.5:40000",
           "ICEGRID_NWORKERS": "2", "_CONDOR_SCRATCH_DIR": "/scratch/slot1"}
    out = subprocess.run(["sh", str(REPO / "condor/glidein.sh"), "--preload", "my module.py"], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[:3] == ["-m", "icegrid", "worker"]
    for flag, value in (("--listen-address", "tcp://0.0.0.0:40000"), ("--contact-address", "tcp://203.0.113.5:40000"),
                        ("--nworkers", "2"), ("--local-directory", "/scratch/slot1")):
        assert out[out.index(flag) + 1] == value, flag
    assert out[-2:] == ["--preload", "my module.py"]       # passed through, last, as given


def test_icegrid_worker_command_has_the_nat_flags_and_passes_the_rest_on():
    from icegrid.grid.worker import worker_command

    cmd = worker_command(address="tcp://10.0.0.1:8786", contact_address="tcp://203.0.113.5:40000",
                         listen_address="tcp://0.0.0.0:40000", interface="eth0", nworkers=3,
                         local_directory="/scratch", extra=("--preload", "x.py"))
    pairs = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
    assert pairs["--contact-address"] == "tcp://203.0.113.5:40000" and pairs["--listen-address"] == "tcp://0.0.0.0:40000"
    assert pairs["--interface"] == "eth0" and pairs["--nworkers"] == "3" and pairs["--local-directory"] == "/scratch"
    assert cmd[-2:] == ["--preload", "x.py"]


def test_credentials_have_a_lifetime_and_the_manager_warns_before_they_expire(tmp_path):
    from icegrid.grid.preflight import check_credentials
    from icegrid.security import SecurityError, create_credentials

    warned = []
    short = create_credentials(tmp_path / "short", valid_days=2)
    expires = check_credentials(short, warn=warned.append)
    assert len(warned) == 1 and "expire in 1 d" in warned[0] and str(short) in warned[0]
    assert datetime.timedelta(days=1) < expires - datetime.datetime.now(datetime.timezone.utc) <= datetime.timedelta(days=2)
    assert check_credentials(create_credentials(tmp_path / "long", valid_days=30), warn=warned.append)
    assert len(warned) == 1                                   # 30 days: nothing to say
    expired = create_credentials(tmp_path / "expired", valid_days=1)
    _backdate(expired)
    with pytest.raises(SecurityError, match="expired on"):
        check_credentials(expired)


def _backdate(folder: Path) -> None:
    """Re-sign the folder's certificate so that it expired an hour ago."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    key = serialization.load_pem_private_key((folder / "key.pem").read_bytes(), None)
    cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
    now = datetime.datetime.now(datetime.timezone.utc)
    old = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.subject)
           .public_key(cert.public_key()).serial_number(cert.serial_number)
           .not_valid_before(now - datetime.timedelta(days=2)).not_valid_after(now - datetime.timedelta(hours=1))
           .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(old.public_bytes(serialization.Encoding.PEM))
