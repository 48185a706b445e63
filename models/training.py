"""The Ray Train worker loop: one candidate trained on the walk-forward folds (or CPCV splits)
it is given, in turn: every fold of a trial, or one fold when the trial trains its folds in
parallel runs (`TuneJobConfig.parallel_folds`).

Runs inside `TorchTrainer` workers (Lightning with Ray's DDP strategy), so the same code trains
on one local worker or several workers of a cluster. Each epoch's validation loss is reported to
Ray Train (and from there to Tune, for ASHA). The last report carries a checkpoint holding, per
fold, the best-validation-epoch model files; the Tune trial evaluates them on the test blocks.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from models.artifact import model_files, write_model_dir
from models.dataset import MarketArrays, Scaler, window_ends, window_ends_in
from models.folds import TrainingRanges
from models.lightning_module import SignalModule, WindowBatches
from models.networks import ModelSpec
from models.runs import TrialDir


class EpochReporter(pl.Callback):
    """Reports each validation epoch to Ray Train, keeps the best epoch's weights and every
    report sent (`reports`, in epoch order)."""

    def __init__(self, fold: int, epochs_before: int) -> None:
        self.fold = fold
        self.epochs_before = epochs_before
        self.best_loss = float("inf")
        self.best_state: dict[str, torch.Tensor] | None = None
        self.reports: list[dict[str, float | int]] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        import ray.train

        val_loss = float(trainer.callback_metrics["val_loss"])
        train_loss = trainer.callback_metrics.get("train_loss")
        if val_loss < self.best_loss:
            self.best_loss = val_loss
            self.best_state = copy.deepcopy(pl_module.state_dict())
        report: dict[str, float | int] = {
            "val_loss": val_loss,
            "train_loss": float(train_loss) if train_loss is not None else float("nan"),
            "fold": self.fold,
            "epoch": self.epochs_before + trainer.current_epoch,
        }
        self.reports.append(report)
        ray.train.report(dict(report))


def _loader(
    normalised: np.ndarray,
    arrays: MarketArrays,
    ends: np.ndarray,
    scaler: Scaler,
    spec: ModelSpec,
    *,
    shuffle: bool,
    seed: int,
) -> DataLoader[int]:
    collate = WindowBatches(
        normalised,
        ends,
        (np.nan_to_num(arrays.target_ret) / scaler.target_scale).astype(np.float32),
        np.nan_to_num(arrays.target_up).astype(np.float32),
        spec.window_bars,
    )
    return DataLoader(
        range(len(ends)),  # type: ignore[arg-type]
        batch_size=spec.batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate,
    )


def subsample(ends: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most `limit` decision bars, drawn without replacement by a seeded generator."""
    if limit is None or len(ends) <= limit:
        return ends
    chosen = np.random.default_rng(seed).choice(len(ends), size=limit, replace=False)
    return ends[np.sort(chosen)]


@dataclass(frozen=True)
class TrainedFold:
    """One fold's (or CPCV split's) training: the best-validation-epoch model files, that
    epoch's validation loss, and the per-epoch reports sent to Ray Train, in order."""

    files: dict[str, bytes]
    best_loss: float
    epoch_reports: list[dict[str, float | int]]


def train_fold(
    arrays: MarketArrays,
    fold: TrainingRanges,
    spec: ModelSpec,
    *,
    seed: int,
    max_epochs: int,
    max_train_windows: int | None,
    shuffle_labels: bool,
    epochs_before: int,
    distributed: bool,
) -> TrainedFold:
    """Train one fold (or CPCV split) on every window whose decision bar and label lie inside
    one of its training ranges."""
    fold_seed = seed * 1000 + fold.index
    pl.seed_everything(fold_seed, workers=True)
    train_ends = window_ends_in(arrays, fold.train_ranges, spec.window_bars, labelled=True)
    train_ends = subsample(train_ends, max_train_windows, fold_seed)
    val_ends = window_ends(
        arrays, fold.val_start_ms, fold.val_end_ms, spec.window_bars, labelled=True
    )
    if len(train_ends) == 0 or len(val_ends) == 0:
        raise ValueError(
            f"fold {fold.index}: {len(train_ends)} training and {len(val_ends)} validation "
            f"windows of {spec.window_bars} bars; the data is too short or too gappy"
        )
    scaler = Scaler.fit(arrays, train_ends, spec.window_bars)
    normalised = scaler.transform(arrays.inputs)
    train_arrays = arrays
    if shuffle_labels:
        # The shuffled-label control: break any link between inputs and targets on the training
        # windows only (validation keeps true labels, so ASHA still sees honest losses).
        permutation = np.random.default_rng(fold_seed).permutation(len(train_ends))
        target_ret = arrays.target_ret.copy()
        target_up = arrays.target_up.copy()
        target_ret[train_ends] = arrays.target_ret[train_ends[permutation]]
        target_up[train_ends] = arrays.target_up[train_ends[permutation]]
        train_arrays = replace(arrays, target_ret=target_ret, target_up=target_up)
    train_loader = _loader(
        normalised, train_arrays, train_ends, scaler, spec, shuffle=True, seed=fold_seed
    )
    val_loader = _loader(normalised, arrays, val_ends, scaler, spec, shuffle=False, seed=fold_seed)
    module = SignalModule(spec.model_dump())
    reporter = EpochReporter(fold.index, epochs_before)
    trainer = _trainer(max_epochs, reporter, distributed)
    trainer.fit(module, train_loader, val_loader)
    if reporter.best_state is not None:
        module.load_state_dict(reporter.best_state)
    return TrainedFold(model_files(spec, scaler, module.net), reporter.best_loss, reporter.reports)


