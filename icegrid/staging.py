"""Staging leases: who owns an entry under ``<store>/.staging/``, when a cleaner may remove it, and how
a writer publishes it.

A writer builds a shard or a predictions group in ``.staging/<label>+<host>+<pid>+<token>/`` and
publishes it with one ``rename`` (:func:`publish`). It owns the entry through a lease file beside it (same name plus
``.lease``), created *before* the entry and removed *after* it is gone, which the writer holds

* ``flock``-ed for the whole life of the entry: the kernel drops the lock when the process ends,
  however it ends, so on the writer's own host a lock that can be taken means the owner is dead;
* and touched every :data:`HEARTBEAT_S` seconds, because a lock taken on another host proves less
  (NFS mounted with ``local_lock``/``nolock``, Lustre without ``flock``: the lock is local or absent).
  An entry of another host is removed only when its lock can be taken *and* its heartbeat is older
  than :data:`STALE_S` (longer than NFS attribute caching and clock skew together).

The removal itself cannot undo a publication: the cleaner first *renames* the entry to a
``.trash`` name and only then deletes it. Of the writer's rename into ``shards/`` and the cleaner's
rename to trash exactly one succeeds; a writer whose entry was taken gets an error instead of
publishing, and ``rmtree`` never runs inside a published directory. The writer also checks its entry
against the completeness marker just before renaming, so a cleaner racing a writer that was wrongly
judged dead (a frozen NFS client) leaves no husk behind.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

HEARTBEAT_S = 15.0
STALE_S = 300.0
LEGACY_STALE_S = 3600.0   # entries without a lease (older icegrid): removed once this old
FRESH_S = 60.0            # a lease still empty this young is being set up by its writer
LEASE = ".lease"
TRASH = ".trash"
_SEP = "+"
HOST = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname()) or "unknown"


class StagingError(OSError):
    """The writer's own staging entry was taken away before it could publish it."""


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _try_rmdir(path: Path) -> None:
    """Remove ``.staging`` when it is empty: success leaves nothing behind (a busy one stays)."""
    try:
        os.rmdir(path)
    except OSError:
        pass


class Lease:
    """A writer's claim on one staging entry (a context manager giving the entry's path).

    On exit the entry (whatever is left of it: it is gone once published) and the lease are removed.
    """

    def __init__(self, root: Path, label: str):
        self.root = Path(root)
        name = _SEP.join((label, HOST, str(os.getpid()), uuid.uuid4().hex[:12]))
        self.entry = self.root / name
        self.lease_path = self.root / (name + LEASE)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> Path:
        for _ in range(20):
            # A finishing writer may remove an empty .staging between our mkdir and our open.
            try:
                self.root.mkdir(exist_ok=True)
                self._fd = os.open(self.lease_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileNotFoundError:
                continue
            except FileExistsError:   # mkdir saw it, then it was removed before mkdir's own is_dir check
                if self.root.is_file():
                    raise
                continue
        else:
            raise StagingError(errno.ENOENT, f"{self.root}: cannot create a staging lease")
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # no flock on this filesystem: the heartbeat (and, on this host, the PID) vouch for us
        try:
            os.write(self._fd, json.dumps({"host": HOST, "pid": os.getpid(), "started": time.time()}).encode())
        except OSError:  # a full disk: leave no lease behind, and no open descriptor in a long-lived worker
            self._release()
            raise
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease {self.entry.name}", daemon=True)
        self._beat.start()
        return self.entry

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self._fd)
            except OSError:
                pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._beat.join()   # before the close: a late beat must not touch whatever reuses the fd number
        _rmtree(self.entry)
        self._release()

    def _release(self) -> None:
        try:
            self.lease_path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        _try_rmdir(self.root)


def claim(entry: Path, root: Path) -> Path | None:
    """Atomically take ``entry`` out of play (rename it to a trash name in the staging ``root``, never
    beside a published group, where readers would list it); None if it is gone already."""
    trash = Path(root) / f"{entry.name}.{uuid.uuid4().hex[:8]}{TRASH}"
    try:
        os.rename(entry, trash)
    except FileNotFoundError:
        return None
    return trash


