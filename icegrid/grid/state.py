"""The campaign state file (``<campaign>/state.json``) and `icegrid status`, which reads it.

The manager rewrites the file every couple of seconds while it runs (atomically: write aside, rename)
and once more when it ends, so `icegrid status STORE` shows a running campaign as well as a finished or
killed one: per stage shards done/total and in flight, workers per pool, failures with their reasons.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from icegrid.atomic import write_atomic
from icegrid.config import ConfigError

STATE_FILE = "state.json"


def snapshot(manager, spec, running: bool) -> dict:
    """What `icegrid status` shows, from a running (or just finished) Manager."""
    summary = manager.summary
    pools = {}
    for pool in manager.pools:
        pools[pool.name] = {"profile": pool.profile, "workers": manager.workers_seen.get(pool.name, 0),
                            "in_flight": sum(1 for _, p, _ in manager.in_flight.values() if p is pool),
                            "done": summary.per_pool.get(pool.name, 0), "dashboard": summary.dashboards.get(pool.name)}
    return {
        "name": spec.name, "store": str(spec.store), "pid": os.getpid(), "host": socket.gethostname(),
        "started": manager.started_wall, "updated": time.time(), "running": running,
        "stages": {name: {"total": s.total, "skipped": s.skipped, "done": s.done, "failed": s.failed,
                          "in_flight": s.in_flight} for name, s in summary.stages.items()},
        "pools": pools, "failures": dict(summary.failures), "error_logs": dict(summary.error_logs),
        "retried_lost": summary.retried_lost, "retried_errors": summary.retried_errors,
        "retried_memory": summary.retried_memory,
    }


def write_state(campaign_dir: Path, state: dict) -> None:
    write_atomic(Path(campaign_dir) / STATE_FILE, json.dumps(state, indent=1))


def read_state(store_or_dir: Path) -> tuple[Path, dict]:
    """The state file of a store's campaign (``<store>.campaign``), or of a campaign folder."""
    given = Path(store_or_dir)
    for folder in (Path(f"{given}.campaign"), given):
        if (folder / STATE_FILE).is_file():
            try:
                return folder, json.loads((folder / STATE_FILE).read_text())
            except ValueError as err:
                raise ConfigError(f"{folder / STATE_FILE}: unreadable campaign state ({err})") from None
    raise ConfigError(f"{given}: no campaign state ({given}.campaign/{STATE_FILE}); "
                      "has `icegrid reprocess` run on this store?")


def _alive(state: dict) -> bool:
    if state.get("host") != socket.gethostname():
        return True   # another machine's manager: trust the file's own word
    try:
        os.kill(int(state["pid"]), 0)
        return True
    except (OSError, KeyError, ValueError):
        return False


def render(folder: Path, state: dict) -> list[str]:
    age = time.time() - float(state.get("updated", 0))
    if state.get("running"):
        status = (f"running (manager pid {state['pid']} on {state['host']}, updated {age:.0f} s ago)"
                  if _alive(state) else f"stopped: manager pid {state['pid']} is gone (rerun the same command to finish)")
    else:
        status = "finished" + (", all shards done" if not state.get("failures") else f", {len(state['failures'])} failed")
    lines = [f"campaign {state.get('name')} on {state.get('store')}: {status}",
             f"  {'stage':<22} {'done':>11} {'in flight':>10} {'failed':>7}"]
    for stage, s in state.get("stages", {}).items():
        finished = s["skipped"] + s["done"]
        lines.append(f"  {stage:<22} {finished:>5}/{s['total']:<5} {s['in_flight']:>10} {s['failed']:>7}")
    for name, pool in state.get("pools", {}).items():
        lines.append(f"  pool {name} ({pool['profile']}): {pool['workers']} workers, {pool['in_flight']} in flight, "
                     f"{pool['done']} done" + (f", dashboard {pool['dashboard']}" if pool.get("dashboard") else ""))
    lines.append(f"  retried: {state.get('retried_lost', 0)} after lost workers, "
                 f"{state.get('retried_errors', 0)} after errors, "
                 f"{state.get('retried_memory', 0)} on larger workers after running out of memory")
    for key, reason in sorted(state.get("failures", {}).items()):
        lines.append(f"  FAILED {key}: {reason}")
    for pool, path in state.get("error_logs", {}).items():
        lines.append(f"  tracebacks ({pool}): {path}")
    return lines
