"""Progress on a log file (not a terminal): `icegrid train` and `icegrid infer` write plain lines every
$ICEGRID_PROGRESS_INTERVAL seconds (done/total, events, events/s, ETA), never a carriage return or an
escape code; infer_shard reports per event chunk; the shared Meter's rate and ETA."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from icegrid.inference import infer_shard
from icegrid.progress import Meter

ICEGRID = [sys.executable, "-m", "icegrid"]
LINE = re.compile(r"progress: (?P<what>.+?) (?P<done>[\d,]+)/(?P<total>[\d,]+) (?P<unit>[\w-]+), "
                  r"(?:(?P<events>[\d,]+) events, )?(?:.+, )?(?P<rate>[\d,]+) events/s, ETA (?P<eta>\S+)$")


@pytest.fixture()
def store(small_store, tmp_path):
    path = tmp_path / "events.zarr"
    shutil.copytree(small_store, path)
    return path


def _run_to_log(args, log, cwd):
    """Run icegrid with stderr going to a real file, as a batch job's log; returns (returncode, stderr text)."""
    with open(log, "w") as handle:
        run = subprocess.run(ICEGRID + [str(a) for a in args], stdout=subprocess.PIPE, stderr=handle, text=True,
                             cwd=cwd, env={**os.environ, "ICEGRID_PROGRESS_INTERVAL": "0"})
    text = log.read_text()
    assert "\r" not in text and "\x1b" not in text
    return run, text


def _progress(text):
    lines = [line for line in text.splitlines() if line.startswith("progress: ")]
    parsed = [LINE.fullmatch(line) for line in lines]
    assert lines and all(parsed), text
    return parsed


def test_train_on_a_log_file_writes_plain_lines_within_each_epoch(store, tmp_path):
    run, text = _run_to_log(["train", "--model", "dynedge", "--store", store, "--out", tmp_path / "d.pt",
                             "--epochs", "1", "--max-events", "100"], tmp_path / "train.log", tmp_path)
    assert run.returncode == 0, text
    lines = _progress(text)
    assert {m["what"] for m in lines} == {"train dynedge epoch 1/1:"}, text
    first = lines
    assert all(m["unit"] == "batches" for m in first) and len(first) >= 2
    done = [int(m["done"]) for m in first]
    assert done == sorted(done) and done[-1] == int(first[-1]["total"]) and first[-1]["eta"] == "0m00s"
    assert int(first[-1]["events"].replace(",", "")) == 2 * 100     # two training shards, 100 events each
    assert "loss " in text and "val mean angle" in run.stdout


def test_infer_on_a_log_file_writes_plain_lines_over_shards(store, tmp_path):
    run, text = _run_to_log(["infer", "--store", store, "--models", "linefit"], tmp_path / "infer.log", tmp_path)
    assert run.returncode == 0, text
    lines = _progress(text)
    assert all(m["what"] == "infer" and m["unit"] == "shards" and m["total"] == "3" for m in lines)
    events = [int(m["events"].replace(",", "")) for m in lines]
    assert events == sorted(events) and events[-1] == 1200 and lines[-1]["done"] == "3"
    assert lines[-1]["eta"] == "0m00s" and int(lines[-1]["rate"].replace(",", "")) > 0
    assert run.stdout.count("linefit: 400 events in") == 3

    again, text = _run_to_log(["infer", "--store", store, "--models", "linefit"], tmp_path / "again.log", tmp_path)
    assert again.returncode == 0 and again.stdout.count("skipped (already there)") == 3
    assert "progress: " not in text          # nothing to do: no rate to report


def test_infer_shard_reports_each_event_chunk(store):
    chunks: list[int] = []
    summary = infer_shard(store, "train_batch_000001", "linefit", chunk_events=150, on_events=chunks.append)
    assert chunks == [150, 150, 100] and summary["n_events"] == 400


def test_meter_rate_counts_its_own_active_time_and_skips_leave_the_total():
    log = io.StringIO()
    os.environ["ICEGRID_PROGRESS_INTERVAL"] = "3600"
    try:
        meter = Meter("infer", 3, "shards", events_total=3000, stream=log, start=False)
    finally:
        del os.environ["ICEGRID_PROGRESS_INTERVAL"]
    time.sleep(0.2)                          # waiting before the start must not count
    meter.start()
    meter.skip(1, events=1000)
    meter.update(0, events=500)
    assert log.getvalue() == ""              # within the interval: quiet
    time.sleep(0.05)
    meter.update(1, events=500)
    meter.update(1, events=1000)             # the last unit: a line whatever the interval
    meter.close()                            # that state was printed: no repeat
    lines = log.getvalue().splitlines()
    assert len(lines) == 1, lines
    m = LINE.fullmatch(lines[0])
    assert m and m["done"] == "3" and m["events"] == "2,000" and m["eta"] == "0m00s"
    assert 2000 / 0.3 < int(m["rate"].replace(",", "")) < 2000 / 0.04
