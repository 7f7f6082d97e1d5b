"""Atomic file writes, the one helper for them: every file icegrid writes for others to read
(summaries, campaign state, scheduler files, credentials, checkpoints, exports, analysis records,
simulated inputs) appears whole under its name or not at all, and a failed write leaves no partial file.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _aside(path: Path) -> Path:
    # Hidden, and unique per process and call: two writers of one file never share a temporary.
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (torch.save, pyarrow):
    renamed over ``path`` when the block ends, removed if it raises."""
    path = Path(path)
    tmp = _aside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path | str, data: bytes | str, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically and durably (fsync before the rename). With ``mode`` (e.g.
    0o600 for credentials) the temporary is created with it, whatever the umask, before any byte is
    written, so no other user ever sees the content."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
    return path