def _trainer(max_epochs: int, reporter: EpochReporter, distributed: bool) -> pl.Trainer:
    common: dict[str, Any] = {
        "max_epochs": max_epochs,
        "callbacks": [reporter],
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "logger": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    if not distributed:
        return pl.Trainer(accelerator="cpu", devices=1, **common)
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

    trainer = pl.Trainer(
        accelerator="auto",
        devices="auto",
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        **common,
    )
    return prepare_trainer(trainer)


def trial_arrays(
    arrays: MarketArrays, labelling: dict[str, Any] | None, spec: ModelSpec
) -> MarketArrays:
    """The arrays a trial trains and is scored on: labelled by `labelling` (keyword arguments
    of `MarketArrays.labelled`; None or empty keeps the arrays' own), with the cross-asset
    inputs of `spec.cross_asset_symbols` when it has any."""
    if labelling:
        arrays = arrays.labelled(**labelling)
    if spec.cross_asset_symbols:
        arrays = arrays.with_cross_asset(spec.cross_asset_symbols)
    return arrays


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config`: data (a one-element list holding the MarketArrays
    ObjectRef), labelling (keyword arguments of `MarketArrays.labelled`: the trial's horizon
    and label; absent = the arrays' own), spec (its cross-asset symbols add their inputs),
    folds (`TrainingRanges.as_dict()` of each fold or split), seed, max_epochs,
    max_train_windows, shuffle_labels, threads, and optionally epoch_history (true: the closing
    report also carries every per-epoch report sent, in order, for a caller that replays them
    to Tune itself)."""
    import ray
    import ray.train

    torch.set_num_threads(int(config["threads"]))
    spec = ModelSpec.model_validate(config["spec"])
    arrays = trial_arrays(ray.get(config["data"][0]), config.get("labelling"), spec)
    folds = [TrainingRanges.from_dict(f) for f in config["folds"]]
    context = ray.train.get_context()
    with tempfile.TemporaryDirectory() as scratch:
        # Laid out as a trial directory, into which the sweep copies the checkpoint whole.
        out = TrialDir(Path(scratch))
        last_val_loss = float("nan")
        epoch_history: list[dict[str, float | int]] = []
        for fold in folds:
            trained = train_fold(
                arrays,
                fold,
                spec,
                seed=int(config["seed"]),
                max_epochs=int(config["max_epochs"]),
                max_train_windows=config["max_train_windows"],
                shuffle_labels=bool(config["shuffle_labels"]),
                epochs_before=fold.index * int(config["max_epochs"]),
                distributed=True,
            )
            write_model_dir(out.fold(fold.index), trained.files)
            last_val_loss = trained.best_loss
            epoch_history.extend(trained.epoch_reports)
        checkpoint = None
        if context.get_world_rank() == 0:
            checkpoint = ray.train.Checkpoint.from_directory(scratch)
        # The last report repeats the last validation loss: schedulers expect their metric in
        # every result.
        final: dict[str, Any] = {
            "val_loss": last_val_loss,
            "trained_folds": len(folds),
            "world_size": context.get_world_size(),
        }
        if config.get("epoch_history"):
            final["epoch_history"] = epoch_history
        ray.train.report(final, checkpoint=checkpoint)
