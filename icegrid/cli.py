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


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120, "terminal_width": 120})
@click.version_option(package_name="icegrid")
def main():
    """icegrid: reprocess IceCube neutrino events with the top Kaggle reconstructions on any cluster."""


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output root of the Kaggle layout.")
@click.option("--batches", type=click.IntRange(min=1), default=1, show_default=True, help="Number of batch files.")
@click.option("--events-per-batch", type=click.IntRange(min=1), default=200_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed -> byte-identical files.")
@click.option("--split", default="train", show_default=True, help="Split name: <out>/<split>/batch_N.parquet.")
@click.option("--first-batch", type=click.IntRange(min=0), default=1, show_default=True)
def simulate(out, batches, events_per_batch, seed, split, first_batch):
    """Simulate events with full truth in the Kaggle layout (batch parquet, meta, sensor geometry)."""
    import time

    from tqdm import tqdm

    from icegrid.simulate import write_dataset

    started = time.perf_counter()
    totals = {"events": 0, "pulses": 0}
    with tqdm(total=batches, unit="batch", desc="simulate", dynamic_ncols=True) as bar:
        def progress(batch):
            totals["events"] += batch.n_events
            totals["pulses"] += int(batch.sensor_id.shape[0])
            bar.update(1)
            bar.set_postfix_str(f"{totals['pulses'] / (time.perf_counter() - started):,.0f} pulses/s")

        write_dataset(out, batches, events_per_batch, seed, split=split, first_batch=first_batch,
                      progress=progress)
    click.echo(f"wrote {totals['events']:,} events ({totals['pulses']:,} pulses) in {batches} batch(es) to {out}")


@main.command()
@click.option("--input", "input_dir", type=click.Path(path_type=Path), required=True,
              help="Kaggle-layout root (with <split>/ and <split>_meta.parquet) or one split directory.")
@click.option("--store", "store_path", type=click.Path(path_type=Path), required=True, help="Event store (.zarr).")
@click.option("--cluster", type=click.Choice(["local"]), default="local", show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True)
def preprocess(input_dir, store_path, cluster, workers):
    """Convert Kaggle batch files into event-store shards, one Dask task per batch (resumable)."""
    from distributed import Client, LocalCluster

    from icegrid.preprocess import run_preprocess

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
            Client(lc) as client:
        report = run_preprocess(input_dir, store_path, client)
    skipped = sum(1 for d in report.done if d["skipped"])
    click.echo(f"{store_path}: {len(report.done) - skipped} shard(s) written, {skipped} already there, "
               f"{len(report.failed)} failed")
    for source, message in report.failed:
        click.echo(f"icegrid: error: {message}", err=True)
    if report.failed:
        sys.exit(2)


@main.command()
@click.argument("store_path", type=click.Path(path_type=Path))
def info(store_path):
    """Summarise an event store: shards, events, pulses and the models with predictions."""
    from icegrid.store import EventStore

    summary = EventStore(store_path).summary()
    click.echo(f"{summary['path']}: {summary['shards']} shard(s), {summary['events']:,} events, "
               f"{summary['pulses']:,} pulses; predictions: {', '.join(summary['models']) or 'none'}")