def discard(entry: Path, root: Path) -> bool:
    """Remove ``entry`` safely: claim it, then delete the trash. False if someone else moved it first."""
    trash = claim(entry, root)
    if trash is None:
        return False
    _rmtree(trash)
    return True


def publish(entry: Path, target: Path, root: Path, problem, replace: bool = False) -> bool:
    """Rename the sealed ``entry`` to ``target``: True once published, False if another writer's complete
    group got there first. ``problem(path, strict)`` says why a group is not complete (None when it is;
    ``strict`` for our own entry). A husk at ``target`` (or, with ``replace``, anything) is moved aside.
    """
    found = problem(entry, True)
    if found:  # a cleaner took the entry while we wrote (we were judged dead): publish nothing
        raise StagingError(errno.ESTALE, f"staging entry disturbed ({found}), not published")
    target.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(8):
        if target.exists() and (replace or problem(target) is not None):
            # Renamed into .staging first: a concurrent reader or writer never sees half of it.
            discard(target, root)
        try:
            os.rename(entry, target)
            return True
        except FileNotFoundError:
            if not entry.exists():
                raise StagingError(errno.ENOENT, "staging entry removed by another process") from None
            raise
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        # Another writer published first (deterministic content): keep theirs unless it is a husk.
        if not replace and problem(target) is None:
            return False
    raise StagingError(errno.EBUSY, "other writers keep replacing it")


def _owner_of(lease_name: str) -> tuple[str, int] | None:
    parts = lease_name[: -len(LEASE)].rsplit(_SEP, 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead(host: str, pid: int, locked: bool, age: float) -> bool:
    """The ownership rules of the module docstring, for a lease whose lock is free (or unsupported)."""
    if host == HOST:
        return locked or not _pid_alive(pid)   # without flock support, fall back on the PID
    return age > STALE_S


def _reap(root: Path, lease: Path, now: float) -> bool:
    """Remove one lease's entry if its owner is dead; True if something was removed."""
    owner = _owner_of(lease.name)
    if owner == (HOST, os.getpid()):
        # Ours, and live while we run. (And on NFS, where flock is a POSIX lock, our own probe would
        # succeed and its close would drop our writer's lock.)
        return False
    try:
        fd = os.open(lease, os.O_RDWR)
    except FileNotFoundError:   # the owner finished meanwhile
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False            # held: a live writer, whatever its host
            locked = False              # the filesystem has no flock
        try:
            stat = os.stat(lease)
        except FileNotFoundError:
            return False
        if stat.st_ino != os.fstat(fd).st_ino:   # unlinked and recreated under us: not the one we judged
            return False
        if stat.st_size == 0 and now - stat.st_mtime < FRESH_S:
            return False      # just created, its writer about to lock it (it writes its owner after the lock)
        host, pid = owner if owner else ("?", -1)
        if not _dead(host, pid, locked, now - stat.st_mtime):
            return False
        discard(root / lease.name[: -len(LEASE)], root)
        try:
            lease.unlink()          # while we hold its lock, so no other cleaner judges it again
        except FileNotFoundError:
            pass
        return True
    finally:
        os.close(fd)


def clean(root: Path) -> int:
    """Remove the staging entries of dead writers (see the module docstring); returns how many.

    Safe to call at any time, from any host, while other writers run.
    """
    root = Path(root)
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return 0
    now = time.time()
    removed = 0
    for name in names:
        path = root / name
        if name.endswith(TRASH):            # claimed by a cleaner that died: nobody will rename it
            _rmtree(path)
            removed += 1
        elif name.endswith(LEASE):
            removed += _reap(root, path, now)
        elif not (root / (name + LEASE)).exists():
            # No lease: left by an older icegrid, whose writer could still be running: only an old one goes.
            try:
                old = now - path.stat().st_mtime > LEGACY_STALE_S
            except FileNotFoundError:
                continue
            if old:
                removed += discard(path, root)
    _try_rmdir(root)
    return removed
