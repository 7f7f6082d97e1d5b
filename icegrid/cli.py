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
        from icegrid.security import SecurityError
        from icegrid.store import StoreError

        try:
            return super().invoke(ctx)
        except (InputError, StoreError, ConfigError, GeometryError, SecurityError) as err:  # CheckpointError is an InputError
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
    from icegrid.progress import Meter
    from icegrid.simulate import write_dataset

    totals = {"events": 0, "pulses": 0}
    # A bar on a terminal; on a log file a plain line every $ICEGRID_PROGRESS_INTERVAL seconds.
    with Meter("simulate", batches, "batches") as meter:
        def progress(batch):
            totals["events"] += batch.n_events
            totals["pulses"] += int(batch.sensor_id.shape[0])
            meter.update(1, events=batch.n_events)

        write_dataset(out, batches, events_per_batch, seed, split=split, first_batch=first_batch,
                      progress=progress)
    click.echo(f"wrote {totals['events']:,} events ({totals['pulses']:,} pulses) in {batches} batch(es) to {out}")


@main.command()
@click.option("--input", "input_dir", type=click.Path(path_type=Path), required=True,
              help="Kaggle-layout root (with <split>/ and <split>_meta.parquet) or one split directory; "
                   "with --format graphnet: a GraphNeT SQLite file (DB.db) or parquet dataset folder.")
@click.option("--store", "store_path", type=click.Path(path_type=Path), required=True, help="Event store (.zarr).")
@click.option("--format", "input_format", type=click.Choice(["kaggle", "graphnet"]), default="kaggle",
              show_default=True, help="Input layout: the Kaggle competition's, or GraphNeT's SQLite/parquet.")
@click.option("--pulsemap", default=None, help="graphnet: the pulse-map table to read (e.g. SRTInIcePulses).")
@click.option("--events-per-shard", type=click.IntRange(min=1), default=200_000, show_default=True,
              help="graphnet SQLite: events per shard (parquet: one shard per batch file).")
@click.option("--cluster", type=click.Choice(["local"]), default="local", show_default=True,
              help="Batch systems: `icegrid reprocess --models none --cluster condor|slurm|glidein`.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--progress/--no-progress", default=True, help="Progress bar on stderr.")
def preprocess(input_dir, store_path, input_format, pulsemap, events_per_shard, cluster, workers, progress):
    """Convert Kaggle batch files (or GraphNeT datasets) into event-store shards, one Dask task each (resumable)."""
    from icegrid.grid.campaign import run_campaign
    from icegrid.grid.commands import grid_logging
    from icegrid.grid.plan import PREPROCESS
    from icegrid.grid.spec import spec_from_flags

    if input_format == "graphnet" and not pulsemap:
        raise click.UsageError("--format graphnet needs --pulsemap (the pulse-map table, e.g. SRTInIcePulses)")
    # A campaign with no model and no analysis: the same driver (skip what the store has, retry
    # shards whose worker died, report failures) as `icegrid reprocess`.
    spec = spec_from_flags({"name": "preprocess", "inputs": [str(input_dir)], "store": store_path, "models": [],
                            "analysis": False, "input_format": input_format, "pulsemap": pulsemap,
                            "events_per_shard": events_per_shard},
                           {"profile": cluster, "workers": workers, "threads": 1})
    grid_logging()
    summary = run_campaign(spec, progress=progress, echo=lambda line: None)
    stage = summary.stages.get(PREPROCESS)
    written, skipped, failed = (stage.done, stage.skipped, stage.failed) if stage else (0, 0, 0)
    click.echo(f"{store_path}: {written} shard(s) written, {skipped} already there, {failed} failed")
    for key, reason in sorted(summary.failures.items()):
        click.echo(f"icegrid: error: {key}: {reason}", err=True)
    if summary.failures:
        sys.exit(2)


@main.command()
@click.argument("store_path", type=click.Path(path_type=Path))
def info(store_path):
    """Summarise an event store: shards, events, pulses and the models with predictions."""
    from icegrid.store import EventStore

    summary = EventStore(store_path).summary()
    click.echo(f"{summary['path']}: {summary['shards']} shard(s), {summary['events']:,} events, "
               f"{summary['pulses']:,} pulses; predictions: {', '.join(summary['models']) or 'none'}")


