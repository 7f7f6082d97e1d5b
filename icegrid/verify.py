"""`icegrid verify`: check a whole store, group by group, and unpublish what must be rebuilt.

A shard is sound when its completeness marker matches its files (:func:`icegrid.integrity.problem`),
every chunk of every array decodes with its ``crc32c`` checksum (read chunk by chunk, so one line names
the first bad chunk) and its offsets agree with each other and with the shard's attributes. Each of its
predictions groups is checked the same way. ``--repair`` unpublishes the bad ones the way a husk is
cleared (renamed into ``.staging`` and deleted, :func:`icegrid.staging.discard`), so the next
``preprocess`` / ``infer`` / ``reprocess`` writes them again; a bad shard takes its predictions with it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import zarr

from icegrid import staging
from icegrid.errors import first_line
from icegrid.shard_arrays import stored_plan

_NESTED = "predictions"


def array_paths(directory: Path) -> list[str]:
    """Relative paths of the zarr arrays under ``directory``, not descending into ``predictions/``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        rel = Path(dirpath).relative_to(directory).as_posix()
        if rel == _NESTED:
            dirnames[:] = []
            continue
        dirnames.sort()
        if rel != "." and "zarr.json" in filenames:
            try:
                node = json.loads((Path(dirpath) / "zarr.json").read_bytes()).get("node_type")
            except (OSError, ValueError, AttributeError):
                node = "array"          # unreadable metadata: let zarr say what is wrong
            if node == "array":
                found.append(rel)
                dirnames[:] = []
    return sorted(found)


def read_chunks(directory: Path, rel: str, keep: bool = True) -> tuple[np.ndarray | None, str | None]:
    """Array ``rel`` of the group in ``directory`` read whole, chunk by chunk: (values, None), or
    (None, what is wrong) naming the first chunk that is missing or does not decode. ``keep=False``
    decodes every chunk but keeps none: the values are a zero-memory stand-in of the right shape (a
    shard's pulse arrays need only be sound and the right length, and may not fit in memory twice)."""
    try:
        array = zarr.open_array(Path(directory) / rel, mode="r")
    except Exception as err:   # zarr raises JSON, key and value errors alike on broken metadata
        return None, f"array '{rel}': unreadable metadata ({first_line(err)})"
    out = np.empty(array.shape, dtype=array.dtype) if keep else np.broadcast_to(np.zeros((), array.dtype), array.shape)
    for index in np.ndindex(*array.cdata_shape):
        key = "c/" + "/".join(str(i) for i in index)
        if array.size and not (Path(directory) / rel / key).is_file():
            return None, f"array '{rel}' chunk {key}: missing"
        try:
            block = array.blocks[index]
        except Exception as err:  # whatever the codec raises: checksum mismatch, blosc error, short buffer
            return None, f"array '{rel}' chunk {key}: {first_line(err)}"
        if keep:
            out[tuple(slice(i * c, i * c + n) for i, c, n in zip(index, array.chunks, block.shape))] = block
    return out, None


def offsets_problem(arrays: dict[str, np.ndarray], attrs: dict) -> str | None:
    """What is inconsistent between a shard's offsets, its other arrays and its attributes (None: nothing)."""
    offset = arrays.get("events/offset")
    if offset is None:
        return "no array events/offset"
    n_events, n_pulses = int(attrs.get("n_events", -1)), int(attrs.get("n_pulses", -1))
    if offset.shape != (n_events + 1,):
        return f"events/offset has {offset.shape[0]} entries, the shard has {n_events} events (+1)"
    offset = offset.astype(np.int64)
    if offset[0] != 0 or np.any(np.diff(offset) < 0):
        return "events/offset is not monotone from 0"
    if offset[-1] != n_pulses:
        return f"events/offset ends at {offset[-1]}, the shard has {n_pulses} pulses"
    plan = stored_plan(offset, attrs)
    expected = {"n_pulses": np.diff(offset)}
    if "chunk_events" in attrs:     # version 3: each event's first pulse in the padded pulse arrays
        expected["pulse_start"] = plan.pulse_start()
    for rel, values in arrays.items():
        column = rel.split("/", 1)[1]
        if rel.startswith("events/") and column != "offset" and values.shape[:1] != (n_events,):
            return f"{rel} has {values.shape[0]} entries, the shard has {n_events} events"
        if rel.startswith("events/") and column in expected and not np.array_equal(values, expected[column]):
            return f"{rel} disagrees with events/offset"
        if rel.startswith("pulses/") and values.shape != (plan.stored_pulses,):
            return f"{rel} has {values.shape[0]} pulses, events/offset and the chunk plan say {plan.stored_pulses}"
    return None


def group_problem(directory: Path, check_offsets: bool, n_events: int | None = None) -> str | None:
    """Why the published group in ``directory`` must be rebuilt (None when it is sound)."""
    values = {}
    for rel in array_paths(directory):
        values[rel], problem = read_chunks(directory, rel, keep=not rel.startswith("pulses/"))
        if problem:
            return problem
    attrs = zarr.open_group(directory, mode="r").attrs.asdict()
    if check_offsets:
        return offsets_problem(values, attrs)
    wrong = [r for r, v in values.items() if v.shape[:1] != (n_events,)]
    return f"array '{wrong[0]}' has {values[wrong[0]].shape[0]} events, the shard has {n_events}" if wrong else None


def shard_problems(store, name: str) -> dict[str, str]:
    """``{label: what is wrong}`` for shard ``name`` and its predictions: label ``name`` when the shard
    itself is bad (its predictions go with it), ``name/predictions/<model>`` for a bad predictions group."""
    problem = store.shard_problem(name)
    directory = store.path / "shards" / name
    if problem is None:
        problem = group_problem(directory, check_offsets=True)
    if problem:
        return {name: problem}
    n_events = int(store.shard_attrs(name)["n_events"])
    out = {}
    for model in store._listed(directory / _NESTED):
        found = store.predictions_problem(name, model)
        found = found or group_problem(directory / _NESTED / model, check_offsets=False, n_events=n_events)
        if found:
            out[f"{name}/{_NESTED}/{model}"] = found
    return out


def verify_store(store) -> dict[str, str]:
    """Every bad shard and predictions group of the store, with what is wrong, in shard order."""
    out = {}
    for name in store._listed(store.path / "shards"):
        out.update(shard_problems(store, name))
    return out


def repair(store, labels) -> list[str]:
    """Unpublish the groups named by ``labels`` (from :func:`verify_store`); returns those removed."""
    root = store.path / ".staging"
    root.mkdir(exist_ok=True)
    removed = [label for label in labels if staging.discard(store.path / "shards" / label, root)]
    staging._try_rmdir(root)
    return removed
