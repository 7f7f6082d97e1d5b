"""Preflight: what can be known wrong before a shard starts, said in one line.

* every checkpoint the campaign will use exists and loads (before any pool starts), and predictions
  already in the store under a model's name came from that checkpoint (sha256), since the plan skips them;
* a resource a stage asks for (``--device cuda`` -> ``GPU``) is offered by some pool's workers, when
  the pools say beforehand what their workers offer (the manager times out on the rest);
* the inputs and the store are visible to the workers at the campaign's paths, where the profile
  needs a shared filesystem (checked on the first worker of each pool);
* the campaign's TLS credentials are not expired, with a warning well before they expire;
* every input, split and store path is UTF-8 (shard names and paths go into UTF-8 metadata and Dask
  keys: a name that is not would fail every shard as if its worker were lost).

(Batch submission failures are reported by the pools themselves: see ``Pool.dead_reason``.)
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path

from icegrid.config import ConfigError

log = logging.getLogger("icegrid.grid")
WARN_DAYS = 7        # warn when campaign credentials expire within this many days


def check_utf8(paths) -> None:
    """ConfigError (one line, printable on any terminal) for the first path that is not UTF-8."""
    for path in paths:
        text = os.fspath(path)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raw = os.fsencode(text)
            shown = raw.decode("utf-8", "backslashreplace")
            bad = raw[len(text[:err.start].encode("utf-8", "surrogateescape"))]
            raise ConfigError(f"{shown}: path is not UTF-8 (byte 0x{bad:02x}); rename it: shard names and "
                              "paths are stored as UTF-8") from None


def check_checkpoints(spec, models: list[str]) -> None:
    """Load every checkpoint the campaign's models (maybe tagged) will use; CheckpointError (one line) otherwise."""
    from icegrid.models import registry

    for model in models:
        base = registry.split_tag(model)[0]
        if base == "linefit":
            continue
        path = spec.checkpoints.get(model)
        path = Path(path) if path is not None else registry.default_checkpoint(base)
        if path is None:
            raise registry.CheckpointError(
                f"{registry.CHECKPOINT_DIR / (base + '-small.pt')}: no checkpoint for model '{model}'; "
                f"pass one with --checkpoint {model}=FILE or create it with `icegrid train --model {base}`")
        registry.load_checkpoint(path, base, device="cpu")


def check_stored_predictions(spec, models: list[str]) -> None:
    """Predictions already in the store under a campaign model's name must come from the checkpoint the
    campaign names for it (by sha256): the plan skips them, so another checkpoint's would be kept silently."""
    from icegrid.inference import checkpoint_conflict
    from icegrid.models.registry import CheckpointError, split_tag
    from icegrid.store import EventStore

    if not (Path(spec.store) / "zarr.json").exists():
        return
    store = EventStore(spec.store)
    for model in models:
        for shard in store.shards():
            conflict = store.has_predictions(shard, model) and \
                checkpoint_conflict(store, shard, model, spec.checkpoints.get(model))
            if conflict:
                base = split_tag(model)[0]
                raise CheckpointError(f"{conflict}; give the new checkpoint a tagged name (models: [{base}@TAG], "
                                      f"checkpoints: {{{base}@TAG: FILE}}) or `icegrid infer --overwrite` first")


def check_resources(tasks, profiles) -> None:
    """Fail now when a stage asks for a resource that no pool's workers will offer, as far as the
    pools know before any worker joins (a glidein pool knows only then: the manager waits for it)."""
    offered = [p.offered_resources() for p in profiles]
    if any(o is None for o in offered):
        return
    everything = set().union(*offered)
    for task in tasks:
        missing = sorted(set(task.resources) - everything)
        if missing:
            pools = ", ".join(f"{p.pool_name} offers {', '.join(sorted(o)) or 'none'}" for p, o in zip(profiles, offered))
            raise ConfigError(f"stage {task.stage} asks for resource {missing[0]}, which no pool's workers offer "
                              f"({pools}); give a pool with such workers `resources: {{{missing[0]}: 1}}`")


def _visible(paths: list[str], store: str) -> list[tuple[str, str]]:
    """Run on a worker: (path, "read") for inputs it cannot read, (store, "write") if it cannot write it."""
    bad = [(p, "read") for p in paths if not os.access(p, os.R_OK)]
    folder = store if os.path.exists(store) else os.path.dirname(store)
    if not os.access(folder, os.W_OK):
        bad.append((store, "write"))
    return bad


def check_paths(pool, spec) -> None:
    """Ask one worker of ``pool`` whether it sees the inputs and can write the store."""
    if not pool.profile_obj.shared_filesystem:
        return
    workers = list(pool.workers())
    if not workers:
        return
    try:
        answer = pool.client.run(_visible, list(spec.inputs), str(spec.store), workers=workers[:1])
    except Exception as err:  # the worker left meanwhile: the shards will tell
        log.debug("path check on %s: %s", pool.name, err)
        return
    for worker, bad in answer.items():
        if bad:
            path, what = bad[0]
            raise ConfigError(f"pool {pool.name}: worker {worker} cannot {what} {path}; the inputs and the "
                              "store must be on a filesystem the workers share, at the same paths")


def check_credentials(folder: Path, warn=log.warning) -> datetime.datetime | None:
    """The expiry of a campaign's TLS certificate; SecurityError when it has expired, a warning when
    it expires within WARN_DAYS."""
    from cryptography import x509

    from icegrid.security import CERT_FILE, SecurityError

    path = Path(folder) / CERT_FILE
    if not path.exists():
        return None
    expires = x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc
    left = expires - datetime.datetime.now(datetime.timezone.utc)
    if left.total_seconds() <= 0:
        raise SecurityError(f"{folder}: campaign TLS credentials expired on {expires:%Y-%m-%d %H:%M} UTC; "
                            "delete the folder to create new ones (running workers must be restarted)")
    if left < datetime.timedelta(days=WARN_DAYS):
        warn(f"{folder}: campaign TLS credentials expire in {left.days} d {left.seconds // 3600} h "
             f"({expires:%Y-%m-%d %H:%M} UTC); workers cannot join after that")
    return expires
