"""The campaign spec: a campaign file in workflows/ (YAML), or the same built from `icegrid reprocess` flags.

Flags override the file; a pool's settings override the profile's defaults in icegrid/config/clusters.yaml
(and, for the batch systems, the site's dask config: see :mod:`icegrid.grid.profiles.batch`). Every
mistake is one line naming the campaign file (or "reprocess flags") and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from icegrid.config import ConfigError, read_yaml

# Settings given as text on the command line that must stay text (not parsed as YAML).
_TEXT_SETTINGS = ("profile", "scheduler_file", "tls_dir", "scheduler")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Retries(_Strict):
    lost_worker: int = Field(10, ge=0, description="resubmissions of a shard whose worker vanished")
    errors: int = Field(1, ge=0, description="retries elsewhere of a shard whose function raised")
    memory: int = Field(2, ge=0, description="retries of a shard killed for memory, each on a worker with "
                        "memory_growth times the memory, up to the pool's max_memory")


class StageResources(_Strict):
    preprocess: dict[str, float] = Field(default_factory=dict)
    inference: dict[str, float] | None = Field(None, description="null: {GPU: 1} when device is cuda")


class PoolSpec(BaseModel):
    """One pool: a cluster profile name plus overrides of its defaults (icegrid/config/clusters.yaml)."""

    model_config = ConfigDict(extra="allow")
    profile: str = "local"
    name: str | None = None

    @field_validator("profile")
    @classmethod
    def _known(cls, value: str) -> str:
        from icegrid.grid.profiles import PROFILE_NAMES

        if value not in PROFILE_NAMES:
            raise ValueError(f"unknown cluster profile '{value}' (have {', '.join(PROFILE_NAMES)})")
        return value

    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class CampaignSpec(_Strict):
    """A campaign: which data, which models, which pools, and how hard to try."""

    name: str = "campaign"
    inputs: list[str] = Field(..., min_length=1, description="simulation sets / Kaggle roots or split folders")
    input_format: Literal["kaggle", "graphnet"] = Field("kaggle", description="graphnet: SQLite/parquet datasets "
                                                        "of graphnet's converters (icegrid.graphnet)")
    pulsemap: str | None = Field(None, description="graphnet: the pulse-map table to read")
    events_per_shard: int = Field(200_000, ge=1, description="graphnet SQLite: events per shard")
    store: str
    models: list[str] = Field(default_factory=lambda: ["linefit"], description="model names, or ['all']")
    checkpoints: dict[str, str] = Field(default_factory=dict, description="model -> checkpoint file")
    device: Literal["cpu", "cuda"] = "cpu"
    cluster: PoolSpec | None = None
    pools: list[PoolSpec] = Field(default_factory=list, description="several pools draining one list")
    resources: StageResources = Field(default_factory=StageResources)
    retries: Retries = Field(default_factory=Retries)
    analysis: bool = True
    analysis_dir: str | None = Field(None, description="null: <campaign_dir>/analysis")
    campaign_dir: str | None = Field(None, description="TLS credentials, logs, summary; null: <store>.campaign")
    timeout_workers_s: float = Field(600, gt=0, description="give up if no worker joins within this")
    timeout_resources_s: float | None = Field(None, gt=0, description="give up if no worker offers a resource "
                                              "a stage asks for (e.g. GPU) for this long; null: timeout_workers_s")
    timeout_task_s: float | None = Field(7200, gt=0, description="a shard running longer than this on one worker "
                                         "has a stuck worker: it is retired and the shard requeued; null: no limit")
    timeout_idle_s: float | None = Field(600, gt=0, description="end the campaign (one line) when its pools have "
                                         "had no worker, or no shard start or finish, for this long; null: never")

    @model_validator(mode="after")
    def _pulsemap_for_graphnet(self):
        if self.input_format == "graphnet" and not self.pulsemap:
            raise ValueError("input_format graphnet needs a pulsemap (the pulse-map table, e.g. SRTInIcePulses)")
        return self

    @model_validator(mode="after")
    def _one_pool_list(self):
        if self.cluster is not None and self.pools:
            raise ValueError("give either 'cluster' or 'pools', not both")
        if self.cluster is None and not self.pools:
            self.cluster = PoolSpec()
        return self

    def pool_list(self) -> list[PoolSpec]:
        return list(self.pools) if self.pools else [self.cluster]

    def pool_names(self) -> list[str]:
        specs = self.pool_list()
        return [p.name or (p.profile if len(specs) == 1 else f"{p.profile}{i}") for i, p in enumerate(specs)]

    def resolve(self, base: Path) -> "CampaignSpec":
        """Relative paths in a spec file are relative to ``base``."""
        def fix(p: str | None) -> str | None:
            return None if p is None else str((base / Path(p).expanduser()).resolve())
        return self.model_copy(update={
            "inputs": [fix(p) for p in self.inputs], "store": fix(self.store),
            "checkpoints": {m: fix(p) for m, p in self.checkpoints.items()},
            "analysis_dir": fix(self.analysis_dir), "campaign_dir": fix(self.campaign_dir)})

    @property
    def campaign_path(self) -> Path:
        return Path(self.campaign_dir) if self.campaign_dir else Path(f"{self.store}.campaign")

    def inference_resources(self) -> dict[str, float]:
        if self.resources.inference is not None:
            return dict(self.resources.inference)
        return {"GPU": 1.0} if self.device == "cuda" else {}

    def pool_settings(self, index: int):
        """The validated settings of one pool (its profile's defaults with the spec's overrides)."""
        from icegrid.grid.profiles import load_profile

        pool = self.pool_list()[index]
        return load_profile(pool.profile, pool.overrides())


def _clean(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Flags not given (None) are dropped; paths become strings."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in (overrides or {}).items() if v is not None}


def _with_pool(data: dict[str, Any], pool: dict[str, Any] | None, where: str) -> dict[str, Any]:
    """Apply cluster flags (``--cluster``, ``--jobs``, ``--set k=v``) to the spec's single pool."""
    import yaml

    pool = _clean(pool)
    pool = {k: (yaml.safe_load(v) if isinstance(v, str) and k not in _TEXT_SETTINGS else v) for k, v in pool.items()}
    if not pool:
        return data
    if data.get("pools"):
        raise ConfigError(f"{where}: the campaign lists several pools; edit them in the file, not with flags")
    current = dict(data.get("cluster") or {})
    if "profile" in pool and pool["profile"] != current.get("profile", "local"):
        current = {}  # another profile: the file's settings were for the old one
    # --jobs means worker processes on a local pool and worker jobs on a batch system; which one is
    # known only here, once the profile (from the flag or from the file) is.
    if "jobs" in pool and pool.get("profile", current.get("profile", "local")) == "local":
        pool["workers"] = pool.pop("jobs")
    current.update(pool)
    return {**data, "cluster": current}


