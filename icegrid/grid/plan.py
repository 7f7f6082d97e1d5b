"""The plan: shards × stages as shard tasks, and what the store says is already done.

A campaign is ``preprocess`` (one input batch -> one store shard) followed by ``infer`` for every model
(one shard × one model -> predictions). The store is the completion record: every task carries a
``done`` check that asks it (a stat of a published marker, cheap for 10^5 tasks).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

PREPROCESS = "preprocess"


@dataclass
class ShardTask:
    """One unit of work: ``func(*args, **kwargs)`` on a worker, for one shard of one stage."""

    key: str                      # stable across runs: "<stage>/<shard>"
    stage: str                    # "preprocess" or a model name
    shard: str
    func: str                     # "module:function", imported on the worker
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    events: int = 0               # for the progress lines' events/s
    resources: dict[str, float] = field(default_factory=dict)
    after: str | None = None      # key of the task that must finish first
    done: Callable[[], bool] | None = None  # asks storage; True: skip


def list_inputs(inputs: list[str]) -> list[Path]:
    """Every batch file of every input (a root with splits, or a split folder), in a stable order."""
    from icegrid.preprocess import discover_batches

    return [batch for entry in inputs for batch in discover_batches(Path(entry))]


def split_meta_index(batches: list[Path]) -> tuple[dict[Path, int], dict[Path, tuple[int, int]]]:
    """Events per batch and each batch's row range in its split's meta file, from one look at each
    split's meta (its footer, or its batch_id column where the statistics do not tell): a preprocess
    task then reads only its own rows, not the whole meta (which made a split O(batches²))."""
    from icegrid.kaggle import batch_id_of, meta_path_for
    from icegrid.kaggle_meta import meta_row_ranges

    by_meta: dict[Path, list[Path]] = {}
    for batch in batches:
        by_meta.setdefault(meta_path_for(batch), []).append(batch)
    counts: dict[Path, int] = {}
    ranges: dict[Path, tuple[int, int]] = {}
    for meta, members in by_meta.items():
        try:
            rows = meta_row_ranges(meta)
        except Exception:  # unreadable meta: the preprocess task reports it properly
            rows = {}
        rest = []   # rows not contiguous (or no rows): counted here, filtered on batch_id by the task
        for batch in members:
            found = rows.get(batch_id_of(batch))
            if found is None:
                rest.append(batch)
            else:
                ranges[batch], counts[batch] = found, found[1] - found[0]
        counts.update(batch_event_counts(rest) if rest else {})
    return counts, ranges


def batch_event_counts(batches: list[Path]) -> dict[Path, int]:
    """Events per batch from the split's meta file (one column read per split)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from icegrid.kaggle import batch_id_of, meta_path_for

    counts: dict[Path, int] = {}
    by_meta: dict[Path, list[Path]] = {}
    for batch in batches:
        by_meta.setdefault(meta_path_for(batch), []).append(batch)
    for meta, members in by_meta.items():
        try:
            ids = pq.read_table(meta, columns=["batch_id"]).column("batch_id")
            values, freq = pc.value_counts(ids).flatten()
            per_batch = dict(zip(values.to_pylist(), freq.to_pylist()))
        except Exception:  # unreadable meta: the preprocess task reports it properly
            per_batch = {}
        for batch in members:
            counts[batch] = int(per_batch.get(batch_id_of(batch), 0))
    return counts


def preprocess_units(spec) -> list[tuple[str, str, tuple, int, dict]]:
    """``(shard name, function, args, events, kwargs)`` of every preprocess task of the spec's inputs."""
    from icegrid.preprocess import shard_name_for

    store_path = str(spec.store)
    if spec.input_format == "graphnet":
        from icegrid.graphnet import list_sources

        sources = [s for entry in spec.inputs for s in list_sources(entry, spec.pulsemap, spec.events_per_shard)]
        return [(s.name, "icegrid.graphnet:preprocess_graphnet_shard", (s, store_path), s.count, {})
                for s in sources]
    from icegrid.grid.preflight import check_utf8

    batches = list_inputs(spec.inputs)
    check_utf8(batches)
    counts, meta_rows = split_meta_index(batches)
    return [(shard_name_for(b), "icegrid.preprocess:preprocess_shard", (str(b), store_path), counts[b],
             {"meta_rows": meta_rows[b]} if b in meta_rows else {}) for b in batches]


def sticky(check: Callable[[], bool]) -> Callable[[], bool]:
    """``check`` asked until it says True, then remembered: a published group stays published, and a
    campaign asks each task's done-check several times (preflight, start, the manager) — on a finished
    store of 2,000 shards that was three integrity checks of every group."""
    seen = []

    def done() -> bool:
        if not seen and check():
            seen.append(True)
        return bool(seen)
    return done


def plan(spec, models: list[str]) -> list[ShardTask]:
    """preprocess every input batch, then infer every model on every shard."""
    from icegrid.config import ConfigError
    from icegrid.grid.preflight import check_utf8
    from icegrid.store import EventStore

    check_utf8([spec.store, spec.campaign_path, *spec.inputs])
    units = preprocess_units(spec)
    duplicates = [n for n, c in Counter(u[0] for u in units).items() if c > 1]
    if duplicates:
        raise ConfigError(f"{spec.store}: inputs give two batches the same shard name ({duplicates[0]}); "
                          "list each simulation set once")
    store_path = str(spec.store)
    infer_resources = spec.inference_resources()
    # One handle for every done-check; no store yet (a dry run): nothing is done.
    store = EventStore(store_path) if (Path(store_path) / "zarr.json").exists() else None
    has_shard = (lambda n: store.has_shard(n)) if store else (lambda n: False)
    has_predictions = (lambda n, m: store.has_predictions(n, m)) if store else (lambda n, m: False)

    tasks = []
    for name, func, args, events, kwargs in units:
        pre_key = f"{PREPROCESS}/{name}"
        tasks.append(ShardTask(key=pre_key, stage=PREPROCESS, shard=name, func=func, args=args, events=events,
                               kwargs=kwargs,
                               resources=dict(spec.resources.preprocess),
                               done=sticky(lambda n=name: has_shard(n))))
        for model in models:
            tasks.append(ShardTask(
                key=f"{model}/{name}", stage=model, shard=name, func="icegrid.inference:infer_shard",
                args=(store_path, name, model),
                kwargs={"checkpoint": spec.checkpoints.get(model), "device": spec.device},
                events=events, resources=dict(infer_resources), after=pre_key,
                done=sticky(lambda n=name, m=model: has_predictions(n, m))))
    return tasks


def describe(tasks: list[ShardTask]) -> list[str]:
    """The plan as lines: per stage, shards in total and already done, events, resources asked for."""
    rows: dict[str, list] = {}
    for task in tasks:
        row = rows.setdefault(task.stage, [0, 0, 0, task.resources])
        row[0] += 1
        row[1] += bool(task.done is not None and task.done())
        row[2] += task.events
    lines = []
    for stage, (total, done, events, resources) in rows.items():
        asks = ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items())) or "any worker"
        lines.append(f"  {stage:<22} {total:>5} shards, {done:>5} already in the store, {events:>11,} events, "
                     f"runs on: {asks}")
    return lines