@main.command()
@click.argument("store_path", type=click.Path(path_type=Path))
@click.option("--repair", is_flag=True, help="Unpublish the bad shards and predictions so the next run redoes them.")
def verify(store_path, repair):
    """Check every chunk, marker and offset of a store; say (and with --repair unpublish) what to rebuild."""
    from icegrid.store import EventStore
    from icegrid.verify import repair as unpublish, verify_store

    store = EventStore(store_path)
    bad = verify_store(store)
    for label, problem in bad.items():
        click.echo(f"{label}: {problem}")
    if repair and bad:
        click.echo(f"unpublished {len(unpublish(store, bad))} group(s); rerun preprocess/infer to rebuild them")
    click.echo(f"{len(bad)} shard(s) to rebuild: {', '.join(bad) or 'none'}")
    sys.exit(1 if bad else 0)


@main.command("export")
@click.option("--store", "store_path", type=click.Path(path_type=Path), required=True, help="Event store (.zarr).")
@click.option("--models", default="all", show_default=True,
              help="Comma list of models with predictions, names or aliases (1st, 2nd@TAG, baseline) or 'all'.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="File to write: .parquet or .csv (replaced atomically when complete).")
@click.option("--format", "fmt", type=click.Choice(["table", "kaggle"]), default="table", show_default=True,
              help="table: one row per event, event_id, true_* and <model>_azimuth/_zenith/_kappa; kaggle: the "
                   "competition's submission CSV event_id,azimuth,zenith (one model, sorted by event_id).")
@click.option("--shard", "shards", multiple=True, help="Shard name (repeatable) [default: every shard].")
@click.option("--split", default=None, help="Only the shards of this split (e.g. test).")
def export_command(store_path, models, out, fmt, shards, split):
    """Export predictions and truth by event_id to parquet/CSV, or a Kaggle submission CSV."""
    from icegrid.export import export_store

    done = export_store(store_path, out, models=models, fmt=fmt, shards=shards, split=split)
    click.echo(f"{done['out']}: {done['events']:,} events from {done['shards']} shard(s), "
               f"{fmt} format, model(s) {', '.join(done['models'])}")


def _model_error(err: Exception) -> None:
    click.echo(f"icegrid: error: {err}", err=True)
    sys.exit(2)


@main.command()
@click.option("--model", "model_name", required=True,
              help="dynedge | edgeconv_transformer (1st) | icemix (2nd) | gpt_boost (3rd).")
@click.option("--preset", default="small", show_default=True, help="Preset: small, full, ... (`icegrid models` lists them).")
@click.option("--store", "store_path", type=click.Path(path_type=Path), required=True, help="Event store (.zarr) with truth.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Checkpoint path [default: ./checkpoints/<model>-<preset>.pt in the current directory; never a shipped one]; an unfinished one is resumed.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the preset's epochs per stage.")
@click.option("--val-fraction", type=click.FloatRange(0.0, 0.9), default=0.2, show_default=True,
              help="Fraction of shards held out for validation.")
@click.option("--max-events", type=click.IntRange(min=1), default=None, help="Use at most this many events per shard.")
@click.option("--max-val-events", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Validate on at most this many events per validation shard.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ... (mixed precision on CUDA).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch CPU threads.")
@click.option("--restart", is_flag=True, help="Ignore an existing checkpoint at --out and start again.")
@click.option("--init-from", type=click.Path(path_type=Path), default=None,
              help="Start from this finished checkpoint's weights (fine-tuning).")
@click.option("--stage", default=None,
              help="Only fit this stage of --checkpoint's model on the store's events (3rd place: selector).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="With --stage: a finished or imported checkpoint; --out defaults to <checkpoint>-<stage>.pt.")
def train(model_name, preset, store_path, out, epochs, val_fraction, max_events, max_val_events, seed, device, threads,
          restart, init_from, stage, checkpoint):
    """Train a model on an event store's shards (resumes after a kill; writes a checkpoint)."""
    from icegrid.models.registry import CheckpointError
    from icegrid.store import StoreError
    from icegrid.train import fit_stage, train as run_training

    if stage is not None:
        try:
            if checkpoint is None:
                raise ValueError("--stage needs --checkpoint (the model to fit the stage on)")
            result = fit_stage(store_path, model_name, checkpoint, stage, out=out, device=device, threads=threads,
                               max_events=max_events)
        except (CheckpointError, ValueError, StoreError) as err:      # StoreError: e.g. a store without truth
            _model_error(err)
        scores = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
        click.echo(f"{result['checkpoint']}: stage '{stage}' fitted on {result['events']:,} events"
                   + (f"; held-out mean angle (rad): {scores}" if scores else ""))
        return
    try:
        metrics = run_training(store_path, model_name, preset=preset, out=out, epochs=epochs, val_fraction=val_fraction,
                               seed=seed, device=device, threads=threads, max_events=max_events, restart=restart,
                               max_val_events=max_val_events, init_from=init_from)
    except (CheckpointError, ValueError) as err:
        _model_error(err)
    done = "already trained" if metrics.get("already_trained") else "trained"
    if metrics.get("resumed_from"):
        done += f" (resumed at {metrics['resumed_from']})"
    click.echo(f"{metrics['checkpoint']}: {done}; validation mean angle {metrics['val_mean_angle']:.4f} rad "
               f"on {metrics['val_events']:,} events")


@main.command()
@click.option("--store", "store_path", type=click.Path(path_type=Path), required=True, help="Event store (.zarr).")
@click.option("--models", "models", default="all", show_default=True,
              help="Comma list of models/aliases (linefit, dynedge, 1st, 2nd, 3rd), maybe tagged (2nd@retrained), or 'all'.")
@click.option("--shard", "shards", multiple=True, help="Shard name (repeatable) [default: every shard].")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Checkpoint for a single model [default: the shipped small checkpoint].")
@click.option("--as", "tag", default=None, metavar="TAG|MODEL@TAG",
              help="Store the predictions as MODEL@TAG (e.g. --as retrained: icemix@retrained), beside the untagged ones.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option("--overwrite", is_flag=True,
              help="Recompute predictions that already exist (needed to replace those of another checkpoint).")
def infer(store_path, models, shards, checkpoint, tag, device, batch_size, threads, overwrite):
    """Predict directions for every event of the store's shards with each model (skips done ones).

    Predictions already stored under a name from another checkpoint (by sha256) stop the command with
    one line: pass --overwrite to replace them or --as TAG to keep both. Progress goes to stderr: a bar
    on a terminal, otherwise a line every $ICEGRID_PROGRESS_INTERVAL seconds (60).
    """
    import torch

    from icegrid.inference import infer_shard, refuse_other_checkpoint
    from icegrid.models.registry import CheckpointError, expand_names, tagged_name
    from icegrid.progress import Meter
    from icegrid.store import EventStore

    if threads:
        torch.set_num_threads(threads)
    try:
        names = expand_names(models)
        if checkpoint is not None and len(names) != 1:
            raise ValueError("--checkpoint needs exactly one model in --models")
        if tag is not None:
            if len(names) != 1:
                raise ValueError("--as needs exactly one model in --models")
            names = [tagged_name(names[0], tag)]
        store = EventStore(store_path)
        shards = list(shards or store.shards())
        sizes = {shard: int(store.shard_attrs(shard)["n_events"]) for shard in shards}
        for shard in shards if not overwrite else ():    # refuse before any work, not after some shards
            for name in names:
                if store.has_predictions(shard, name):
                    refuse_other_checkpoint(store, shard, name, checkpoint)
        unit = "shards" if len(names) == 1 else "shard-models"
        with Meter("infer", len(shards) * len(names), unit, events_total=sum(sizes.values()) * len(names)) as meter:
            for shard in shards:
                for name in names:
                    s = infer_shard(store_path, shard, name, checkpoint, device=device, batch_size=batch_size,
                                    overwrite=overwrite, on_events=lambda n: meter.update(0, events=n))
                    if s["skipped"]:
                        meter.skip(1, events=s["n_events"])
                    else:
                        meter.update(1, events=0)
                    rate = "skipped (already there)" if s["skipped"] else \
                        f"{s['n_events']:,} events in {s['seconds']:.1f} s ({s['events_per_s']:,.0f} events/s)"
                    meter.echo(f"{shard} {name}: {rate}")
    except (CheckpointError, ValueError) as err:
        _model_error(err)


@main.command("models")
@click.option("--model", "models", default="all", show_default=True, help="Comma list of models/aliases or 'all'.")
@click.option("--checkpoints", "folders", type=click.Path(path_type=Path), multiple=True,
              help="Also list the icegrid checkpoints in this folder (repeatable) [default: the shipped folder].")
def models_command(models, folders):
    """List every model and preset: parameters, sequence limit, truncation rule, checkpoints on disk."""
    import os

    from icegrid.models import catalog, registry

    try:
        names = registry.expand(models)
    except ValueError as err:
        _model_error(err)
    click.echo(f"{'model':<22}{'preset':<18}{'origin':<9}{'parameters':>14}  {'limit':>6}  truncation")
    for row in catalog.preset_rows(names):
        limit, rule = ("all", "none") if row.infer_limit is None else (str(row.infer_limit), row.truncation)
        click.echo(f"{row.model:<22}{row.preset:<18}{row.origin:<9}{row.n_parameters:>14,}  {limit:>6}  {rule}")
    shipped = Path(os.environ.get("ICEGRID_CHECKPOINTS", registry.CHECKPOINT_DIR))
    rows = [r for r in catalog.checkpoint_rows([shipped, *folders]) if r.model in names or r.model == "?"]
    click.echo("\ncheckpoints:" if rows else "\ncheckpoints: none found")
    for row in rows:
        click.echo(f"  {row.path}  {row.model} / {row.preset}  {row.kind}  {row.detail}".rstrip())


@main.command("import-weights")
@click.option("--model", "model_name", required=True, help="dynedge | 1st | 2nd | 3rd (or the registry names).")
@click.option("--from", "sources", type=click.Path(path_type=Path), multiple=True, required=True,
              help="An authors' weight file (repeatable: the 1st place's members and stacker, the 3rd "
                   "place's classifier, long-sequence classifier and regression model).")
@click.option("--kwargs", "kwargs_json", default=None,
              help="JSON object of the authors' hyper-parameters the state dict does not carry "
                   "[default: the published configuration the shapes identify].")
@click.option("--aux", "aux_files", type=click.Path(path_type=Path), multiple=True,
              help="An authors' side file (ice_transparency.txt, angle_bins_128.json, ...); repeatable.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The icegrid checkpoint to write.")
def import_weights(model_name, sources, kwargs_json, aux_files, out):
    """Convert the winners' (or GraphNeT's) published weight files into an icegrid checkpoint."""
    from icegrid.models.importer import import_weights as run_import, parse_kwargs

    try:
        summary = run_import(model_name, list(sources), Path(out), kwargs=parse_kwargs(kwargs_json),
                             aux=list(aux_files))
    except ValueError as err:         # InputError/CheckpointError are ValueErrors too
        _model_error(err)
    click.echo(f"{summary['out']}: {summary['model']} preset '{summary['preset']}', "
               f"{summary['n_parameters']:,} parameters, from {', '.join(s['file'] for s in summary['provenance']['sources'])}")



# ---------------------------------------------------------------------------------------------- grid
# reprocess, status, scheduler, worker: icegrid/grid/commands.py
from icegrid.grid.commands import COMMANDS as _GRID_COMMANDS  # noqa: E402

for _command in _GRID_COMMANDS:
    main.add_command(_command)


# ------------------------------------------------------------------------------------------ analysis
def _analysis_echo(line: str) -> None:
    click.echo(line, err=line.startswith(("warning:", "note:")))


def _energy_ranges(text: str) -> list[list[float]]:
    """'1e6:1e7,3e4:1e5' -> [[1e6, 1e7], [3e4, 1e5]] (GeV)."""
    ranges = []
    for item in text.split(","):
        try:
            lo, hi = (float(v) for v in item.split(":"))
        except ValueError:
            raise click.UsageError(f"--kde-bins: '{item.strip()}' is not LO:HI in GeV (e.g. 1e6:1e7)") from None
        if not 0 < lo < hi:
            raise click.UsageError(f"--kde-bins: '{item.strip()}' needs 0 < LO < HI")
        ranges.append([lo, hi])
    return ranges


@main.command()
@click.option("--store", "store_path", type=click.Path(path_type=Path), help="Event store (.zarr) with truth and predictions.")
@click.option("--models", default=None,
              help="Comma list of models to compare, names or aliases (1st, 2nd, 3rd, baseline, all) "
                   "[default: every model in the input].")
@click.option("--predictions", "predictions_path", type=click.Path(path_type=Path),
              help="Reconstructions made outside icegrid: parquet with event_id, azimuth, zenith [rad], optional model.")
@click.option("--truth", "truth_path", type=click.Path(path_type=Path),
              help="Kaggle meta parquet with event_id, azimuth, zenith [rad]; energy, shape optional (with --predictions).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Folder for tables and figures.")
@click.option("--resamples", type=click.IntRange(min=0), default=None, help="Bootstrap resamples [config: 100].")
@click.option("--seed", type=int, default=None, help="Bootstrap seed [config].")
@click.option("--min-events", type=click.IntRange(min=2), default=None, help="Fewest events for a bin's mode [config].")
@click.option("--no-plots", is_flag=True, help="Write the tables only.")
@click.option("--figure", "layout", type=click.Choice(["grid", "paper", "all"]), default=None,
              help="Figure layout [config: grid]. grid: resolution vs energy as a 2x2 grid and the KDE of every "
                   "energy bin (pages of 8 panels); paper: the paper's Figs. 9-10 (one figure for cascades, one "
                   "for tracks, up-going above down-going) and Figs. 7-8 (the KDE of the --kde-bins ranges per "
                   "model); all: both.")
@click.option("--kde-bins", "kde_bins", default=None, metavar="LO:HI[,LO:HI]",
              help="Energy ranges in GeV for the paper's single-bin KDE figures, on energy bin edges "
                   "[config: 1e6:1e7]; implies --figure all unless --figure is given.")
@click.option("--force", is_flag=True, help="With --store: recompute even when the store's predictions and truth "
                                            "and the options are those of the outputs already in --out.")
def analyze(store_path, models, predictions_path, truth_path, out_dir, resamples, seed, min_events, no_plots,
            layout, kde_bins, force):
    """Scores and resolution: Kaggle score, KDE primary mode of the opening angle per bin with a bootstrap band, figures.

    With true directions only (the Kaggle train split) it writes the scores, the opening-angle distribution
    and resolution vs zenith and number of pulses; with truth energy also resolution vs energy (per track and
    cascade when the truth has a shape). A one-line note says what was skipped.
    """
    from icegrid.analysis import analyze_predictions, analyze_store, load_settings

    if bool(store_path) == bool(predictions_path):
        raise click.UsageError("give either --store or --predictions (with --truth)")
    if predictions_path and not truth_path:
        raise click.UsageError("--predictions needs --truth META.parquet (event_id and the true azimuth, zenith)")
    overrides = {"bootstrap": {"resamples": resamples, "seed": seed}, "min_events": min_events,
                 "figures": {"layout": layout or ("all" if kde_bins else None)}}
    if kde_bins:
        overrides["figures"]["kde_bins_gev"] = _energy_ranges(kde_bins)
    if no_plots:
        overrides["plots"] = False
    settings = load_settings(overrides)
    names = [m.strip() for m in models.split(",") if m.strip()] if models else None
    if store_path:
        outcome = analyze_store(store_path, names, out_dir, settings, echo=_analysis_echo, force=force)
    else:
        outcome = analyze_predictions(predictions_path, truth_path, out_dir, settings, names,
                                      echo=_analysis_echo)
    for label, path in outcome.items():
        if label in ("resolution_csv", "scores_csv", "resolution_vs_energy_png", "opening_angle_png",
                     "paper_fig09_cascades_png", "paper_fig10_tracks_png"):
            click.echo(f"{label}: {path}")
    click.echo(f"{len(outcome)} file(s) in {out_dir}")
