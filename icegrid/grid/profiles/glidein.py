"""``glidein``: no jobs are submitted; the campaign connects to a running ``icegrid scheduler``.

Workers join it from any batch system with ``icegrid worker`` (``condor/worker.sub``,
``condor/glidein.sh``), arriving late and leaving at will; they are not the campaign's to scale or stop.
Before connecting, the scheduler's transport is checked against the credentials given (one line for a
mismatch), and a scheduler without TLS is refused unless it listens on loopback (then: a warning) or the
campaign says ``insecure: true``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from icegrid.config import ConfigError
from icegrid.errors import first_line
from icegrid.grid.profiles.base import Pool, Profile, ProfileSettings


class GlideinSettings(ProfileSettings):
    scheduler_file: str | None = Field(None, description="written by `icegrid scheduler`")
    scheduler: str | None = Field(None, description="scheduler address, instead of a file")
    tls_dir: str | None = Field(None, description="the campaign's TLS credentials (icegrid scheduler --tls-dir)")
    insecure: bool = Field(False, description="accept a scheduler without TLS beyond loopback (anyone "
                                              "reaching it can run code as its user)")


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
        address = self.address()
        self.check_transport(address)
        security = campaign_security(s.tls_dir) if s.tls_dir else None
        # Never dask's default scheduler: pools close in any order, and a default left behind would
        # send later dask work in the same process (xarray, a notebook) to a closed client.
        client = Client(address, security=security, timeout="60s", set_as_default=False)
        return Pool(self.pool_name, self, client)

    def address(self) -> str:
        """The scheduler's address, from its file (written by `icegrid scheduler`) or the setting."""
        import json

        s = self.settings
        if not s.scheduler_file:
            return s.scheduler
        try:
            return json.loads(Path(s.scheduler_file).read_text())["address"]
        except FileNotFoundError:
            raise ConfigError(f"{s.scheduler_file}: no scheduler file; start one with "
                              "`icegrid scheduler --scheduler-file FILE --tls-dir DIR`") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{s.scheduler_file}: not a scheduler file ({first_line(err)})") from None

    def check_transport(self, address: str) -> None:
        """SecurityError (one line) for credentials that do not fit the scheduler, or a scheduler anyone
        can use; a warning for an unauthenticated one on loopback (`icegrid scheduler --insecure`)."""
        from icegrid.grid.worker import check_tls
        from icegrid.security import SecurityError, is_loopback

        s = self.settings
        check_tls(address, Path(s.tls_dir) if s.tls_dir else None)
        if s.tls_dir:
            return
        host = address.split("://", 1)[-1].rsplit(":", 1)[0]
        where = s.scheduler_file or address
        if is_loopback(host):
            self.warn(f"scheduler {address} ({where}) has no TLS: any process on this machine can run code on "
                      "its workers; start it with --tls-dir")
        elif s.insecure:
            self.warn(f"scheduler {address} ({where}) has no TLS and listens beyond loopback (insecure: true)")
        else:
            raise SecurityError(f"scheduler {address} ({where}) has no TLS and listens beyond this machine: "
                                "anyone who reaches it can run code on its workers; restart it with "
                                "`icegrid scheduler --tls-dir DIR` and give the campaign --tls-dir DIR")


PROFILE = GlideinProfile
