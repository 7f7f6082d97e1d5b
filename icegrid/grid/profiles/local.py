"""``local``: a LocalCluster on this machine (the default profile).

Its scheduler listens on tls://127.0.0.1 and accepts only peers with the campaign's credentials
(``<campaign>/tls``, mode 700), or, started without them (the Python API), with in-memory ones only this
process holds: another user on the machine cannot submit work that would run as the campaign's owner.
"""

from __future__ import annotations

import copy
import os
from functools import cache

from pydantic import Field

from icegrid.grid.profiles.base import WORKER_MALLOC_ENV, Pool, Profile, WorkerSettings


class LocalSettings(WorkerSettings):
    workers: int | None = Field(None, ge=1, description="worker processes; null: one per core")
    memory: str | None = Field(None, description="memory limit per worker; null: share the machine's")


@cache
def _nanny_class():
    """A Nanny that spawns its worker with WORKER_MALLOC_ENV.

    Not ``dask.config.set`` of ``distributed.nanny.pre-spawn-environ`` around the LocalCluster: a
    nanny reads that setting when it is made, which is at every ``scale()`` and every restart, long
    after such a block has ended. The worker's own environment (``env``) gets the same values, since
    the nanny sets it again inside the worker process."""
    from distributed import Nanny

    class IcegridNanny(Nanny):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.pre_spawn_env.update(WORKER_MALLOC_ENV)
            self.env.update(WORKER_MALLOC_ENV)

    return IcegridNanny


class LocalProfile(Profile):
    name = "local"
    Settings = LocalSettings
    shared_filesystem = False   # the workers are this machine's processes

    def wants_tls(self) -> bool:
        return True   # other users of the machine reach its loopback too

    def workers_wanted(self) -> int:
        return self.settings.workers or os.cpu_count() or 1

    def start(self, security=None) -> Pool:
        import dask
        from distributed import Client, LocalCluster

        from icegrid.security import dashboard_address, dashboard_tls_config, security_folder, temporary_security

        s = self.settings
        security = security or temporary_security()
        dashboard = dashboard_address(s.dashboard_address)
        with dask.config.set(dashboard_tls_config(dashboard, security_folder(security))):
            cluster = LocalCluster(n_workers=0, threads_per_worker=s.threads or 1, processes=True,
                                   memory_limit=s.memory or "auto", resources=s.resources or None,
                                   dashboard_address=dashboard, worker_class=_nanny_class(),
                                   worker_dashboard_address=None, security=security)
        try:
            # Never dask's default scheduler: pools close in any order, and a default left behind would
            # send later dask work in the same process (xarray, a notebook) to a closed client.
            client = Client(cluster, security=security, set_as_default=False)
        except BaseException:
            cluster.close()
            raise
        return Pool(self.pool_name, self, client, cluster)

    def bigger_worker_spec(self, cluster, memory: int, resources: dict[str, float]) -> dict:
        spec = copy.deepcopy(cluster.new_spec)
        spec["options"]["memory_limit"] = int(memory)
        spec["options"]["resources"] = {**(spec["options"].get("resources") or {}), **resources}
        return spec


PROFILE = LocalProfile
