"""Routing by worker resources: one scheduler, a CPU worker and a "GPU" worker (advertising GPU=1).

The campaign asks for GPU=1 for inference only, so every inference task must land on the GPU worker,
while preprocessing may run on either — the mixed CPU/GPU campaign of a real pool, with the GPU
being a label here (inference itself runs on the CPU in this test).
"""

from __future__ import annotations

import subprocess
import sys

from icegrid.grid import CampaignSpec, run_campaign

from faults import hold_preload
from test_clusters import wait_for

ICEGRID = [sys.executable, "-m", "icegrid"]


def test_inference_runs_only_on_workers_that_advertise_a_gpu(tmp_path):
    from distributed import Client

    from icegrid.simulate import write_dataset

    write_dataset(tmp_path / "sim", batches=4, events_per_batch=200, seed=21)
    scheduler_file = tmp_path / "scheduler.json"
    processes = []

    def start(args, name):
        process = subprocess.Popen(ICEGRID + args, stdout=open(tmp_path / f"{name}.log", "w"),
                                   stderr=subprocess.STDOUT, start_new_session=True)
        processes.append(process)

    hold = str(hold_preload(tmp_path, 0.3))   # 4 tasks holding 0.3 s each: both workers get some
    try:
        start(["scheduler", "--scheduler-file", str(scheduler_file), "--insecure", "--dashboard-address", ":0"], "scheduler")
        wait_for(scheduler_file.exists, 60, "the scheduler file")
        start(["worker", "--scheduler-file", str(scheduler_file), "--name", "cpu-worker", "--no-nanny",
               "--preload", hold], "cpu")
        start(["worker", "--scheduler-file", str(scheduler_file), "--name", "gpu-worker", "--resources", "GPU=1",
               "--no-nanny", "--preload", hold], "gpu")
        with Client(scheduler_file=str(scheduler_file), timeout=30, set_as_default=False) as client:
            wait_for(lambda: len(client.scheduler_info()["workers"]) == 2, 60, "both workers")
            names = {addr: w["name"] for addr, w in client.scheduler_info()["workers"].items()}
        spec = CampaignSpec(inputs=[str(tmp_path / "sim")], store=str(tmp_path / "store.zarr"), models=["linefit"],
                            analysis=False,
                            resources={"preprocess": {}, "inference": {"GPU": 1}},
                            cluster={"profile": "glidein", "scheduler_file": str(scheduler_file)})
        summary = run_campaign(spec, progress=False, echo=lambda line: None)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
    assert summary.ok, summary.failures
    where = {key: names[address] for key, address in summary.placements.items()}
    inference = {k: w for k, w in where.items() if k.startswith("linefit/")}
    assert len(inference) == 4 and set(inference.values()) == {"gpu-worker"}
    # Preprocessing was free to use the CPU worker too (4 tasks holding 0.3 s each on 2 workers).
    assert "cpu-worker" in {w for k, w in where.items() if k.startswith("preprocess/")}
