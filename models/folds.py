"""Walk-forward folds on the shared minute timeline of every symbol.

All lengths are in bars; one bar is one minute, so a fold boundary is a UTC minute and every
symbol shares it. Per fold, in time order:

    [train ......][purge][val ...][purge][test ...][embargo]  next fold's test block ...

The purge (default: the target horizon plus the longest feature window; a sweep passes the longest
horizon it samples, so one schedule is purged for every trial) keeps the labels
of one range from overlapping the inputs or labels of the next; the embargo leaves bars unscored
after each test block so that consecutive test blocks do not share a target horizon. Test blocks
tile the end of the timeline in order, so their out-of-sample predictions concatenate into one
track record.

The `cpcv` scheme (`make_cpcv`) instead cuts the timeline into N groups and trains one model per
combination of k test groups (`models.cpcv`); its predictions assemble into backtest paths that
each cover the whole timeline once, every group tested by a model that never saw it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np

from configs.schema import FoldConfig, TuneJobConfig
from market.features.spec import HORIZON_BARS, LONGEST_WINDOW_BARS
from market.klines import ONE_MINUTE_MS
from models.cpcv import CpcvPlan, cpcv_plan

ModelT = TypeVar("ModelT")


@dataclass(frozen=True)
class Fold:
    """One walk-forward fold as half-open [start, end) ranges of open times in epoch ms."""

    index: int
    train_start_ms: int
    train_end_ms: int
    val_start_ms: int
    val_end_ms: int
    test_start_ms: int
    test_end_ms: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def training_ranges(self) -> TrainingRanges:
        return TrainingRanges(
            index=self.index,
            train_ranges=((self.train_start_ms, self.train_end_ms),),
            val_start_ms=self.val_start_ms,
            val_end_ms=self.val_end_ms,
        )


@dataclass(frozen=True)
class TrainingRanges:
    """What one model trains on: half-open [start, end) ranges of open times in epoch ms.

    `train_ranges` are ascending and disjoint (one for a walk-forward fold, several for a CPCV
    split); no training label reaches past the end of its range. `index` names the model's
    directory (`fold_<index>`).
    """

    index: int
    train_ranges: tuple[tuple[int, int], ...]
    val_start_ms: int
    val_end_ms: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingRanges:
        """The TrainingRanges whose `as_dict()` is `data` (ranges as pairs or lists)."""
        return cls(
            index=int(data["index"]),
            train_ranges=tuple((int(a), int(b)) for a, b in data["train_ranges"]),
            val_start_ms=int(data["val_start_ms"]),
            val_end_ms=int(data["val_end_ms"]),
        )


def default_purge_bars(horizon_bars: int = HORIZON_BARS) -> int:
    """The minimum purge: the target horizon plus the longest feature window, in bars."""
    return horizon_bars + LONGEST_WINDOW_BARS


def make_folds(
    first_open_ms: int,
    last_open_ms: int,
    config: FoldConfig,
    horizon_bars: int = HORIZON_BARS,
) -> list[Fold]:
    """Walk-forward folds covering [first_open_ms, last_open_ms] (inclusive open times), most
    recent last, for labels `horizon_bars` bars ahead (the longest any model on them uses).

    With `max_folds`, the most recent folds are kept. Raises ValueError when the timeline is too
    short for even one fold, naming the bars needed and the bars available, or when an explicit
    purge is shorter than the horizon.
    """
    if config.scheme == "cpcv":
        raise ValueError("scheme 'cpcv' has no walk-forward folds: use make_cpcv")
    purge = default_purge_bars(horizon_bars) if config.purge_bars is None else config.purge_bars
    if purge < horizon_bars:
        raise ValueError(f"purge_bars={purge} is shorter than the {horizon_bars}-bar horizon")
    total_bars = (last_open_ms - first_open_ms) // ONE_MINUTE_MS + 1
    head = config.train_bars + purge + config.val_bars + purge
    step = config.test_bars + config.embargo_bars
    if total_bars < head + config.test_bars:
        raise ValueError(
            f"timeline of {total_bars} bars is too short for one fold: needs "
            f"{head + config.test_bars} (train {config.train_bars} + val {config.val_bars} + "
            f"test {config.test_bars} + 2 x purge {purge})"
        )
    count = (total_bars - head - config.test_bars) // step + 1
    if config.max_folds is not None:
        count = min(count, config.max_folds)
    # Anchor the last test block at the end of the timeline so the newest data is scored.
    last_test_start = total_bars - config.test_bars
    folds = []
    for k in range(count):
        test_start = last_test_start - (count - 1 - k) * step
        val_end = test_start - purge
        val_start = val_end - config.val_bars
        train_end = val_start - purge
        train_start = 0 if config.scheme == "expanding" else train_end - config.train_bars
        folds.append(
            Fold(
                index=k,
                train_start_ms=first_open_ms + train_start * ONE_MINUTE_MS,
                train_end_ms=first_open_ms + train_end * ONE_MINUTE_MS,
                val_start_ms=first_open_ms + val_start * ONE_MINUTE_MS,
                val_end_ms=first_open_ms + val_end * ONE_MINUTE_MS,
                test_start_ms=first_open_ms + test_start * ONE_MINUTE_MS,
                test_end_ms=first_open_ms + (test_start + config.test_bars) * ONE_MINUTE_MS,
            )
        )
    return folds


def cpcv_min_purge_bars(window_bars: int, horizon_bars: int = HORIZON_BARS) -> int:
    """The least CPCV purge, in bars: the horizon, the longest feature window and the model
    window (`window_bars`). A training window that starts this far after a test group reads no
    input computed from a bar that a test label spans, and a training label that ends before a
    test group's first bar (labels stay inside their training range) overlaps no test label."""
    return horizon_bars + LONGEST_WINDOW_BARS + window_bars


