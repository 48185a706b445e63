"""A sweep's run directory, in one place: every name under it is spelled here and nowhere else.

```
<run>/leaderboard.parquet, leaderboard.csv       every trial, by score (models.report)
<run>/report.html                                the robustness report (models.report)
<run>/tune/, <run>/train/                        Ray Tune and Ray Train storage
<run>/trials/<trial_id>/config.json              the trial's sampled hyper-parameters
<run>/trials/<trial_id>/fold_<i>/                fold i's model files (models.artifact)
<run>/trials/<trial_id>/record.npz               out-of-sample record: open_time_ms, returns
<run>/trials/<trial_id>/evaluation.json          metrics, per-fold metrics, regimes, folds
```

A Ray Train checkpoint of a trial is laid out as its trial directory (fold model files under
`fold_<i>/`) and copied into it whole. Records written before the walk-forward folds were
stored with them read back with `folds` None; readers say so instead of guessing the ranges.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from models.evaluation import Evaluation
from models.folds import Fold

LEADERBOARD_PARQUET: Final = "leaderboard.parquet"
LEADERBOARD_CSV: Final = "leaderboard.csv"
REPORT_FILE: Final = "report.html"
TRIALS: Final = "trials"
TUNE_STORAGE: Final = "tune"
TRAIN_STORAGE: Final = "train"
CONFIG_FILE: Final = "config.json"
RECORD_FILE: Final = "record.npz"
EVALUATION_FILE: Final = "evaluation.json"

BUY_AND_HOLD: Final = "buy_and_hold"
"""The name of the buy-and-hold reference record, scored over the same test minutes."""

# A trial's status in the leaderboard's `status` column.
COMPLETED: Final = "completed"
EARLY_STOPPED: Final = "early_stopped"
ERRORED: Final = "error"

# Key of the walk-forward fold ranges in evaluation.json; "folds" already holds the per-fold
# metrics, which older readers expect there.
_FOLD_RANGES: Final = "fold_ranges"


@dataclass(frozen=True)
class TrialRecord:
    """A trial's saved out-of-sample record and the walk-forward folds it was scored on.

    `folds` is None for a record written before folds were stored with records.
    """

    evaluation: Evaluation
    folds: tuple[Fold, ...] | None


@dataclass(frozen=True)
class TrialDir:
    """One trial's directory (or a training checkpoint laid out the same way)."""

    path: Path

    @property
    def trial_id(self) -> str:
        return self.path.name

    def fold(self, index: int) -> Path:
        """The model files of walk-forward fold `index`."""
        return self.path / f"fold_{index}"

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def record(self) -> Path:
        return self.path / RECORD_FILE

    @property
    def evaluation(self) -> Path:
        return self.path / EVALUATION_FILE

    def has_record(self) -> bool:
        return self.record.is_file() and self.evaluation.is_file()

    def save(self, evaluation: Evaluation, folds: Sequence[Fold]) -> None:
        """Write the out-of-sample record: `record.npz` (`open_time_ms`, UTC epoch ms of each
        test minute, and `returns`, portfolio net per-bar simple returns) and
        `evaluation.json` (`metrics`, per-fold metrics under `folds`, `regimes`, and the
        walk-forward folds' train/validation/test ranges in epoch ms). Creates the directory."""
        self.path.mkdir(parents=True, exist_ok=True)
        np.savez(self.record, open_time_ms=evaluation.open_time_ms, returns=evaluation.returns)
        self.evaluation.write_text(
            json.dumps(
                {
                    "metrics": evaluation.metrics,
                    "folds": evaluation.fold_metrics,
                    "regimes": evaluation.regimes,
                    _FOLD_RANGES: [fold.as_dict() for fold in folds],
                },
                default=float,
            )
        )

    def load(self, name: str | None = None) -> TrialRecord:
        """The record `save` wrote, its Evaluation named `name` (default: the trial id)."""
        with np.load(self.record) as record:
            open_time_ms = np.asarray(record["open_time_ms"], dtype=np.int64)
            returns = np.asarray(record["returns"], dtype=np.float64)
        data = json.loads(self.evaluation.read_text())
        ranges = data.get(_FOLD_RANGES)
        evaluation = Evaluation(
            name=self.trial_id if name is None else name,
            open_time_ms=open_time_ms,
            returns=returns,
            metrics=data["metrics"],
            fold_metrics=data["folds"],
            regimes=data["regimes"],
        )
        folds = None if ranges is None else tuple(Fold(**fold) for fold in ranges)
        return TrialRecord(evaluation=evaluation, folds=folds)


@dataclass(frozen=True)
class RunDir:
    """A sweep's output directory (`jobs.tune --out`), local."""

    root: Path

    @property
    def trials(self) -> Path:
        return self.root / TRIALS

    def trial(self, trial_id: str) -> TrialDir:
        return TrialDir(self.trials / trial_id)

    @property
    def leaderboard_parquet(self) -> Path:
        return self.root / LEADERBOARD_PARQUET

    @property
    def leaderboard_csv(self) -> Path:
        return self.root / LEADERBOARD_CSV

    def has_leaderboard(self) -> bool:
        return self.leaderboard_parquet.is_file() or self.leaderboard_csv.is_file()

    def leaderboard_mtime(self) -> float:
        """When the leaderboard was last written (epoch seconds); 0.0 when it is missing."""
        files = (self.leaderboard_parquet, self.leaderboard_csv)
        return max((f.stat().st_mtime for f in files if f.is_file()), default=0.0)

    @property
    def report(self) -> Path:
        return self.root / REPORT_FILE

    @property
    def tune_storage(self) -> Path:
        return self.root / TUNE_STORAGE

    @property
    def train_storage(self) -> Path:
        return self.root / TRAIN_STORAGE
