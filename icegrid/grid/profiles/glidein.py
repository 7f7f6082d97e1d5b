"""``glidein``: no jobs are submitted; the campaign connects to a running ``icegrid scheduler``.

Workers join it from any batch system with ``icegrid worker`` (``condor/worker.sub``,
``condor/glidein.sh``), arriving late and leaving at will; they are not the campaign's to scale or stop.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from icegrid.config import ConfigError
from icegrid.grid.profiles.base import Pool, Profile, ProfileSettings


class GlideinSettings(ProfileSettings):
    scheduler_file: str | None = Field(None, description="written by `icegrid scheduler`")
    scheduler: str | None = Field(None, description="scheduler address, instead of a file")
    tls_dir: str | None = Field(None, description="the campaign's TLS credentials (icegrid scheduler --tls-dir)")


class GlideinProfile(Profile):
    name = "glidein"
    Settings = GlideinSettings
    owns_workers = False

    @classmethod
    def load(cls, defaults, overrides):
        settings = super().load(defaults, overrides)
        if not (settings.scheduler_file or settings.scheduler):
            from icegrid.grid.profiles.base import SettingError

            raise SettingError("scheduler_file: glidein needs scheduler_file (--scheduler-file) or scheduler")
        return settings

    def wants_tls(self) -> bool:
        return False   # the scheduler's own credentials are used (tls_dir), none are made

    def offered_resources(self) -> None:
        return None   # what the workers offer is known only when they join

    def start(self, security=None) -> Pool:
        from distributed import Client

        from icegrid.security import campaign_security

        s = self.settings
        security = campaign_security(s.tls_dir) if s.tls_dir else None
        if s.scheduler_file:
            if not Path(s.scheduler_file).exists():
                raise ConfigError(f"{s.scheduler_file}: no scheduler file; start one with "
                                  "`icegrid scheduler --scheduler-file FILE`")
            client = Client(scheduler_file=s.scheduler_file, security=security, timeout="60s")
        else:
            client = Client(s.scheduler, security=security, timeout="60s")
        return Pool(self.pool_name, self, client)


PROFILE = GlideinProfile
