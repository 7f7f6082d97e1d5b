"""Completeness markers and chunk checks: when a shard or a predictions group counts as published.

A writer *seals* a group last, once every array is written: the group's attributes get
``icegrid_complete = {"format": 1, "files": {relative path: size in bytes}}`` listing every file of the
group (array metadata and every chunk; not the group's own ``zarr.json``, and not the predictions that
models publish into a shard later, each sealed on its own). A group is complete when that marker is
there and every listed file exists with its size: a husk (a published directory that lost files, or
never got them) is seen as such, a missing chunk is never read as the fill value, and a truncated one
never reaches the decompressor. A changed byte is caught by the ``crc32c`` codec of every array.

Stores written before markers (store version 1) get a structural check instead: the group's
``n_events`` attribute and the metadata of its required arrays.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import zarr

from icegrid.errors import first_line

MARKER = "icegrid_complete"
MARKER_FORMAT = 1
_NESTED = "predictions"   # models publish into a shard's predictions/ later: not part of the shard's seal


def seal(group: zarr.Group, directory: Path) -> None:
    """Write the completeness marker of the group stored in ``directory`` (call it last)."""
    directory = Path(directory)
    files = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        rel_dir = Path(dirpath).relative_to(directory).as_posix()
        if rel_dir == _NESTED:
            dirnames[:] = []
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel != "zarr.json":
                files[rel] = os.stat(Path(dirpath) / name).st_size
    group.attrs[MARKER] = {"format": MARKER_FORMAT, "files": dict(sorted(files.items()))}


def group_attrs(directory: Path) -> dict:
    """The attributes in ``directory/zarr.json``; ValueError when it is not a readable zarr group."""
    meta = json.loads((Path(directory) / "zarr.json").read_bytes())
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        raise ValueError("not a zarr group document")
    attrs = meta.get("attributes") or {}
    if not isinstance(attrs, dict):
        raise ValueError("attributes are not a mapping")
    return attrs


def problem(directory: Path, legacy_arrays: tuple[str, ...] | None = None) -> str | None:
    """Why the group in ``directory`` is not complete, or None when it is.

    ``legacy_arrays``: in a store that predates markers, the arrays an unmarked group must have;
    None requires the marker.
    """
    directory = Path(directory)
    try:
        attrs = group_attrs(directory)
    except (FileNotFoundError, NotADirectoryError):
        return "no zarr.json"
    except (ValueError, UnicodeDecodeError) as err:
        return f"unreadable zarr.json ({first_line(err)})"
    marker = attrs.get(MARKER)
    if marker is None:
        if legacy_arrays is None:
            return "no completeness marker"
        if "n_events" not in attrs:
            return "no n_events attribute"
        missing = [a for a in legacy_arrays if not (directory / a / "zarr.json").is_file()]
        return f"missing array {missing[0]}" if missing else None
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict):
        return "unreadable completeness marker"
    for rel, size in files.items():
        try:
            actual = os.stat(directory / rel).st_size
        except (FileNotFoundError, NotADirectoryError):
            return f"missing file {rel}"
        if actual != size:
            return f"{rel} has {actual} bytes, its marker says {size}"
    return None


def bad_chunk(array: zarr.Array) -> str:
    """The key (``c/3``) of the first chunk of ``array`` that does not decode, or ``?`` if all do."""
    shape = array.cdata_shape
    for index in np.ndindex(*shape):
        try:
            array.blocks[index]
        except Exception:  # whatever the codec raises: checksum mismatch, blosc error, short buffer
            return "c/" + "/".join(str(i) for i in index)
    return "?"