def _validate(data: dict[str, Any], where: str) -> CampaignSpec:
    from pydantic import ValidationError

    try:
        spec = CampaignSpec.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "campaign"
        raise ConfigError(f"{where}: {loc}: {first['msg'].removeprefix('Value error, ')}") from None
    from icegrid.grid.profiles.base import SettingError

    for index in range(len(spec.pool_list())):
        section = "cluster" if spec.cluster is not None else f"pools.{index}"
        try:
            spec.pool_settings(index)
        except SettingError as err:
            # The campaign's own key is named; icegrid/config/clusters.yaml only when the mistake is there.
            raise ConfigError(f"{where}: {section}.{err}") from None
    return spec


def load_spec(path: Path | str, overrides: dict[str, Any] | None = None,
              pool: dict[str, Any] | None = None) -> CampaignSpec:
    """Read and validate a campaign file, with flags applied on top.

    Relative paths in the file are relative to the current directory (campaigns are started from
    the project folder, like every other icegrid command)."""
    from icegrid.config import deep_merge

    path = Path(path)
    data = _with_pool(deep_merge(read_yaml(path), _clean(overrides)), pool, str(path))
    return _validate(data, str(path)).resolve(Path.cwd())


def spec_from_flags(overrides: dict[str, Any], pool: dict[str, Any] | None = None) -> CampaignSpec:
    """The campaign a plain `icegrid reprocess --input ... --store ...` describes."""
    data = _with_pool(_clean(overrides), pool, "reprocess flags")
    if not data.get("inputs") or not data.get("store"):
        raise ConfigError("reprocess: give a campaign file, or --input and --store")
    return _validate(data, "reprocess flags").resolve(Path.cwd())


__all__ = ["CampaignSpec", "PoolSpec", "Retries", "StageResources", "load_spec", "spec_from_flags"]
