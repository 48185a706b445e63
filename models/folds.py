"""Walk-forward folds on the shared minute timeline of every symbol.

All lengths are in bars; one bar is one minute, so a fold boundary is a UTC minute and every
symbol shares it. Per fold, in time order:

    [train ......][purge][val ...][purge][test ...][embargo]  next fold's test block ...

The purge (default: the 10-bar target horizon plus the longest feature window) keeps the labels
of one range from overlapping the inputs or labels of the next; the embargo leaves bars unscored
after each test block so that consecutive test blocks do not share a target horizon. Test blocks
tile the end of the timeline in order, so their out-of-sample predictions concatenate into one
track record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from configs.schema import FoldConfig
from market.features.spec import HORIZON_BARS, LONGEST_WINDOW_BARS
from market.klines import ONE_MINUTE_MS


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


def default_purge_bars() -> int:
    """The minimum purge: the target horizon plus the longest feature window, in bars."""
    return HORIZON_BARS + LONGEST_WINDOW_BARS


def make_folds(first_open_ms: int, last_open_ms: int, config: FoldConfig) -> list[Fold]:
    """Folds covering [first_open_ms, last_open_ms] (inclusive open times), most recent last.

    With `max_folds`, the most recent folds are kept. Raises ValueError when the timeline is too
    short for even one fold, naming the bars needed and the bars available.
    """
    purge = default_purge_bars() if config.purge_bars is None else config.purge_bars
    if purge < HORIZON_BARS:
        raise ValueError(f"purge_bars={purge} is shorter than the {HORIZON_BARS}-bar horizon")
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