@dataclass(frozen=True)
class CpcvFolds:
    """A CPCV set-up on the minute timeline: the bar-space plan, the timeline's first open time
    and, per split (in `plan.splits` order), the ranges its model trains and validates on.

    Bar b of the plan is the minute opening at `first_open_ms + b * 60,000` ms; the plan's
    purge and embargo are in bars. A split's validation range is the last `val_bars` bars of
    its latest training run, with `purge_bars` more bars before it left out of training.
    """

    plan: CpcvPlan
    first_open_ms: int
    splits: tuple[TrainingRanges, ...]

    def group_range_ms(self, group: int) -> tuple[int, int]:
        start, end = self.plan.groups[group]
        return self.first_open_ms + start * ONE_MINUTE_MS, self.first_open_ms + end * ONE_MINUTE_MS

    def path_folds(self, path: int) -> list[Fold]:
        """Backtest path `path` as one test block per group (`Fold.index` = the group), each
        scored with the model of the split `plan.paths[path, group]`.

        A CPCV split trains on several runs; a Fold holds one, so its train range is the
        split's longest run (where the darts baselines fit) and its validation range the
        split's. `path_models` picks the matching models.
        """
        folds = []
        for group in range(self.plan.n_groups):
            split = self.splits[int(self.plan.paths[path, group])]
            train_start, train_end = max(split.train_ranges, key=lambda r: (r[1] - r[0], r[0]))
            test_start, test_end = self.group_range_ms(group)
            folds.append(
                Fold(
                    index=group,
                    train_start_ms=train_start,
                    train_end_ms=train_end,
                    val_start_ms=split.val_start_ms,
                    val_end_ms=split.val_end_ms,
                    test_start_ms=test_start,
                    test_end_ms=test_end,
                )
            )
        return folds

    def path_models(self, path: int, split_models: Sequence[ModelT]) -> list[ModelT]:
        """The split models that score path `path`, one per group, in group order."""
        return [split_models[int(self.plan.paths[path, g])] for g in range(self.plan.n_groups)]

    def newest_split(self) -> TrainingRanges:
        """The split tested on the first k groups: it trains on the most recent bars."""
        return self.splits[0]


def _runs(bars: np.ndarray) -> list[tuple[int, int]]:
    """Ascending bar indices as maximal half-open runs [start, end) of consecutive bars."""
    if len(bars) == 0:
        return []
    breaks = np.flatnonzero(np.diff(bars) != 1)
    starts = [int(bars[0]), *(int(bars[b + 1]) for b in breaks)]
    ends = [*(int(bars[b]) + 1 for b in breaks), int(bars[-1]) + 1]
    return list(zip(starts, ends, strict=True))


