"""Training: ``icegrid train --model NAME --preset small|full --store S.zarr``.

Runs a model's training stages (see :class:`icegrid.models.base.Stage`) on the store's shards with
a train/validation split by shard (one shard only: its last events are held out), sequence
bucketing, AdamW with warm-up + cosine decay, mixed precision on CUDA only, progress per epoch
(:class:`icegrid.progress.Meter`: a bar on a terminal; on a log file a plain line every
``ICEGRID_PROGRESS_INTERVAL`` s with batches and events done, events/s, the loss and an ETA), a line
per epoch with the validation mean angle, and a checkpoint (weights, preset, feature-transform version,
metrics) written atomically after every epoch and every ``save_every_s`` seconds. Rerunning the
same command after a kill resumes from the last checkpoint at the exact batch it reached (batch
plans are a pure function of seed, stage and epoch). The finished checkpoint drops the optimizer
state, so shipped checkpoints stay small.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from icegrid.models import registry
from icegrid.models.base import Stage
from icegrid.models.features import ShardFeatures, bucket_batches, collate, select_pulses
from icegrid.models.layers import opening_angle
from icegrid.progress import Meter
from icegrid.store import EventStore, StoreError, direction_from_angles

WARMUP_FRACTION = 0.03
FINAL_LR_FRACTION = 1e-3


@dataclass
class ShardPart:
    """The events of one shard used for training or validation, featurised once."""

    shard: str
    features: ShardFeatures
    target: np.ndarray        # (n_events_in_shard, 3) unit vectors
    events: np.ndarray        # event indices of this part
    n_pulses: np.ndarray      # (n_events_in_shard,) before truncation


def split_shards(shards: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """The last ceil(fraction * n) shards validate (at least one, when there are two or more)."""
    if len(shards) < 2:
        return list(shards), []
    n_val = min(len(shards) - 1, max(1, math.ceil(val_fraction * len(shards))))
    return list(shards[:-n_val]), list(shards[-n_val:])


def load_parts(store: EventStore, loaded: registry.LoadedModel, shards: list[str], limit: int | None,
               seed: int, max_events: int | None, event_slice: tuple[float, float] = (0.0, 1.0)) -> list[ShardPart]:
    parts = []
    geometry = store.geometry()
    for i, shard in enumerate(shards):
        data = store.read_shard(shard, truth=True)
        if "azimuth" not in data.truth:
            raise StoreError(f"{store.path}: shard '{shard}' has no truth directions to train on")
        selection = select_pulses(data.offset, data.pulses["time"], data.pulses["auxiliary"], limit,
                                  loaded.truncation, seed=seed + i)
        features = loaded.transform(data, selection, geometry)
        lo, hi = (int(round(f * data.n_events)) for f in event_slice)
        events = np.arange(lo, hi)
        events = events[selection.lengths[events] > 0]
        if max_events is not None:
            events = events[:max_events]
        target = direction_from_angles(data.truth["azimuth"], data.truth["zenith"]).astype(np.float32)
        parts.append(ShardPart(shard, features, target, events, selection.n_pulses))
    return parts


def plan_epoch(parts: list[ShardPart], seed: int, stage_index: int, epoch: int, batch_size: int,
               max_tokens: int | None, max_event_pulses: int | None) -> list[tuple[int, np.ndarray]]:
    """(part index, event indices) per batch: shards in random order, bucketed within a shard
    (the 2nd place's chunk-based sampling), deterministic in (seed, stage, epoch)."""
    rng = np.random.default_rng([seed, stage_index, epoch])
    plan = []
    for p in rng.permutation(len(parts)):
        part = parts[p]
        events = part.events
        if max_event_pulses is not None:     # 1st place: train on short events only
            events = events[part.n_pulses[events] <= max_event_pulses]
        lengths = part.features.selection.lengths[events]
        for batch in bucket_batches(lengths, batch_size, max_tokens, shuffle_seed=int(rng.integers(1 << 31))):
            plan.append((int(p), events[batch]))
    return plan


def evaluate(predict, parts: list[ShardPart], batch_size: int, max_tokens: int | None, device: str) -> float:
    """Mean opening angle (rad) of ``predict`` over the parts' events."""
    total, count = 0.0, 0
    with torch.no_grad():
        for part in parts:
            lengths = part.features.selection.lengths[part.events]
            for batch in bucket_batches(lengths, batch_size, max_tokens, max_pairs=1 << 21):
                events = part.events[batch]
                tensors = collate(part.features, events, part.target, device=device)
                vector, _ = predict(tensors)
                total += float(opening_angle(vector.float(), tensors["target"]).double().sum())
                count += len(events)
    return total / count if count else float("nan")


def _smaller(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _schedule(total_steps: int):
    warmup = max(1, int(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def train(store_path: Path | str, model: str, preset: str = "small", out: Path | str | None = None,
          epochs: int | None = None, val_fraction: float = 0.2, seed: int = 0, device: str = "cpu",
          threads: int | None = 1, max_events: int | None = None, restart: bool = False,
          progress: bool = True, save_every_s: float = 120.0, overrides: dict | None = None,
          max_steps: int | None = None, max_val_events: int | None = 1000,
          init_from: Path | str | None = None) -> dict:
    """Train ``model``/``preset`` on the store; returns the final metrics (also in the checkpoint).

    ``max_steps`` stops this invocation after that many optimiser steps with a resumable
    checkpoint (time-boxed jobs on opportunistic workers); the result then has ``finished: False``.
    ``init_from`` starts from a finished checkpoint's weights (fine-tuning, as the 1st place's M2/M5).
    """
    if threads:
        torch.set_num_threads(threads)
    name = registry.canonical(model)
    if name == "linefit":
        raise ValueError("linefit has nothing to train")
    if registry.presets(name, overrides).get(preset, {}).get("arch") == "authors":     # before building 100 M weights
        raise ValueError(f"model '{name}' preset '{preset}' is the authors' own: import their weights with "
                         f"`icegrid import-weights` (3rd place: then `--stage selector --checkpoint CKPT`)")
    torch.manual_seed(seed)
    loaded = registry.build(name, preset, overrides)
    training = dict(loaded.training)
    if epochs is not None:
        training.update(epochs=epochs, stack_epochs=min(epochs, int(training.get("stack_epochs", epochs))),
                        regression_epochs=epochs)
    loaded.training = training
    out = _training_output(out, name, preset)
    batch_size = int(training.get("batch_size", 64))
    max_tokens = training.get("max_tokens")

    state = {"stage": 0, "epoch": 0, "batch": 0, "history": [], "optimizer": None, "scheduler": None}
    resumed_from = None
    if init_from is not None:
        source = registry.load_checkpoint(init_from, name)
        if source.preset_config != loaded.preset_config:
            raise registry.CheckpointError(f"{init_from}: preset differs from {name}/{preset}; "
                                           "cannot fine-tune from it")
        loaded.model.load_state_dict(source.model.state_dict())
        state["history"].append({"stage": "init_from", "checkpoint": str(init_from),
                                 "val_mean_angle": source.metrics.get("val_mean_angle")})
    if out.exists() and not restart:
        payload = registry.read_checkpoint(out)
        if payload.get("model") != name or payload.get("preset") != preset:
            raise registry.CheckpointError(f"{out}: holds {payload.get('model')}/{payload.get('preset')}, "
                                           f"not {name}/{preset}; pass --restart or another --out")
        if payload.get("train_state") is None:
            return {**payload.get("metrics", {}), "checkpoint": str(out), "already_trained": True}
        restored = registry.load_checkpoint(out, name)
        loaded.model, loaded.preset_config, loaded.training = restored.model, restored.preset_config, restored.training
        training = loaded.training
        state = payload["train_state"]
        resumed_from = f"stage {state['stage'] + 1}, epoch {state['epoch'] + 1}, batch {state['batch']}"

    store = EventStore(store_path)
    shards = store.shards()
    if not shards:
        raise StoreError(f"{store.path}: no shards to train on")
    train_shards, val_shards = split_shards(shards, val_fraction)
    if val_shards:
        train_parts = load_parts(store, loaded, train_shards, loaded.train_limit, seed, max_events)
        val_parts = load_parts(store, loaded, val_shards, loaded.infer_limit, 0, _smaller(max_events, max_val_events))
    else:   # one shard: hold out its last events
        cut = 1.0 - val_fraction
        train_parts = load_parts(store, loaded, shards, loaded.train_limit, seed, max_events, (0.0, cut))
        val_parts = load_parts(store, loaded, shards, loaded.infer_limit, 0, _smaller(max_events, max_val_events),
                               (cut, 1.0))

    net = loaded.model.to(device)
    stages = net.stages(training)
    use_amp = str(device).startswith("cuda")
    started = time.perf_counter()

    def save(train_state, metrics=None):
        registry.save_checkpoint(out, registry.checkpoint_payload(loaded, metrics or {}, train_state))

    def batches_for_fit():
        for part in val_parts:
            lengths = part.features.selection.lengths[part.events]
            for batch in bucket_batches(lengths, batch_size, max_tokens, max_pairs=1 << 21):
                yield collate(part.features, part.events[batch], part.target, device=device)

    budget = {"steps_left": max_steps}
    for stage_index in range(state["stage"], len(stages)):
        stage = stages[stage_index]
        if budget["steps_left"] is not None and budget["steps_left"] <= 0:
            return {"finished": False, "checkpoint": str(out), "stage": stage.name}
        if stage.kind == "fit":
            net.eval()
            result = stage.fit(batches_for_fit)
            state["history"].append({"stage": stage.name, **result})
        else:
            completed = _run_gradient_stage(stage, stage_index, net, train_parts, val_parts, state, seed,
                                            batch_size, max_tokens, device, use_amp, progress, save_every_s, save,
                                            budget)
            if not completed:
                return {"finished": False, "checkpoint": str(out), "stage": stage.name}
        state.update(stage=stage_index + 1, epoch=0, batch=0, optimizer=None, scheduler=None)
        save(state)

    net.eval()
    metrics = {
        "val_mean_angle": evaluate(net.predict, val_parts, batch_size, max_tokens, device),
        "val_events": int(sum(p.events.shape[0] for p in val_parts)),
        "train_events": int(sum(p.events.shape[0] for p in train_parts)),
        "train_shards": train_shards, "val_shards": val_shards or [f"{shards[0]} (last {val_fraction:.0%})"],
        "stages": state["history"], "seconds": round(time.perf_counter() - started, 1), "seed": seed,
    }
    save(None, metrics)
    return {**metrics, "checkpoint": str(out), "finished": True, "resumed_from": resumed_from}


def _training_output(out: Path | str | None, name: str, preset: str) -> Path:
    """``out``, or ``./checkpoints/<model>-<preset>.pt``; never a shipped checkpoint, which every user of
    this installation shares and which a fresh clone must keep byte-identical."""
    out = Path(out) if out is not None else Path.cwd() / "checkpoints" / f"{name}-{preset}.pt"
    shipped = registry.CHECKPOINT_DIR.resolve()
    if out.resolve().parent == shipped:
        raise registry.CheckpointError(f"{out}: that is where icegrid's shipped checkpoints live; "
                                       f"pass --out elsewhere")
    return out


def fit_stage(store_path: Path | str, model: str, checkpoint: Path | str, stage: str, out: Path | str | None = None,
              device: str = "cpu", threads: int | None = 1, max_events: int | None = None) -> dict:
    """Run one fit stage of a finished (or imported) checkpoint's model on every store event with truth,
    e.g. icegrid's 3rd-place selector on the authors' heads; writes ``out`` (default ``<ckpt>-<stage>.pt``)."""
    if threads:
        torch.set_num_threads(threads)
    checkpoint = Path(checkpoint)
    loaded = registry.load_checkpoint(checkpoint, model, device=device)
    stages = {s.name: s for s in loaded.model.stages(loaded.training) if s.kind == "fit"}
    if stage not in stages:
        raise ValueError(f"{checkpoint}: model '{loaded.name}' preset '{loaded.preset}' has no fit stage '{stage}' "
                         f"(have {', '.join(stages) or 'none'})")
    store = EventStore(store_path)
    parts = load_parts(store, loaded, store.shards(), loaded.infer_limit, 0, max_events)
    batch_size, max_tokens = int(loaded.training.get("batch_size", 64)), loaded.training.get("max_tokens")

    def batches():
        for part in parts:
            lengths = part.features.selection.lengths[part.events]
            for batch in bucket_batches(lengths, batch_size, max_tokens, max_pairs=1 << 21):
                yield collate(part.features, part.events[batch], part.target, device=device)

    loaded.model.eval()
    result = stages[stage].fit(batches)
    history = [*loaded.metrics.get("stages", []), {"stage": stage, "from": checkpoint.name, **result}]
    out = Path(out) if out is not None else checkpoint.with_name(f"{checkpoint.stem}-{stage}.pt")
    registry.save_checkpoint(out, registry.checkpoint_payload(loaded, {**loaded.metrics, "stages": history}))
    return {**result, "checkpoint": str(out), "events": int(sum(p.events.shape[0] for p in parts))}


def _run_gradient_stage(stage: Stage, stage_index: int, net, train_parts, val_parts, state, seed, batch_size,
                        max_tokens, device, use_amp, progress, save_every_s, save, budget) -> bool:
    """Run (or resume) one gradient stage; False when the step budget ran out first."""
    params = stage.parameters()
    wanted = {id(p) for p in params}
    for p in net.parameters():          # freeze everything this stage does not train
        p.requires_grad_(id(p) in wanted)
    optimiser = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    plans = [plan_epoch(train_parts, seed, stage_index, e, batch_size, max_tokens, stage.max_event_pulses)
             for e in range(stage.epochs)]
    total_steps = max(1, sum(len(p) for p in plans))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _schedule(total_steps))
    if state.get("optimizer") is not None:
        optimiser.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    predict = stage.predict or net.predict
    last_val = state["history"][-1].get("val_mean_angle") if state["history"] else None
    last_save = time.perf_counter()
    for epoch in range(state["epoch"], stage.epochs):
        plan = plans[epoch]
        net.train()
        bar = Meter(f"train {stage.name} epoch {epoch + 1}/{stage.epochs}:", len(plan), "batches",
                    initial=state["batch"], enabled=progress, leave=False)
        running = None
        for step in range(state["batch"], len(plan)):
            if budget["steps_left"] is not None and budget["steps_left"] <= 0:
                state.update(stage=stage_index, epoch=epoch, batch=step,
                             optimizer=optimiser.state_dict(), scheduler=scheduler.state_dict())
                save(state)
                bar.close()
                return False
            part_index, events = plan[step]
            part = train_parts[part_index]
            batch = collate(part.features, events, part.target, device=device)
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
                loss = stage.loss(batch, epoch)
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimiser)
            torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
            scaler.step(optimiser)
            scaler.update()
            scheduler.step()
            value = float(loss.detach())
            running = value if running is None else 0.95 * running + 0.05 * value
            bar.update(1, events=len(events), loss=f"{running:.3f}",
                       **({"val_angle": f"{last_val:.3f}"} if last_val is not None else {}))
            if budget["steps_left"] is not None:
                budget["steps_left"] -= 1
            if time.perf_counter() - last_save > save_every_s:
                state.update(stage=stage_index, epoch=epoch, batch=step + 1,
                             optimizer=optimiser.state_dict(), scheduler=scheduler.state_dict())
                save(state)
                last_save = time.perf_counter()
        bar.close()
        net.eval()
        last_val = evaluate(predict, val_parts, batch_size, max_tokens, device)
        state["history"].append({"stage": stage.name, "epoch": epoch + 1, "train_loss": running,
                                 "val_mean_angle": last_val})
        if progress:
            loss_text = f"{running:.4f}" if running is not None else "nan"
            bar.echo(f"{stage.name} epoch {epoch + 1}/{stage.epochs}: loss {loss_text} "
                     f"val mean angle {last_val:.4f} rad")
        state.update(stage=stage_index, epoch=epoch + 1, batch=0,
                     optimizer=optimiser.state_dict(), scheduler=scheduler.state_dict())
        save(state)
        last_save = time.perf_counter()
    for p in net.parameters():
        p.requires_grad_(True)
    return True
