"""The `icegrid` command line: thin wrappers that parse flags, load config and call the library.

Every command's first docstring line is its one-line summary in `icegrid --help`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click


class _OneLineErrors(click.Group):
    """Turn the library's input/store/config errors into one-line CLI errors instead of tracebacks."""

    def invoke(self, ctx):
        from icegrid.config import ConfigError
        from icegrid.geometry import GeometryError
        from icegrid.kaggle import InputError
        from icegrid.store import StoreError

        try:
            return super().invoke(ctx)
        except (InputError, StoreError, ConfigError, GeometryError) as err:
            click.echo(f"icegrid: error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="icegrid")
def main():
    """icegrid: reprocess IceCube neutrino events with the top Kaggle reconstructions on any cluster."""