def make_cpcv(
    first_open_ms: int,
    last_open_ms: int,
    config: FoldConfig,
    window_bars: int,
    horizon_bars: int = HORIZON_BARS,
) -> CpcvFolds:
    """The CPCV splits of [first_open_ms, last_open_ms] (inclusive open times) for models
    reading `window_bars`-bar windows with labels `horizon_bars` bars ahead (the longest the
    search samples).

    Raises ValueError, naming the bars needed and available, when the purge is shorter than
    `cpcv_min_purge_bars(window_bars)`, when a group is too short to keep training bars
    between two test groups (2 x purge + embargo + one window and its horizon), or when a
    split's latest training run cannot hold the validation range, its purge and a window.
    """
    if config.scheme != "cpcv" or config.groups is None or config.test_groups is None:
        raise ValueError(f"make_cpcv needs scheme 'cpcv' with groups and test_groups: {config}")
    least_purge = cpcv_min_purge_bars(window_bars, horizon_bars)
    purge = least_purge if config.purge_bars is None else config.purge_bars
    if purge < least_purge:
        raise ValueError(
            f"purge_bars={purge} does not cover a {window_bars}-bar model window: cpcv needs at "
            f"least {least_purge} (horizon {horizon_bars} + feature window "
            f"{LONGEST_WINDOW_BARS} + model window {window_bars})"
        )
    total_bars = (last_open_ms - first_open_ms) // ONE_MINUTE_MS + 1
    embargo = config.embargo_bars
    least_group = 2 * purge + embargo + window_bars + horizon_bars
    group_bars = total_bars // config.groups
    if group_bars < least_group:
        raise ValueError(
            f"timeline of {total_bars} bars gives {config.groups} groups of {group_bars} bars; "
            f"each needs at least {least_group} (2 x purge {purge} + embargo {embargo} + "
            f"window {window_bars} + horizon {horizon_bars})"
        )
    plan = cpcv_plan(
        total_bars, config.groups, config.test_groups, purge_bars=purge, embargo_bars=embargo
    )
    least_last_run = config.val_bars + purge + window_bars + horizon_bars
    splits = []
    for split in plan.splits:
        runs = _runs(split.train)
        last_start, last_end = runs[-1]
        if last_end - last_start < least_last_run:
            raise ValueError(
                f"split {split.index} (test groups {split.test_groups}): its latest training run "
                f"of {last_end - last_start} bars cannot hold val_bars {config.val_bars} + purge "
                f"{purge} + window {window_bars} + horizon {horizon_bars}; use fewer groups or "
                "fewer validation bars"
            )
        val_start = last_end - config.val_bars
        train = [*runs[:-1], (last_start, val_start - purge)]
        splits.append(
            TrainingRanges(
                index=split.index,
                train_ranges=tuple(
                    (first_open_ms + a * ONE_MINUTE_MS, first_open_ms + b * ONE_MINUTE_MS)
                    for a, b in train
                ),
                val_start_ms=first_open_ms + val_start * ONE_MINUTE_MS,
                val_end_ms=first_open_ms + last_end * ONE_MINUTE_MS,
            )
        )
    return CpcvFolds(plan=plan, first_open_ms=first_open_ms, splits=tuple(splits))


Schedule = Sequence[Fold] | CpcvFolds
"""How a sweep trains and scores: walk-forward folds, or a CPCV set-up."""


def training_units(schedule: Schedule) -> list[TrainingRanges]:
    """The models one trial trains: one per walk-forward fold, or one per CPCV split."""
    if isinstance(schedule, CpcvFolds):
        return list(schedule.splits)
    return [fold.training_ranges() for fold in schedule]


def make_schedule(
    first_open_ms: int,
    last_open_ms: int,
    config: FoldConfig,
    window_bars: int,
    horizon_bars: int = HORIZON_BARS,
) -> Schedule:
    """`make_cpcv` for scheme `cpcv`, else `make_folds`; `window_bars` and `horizon_bars` are
    the longest model window and label horizon the search samples."""
    if config.scheme == "cpcv":
        return make_cpcv(first_open_ms, last_open_ms, config, window_bars, horizon_bars)
    return make_folds(first_open_ms, last_open_ms, config, horizon_bars)


def sweep_schedule(job: TuneJobConfig, first_open_ms: int, last_open_ms: int) -> Schedule:
    """The folds (or CPCV splits) a sweep of `job` cuts over bars opening from `first_open_ms`
    to `last_open_ms` (epoch ms): purged for the longest window and horizon its search samples.
    Anything that must line up with a sweep's test blocks cuts them through this."""
    return make_schedule(
        first_open_ms,
        last_open_ms,
        job.folds,
        max(job.search.window_bars),
        max(job.search.horizon_bars),
    )
