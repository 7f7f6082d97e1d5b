"""The analysis cache: an analysis of a store is skipped when nothing it reads, and no option, changed.

The key is a SHA-256 of the options (the models asked for, every analysis setting, icegrid's version)
and of the store's content as the analysis sees it. For each published shard: its group document (the
completeness marker lists every file with its size; the attributes say where the events came from)
and the checksum that ends each chunk of its per-event arrays. For each of its published predictions
groups: the same (the attributes name the checkpoint and its SHA-256). Every chunk of a store array
ends in its crc32c, so a changed value changes the key, yet no array is read: 4 bytes per chunk file.
A group without a marker (a store from before markers) has no such key: its analysis always reruns.

The key and the names of the outputs are kept beside them, in ``.icegrid-analysis.json``; it is removed
before outputs are written and written last, so a run cut short is never taken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from icegrid import integrity
from icegrid.atomic import write_atomic

KEY_FILE = ".icegrid-analysis.json"


def _group_digest(directory: Path, chunks_under: str | None) -> bytes | None:
    """The group document and the last 4 bytes (crc32c) of each listed chunk file below ``chunks_under``
    ('' for every one); None for a group without a marker."""
    document = (directory / "zarr.json").read_bytes()
    marker = json.loads(document).get("attributes", {}).get(integrity.MARKER)
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        return None
    parts = [document]
    for rel, size in marker["files"].items():
        if chunks_under is None or not rel.startswith(chunks_under) or rel.endswith("zarr.json"):
            continue
        fd = os.open(directory / rel, os.O_RDONLY)     # gone since the marker was checked: OSError
        try:
            parts.append(os.pread(fd, 4, max(int(size) - 4, 0)))
        finally:
            os.close(fd)
    return b"".join(parts)


def analysis_key(store_path: Path | str, models: Sequence[str] | None, settings) -> str | None:
    """The key of an analysis of ``store_path`` with ``models`` and ``settings``; None when the store
    has a group without a completeness marker (nothing cheap tells whether it changed)."""
    from icegrid import __version__
    from icegrid.store import EventStore

    store = EventStore(store_path)
    try:
        return _store_digest(store, models, settings, __version__)
    except (OSError, ValueError):   # a group changing under us: no key, the analysis runs
        return None


def _store_digest(store, models, settings, version: str) -> str | None:
    digest = hashlib.sha256(json.dumps({"icegrid": version, "models": list(models) if models else None,
                                        "settings": settings.model_dump(mode="json")}, sort_keys=True).encode())
    for shard in store.shards():
        directory = store.path / "shards" / shard
        models_here = store.prediction_models(shard)
        parts = [_group_digest(directory, "events/")]
        parts += [_group_digest(directory / "predictions" / model, "") for model in models_here]
        if None in parts:
            return None
        for part in (shard.encode(), *(m.encode() for m in models_here), *parts):
            digest.update(len(part).to_bytes(8, "little") + part)     # length-prefixed: no two stores alike
    return digest.hexdigest()


def cached_outputs(out_dir: Path | str, key: str | None) -> dict[str, Path] | None:
    """The outputs of the last analysis written to ``out_dir`` when its key is ``key`` and every one
    of them is still there; else None."""
    if key is None:
        return None
    try:
        record = json.loads((Path(out_dir) / KEY_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("outputs"), dict):
        return None
    paths = {label: Path(out_dir) / name for label, name in record["outputs"].items()}
    return paths if all(path.is_file() for path in paths.values()) else None


def forget(out_dir: Path | str) -> None:
    """Drop the record before outputs are rewritten (a run cut short must not look finished)."""
    try:
        (Path(out_dir) / KEY_FILE).unlink()
    except FileNotFoundError:
        pass


def remember(out_dir: Path | str, key: str | None, paths: dict[str, Path]) -> None:
    """Record ``key`` and the outputs' names (written aside, then renamed into place)."""
    if key is None:
        return
    out_dir = Path(out_dir)
    record = {"key": key, "outputs": {label: Path(os.path.relpath(path, out_dir)).as_posix()
                                      for label, path in paths.items()}}
    write_atomic(out_dir / KEY_FILE, json.dumps(record, indent=1))
