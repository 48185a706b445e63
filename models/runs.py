"""A sweep's run directory, in one place: every name under it is spelled here and nowhere else.

```
<run>/leaderboard.parquet, leaderboard.csv       every trial, by score (models.report)
<run>/report.html                                the robustness report (models.report)
<run>/tune/, <run>/train/                        Ray Tune and Ray Train storage
<run>/trials/<trial_id>/config.json              the trial's sampled hyper-parameters
<run>/trials/<trial_id>/fold_<i>/                fold i's model files (models.artifact)
<run>/trials/<trial_id>/record.npz               out-of-sample record: open_time_ms, returns
<run>/trials/<trial_id>/evaluation.json          metrics, per-fold metrics, regimes, folds;
                                                 under CPCV also the path Sharpe distribution
<run>/references/<reference_dir>/                a reference record (buy-and-hold, each darts
                                                 baseline): record.npz and evaluation.json,
                                                 as a trial's
```

A reference is scored by the sweep on the candidates' folds and test minutes, with the sweep's
own backtest settings and symbols. Its name (`buy_and_hold`, `baseline:ar5`) may hold
characters a directory name cannot, so `<reference_dir>` is the name with every character
other than ASCII letters, digits, `_` and `-` written as `%XX` per UTF-8 byte
(`baseline:ar5` -> `baseline%3Aar5`): always one path component (never `.` or `..`), and
decoded back to the name by `RunDir.reference_names`.

A Ray Train checkpoint of a trial is laid out as its trial directory (fold model files under
`fold_<i>/`) and copied into it whole. Records written before the walk-forward folds were
stored with them read back with `folds` None; readers say so instead of guessing the ranges.

A CPCV record (`folds.scheme: cpcv`) stores no walk-forward folds (`folds` is empty): its
per-fold metrics are per path and group (a `path` key beside `fold`, the group), and
`TrialRecord.paths` holds its distribution of path Sharpe ratios; the fold directories
`fold_<i>/` hold split i's model (splits in `itertools.combinations` order).

A run directory is a local path or an object-store URI (`market.storage`): every name here is a
`market.storage.Location`, and every file is read and written through its filesystem, each
file whole (temporary file and rename locally, one PUT on an object store).
"""

from __future__ import annotations

import io
import json
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import unquote

import numpy as np
import pandas as pd

from configs.schema import ObjectStoreConfig
from market.storage import Location, as_location
from models.evaluation import Evaluation, PathDistribution
from models.folds import Fold

LEADERBOARD_PARQUET: Final = "leaderboard.parquet"
LEADERBOARD_CSV: Final = "leaderboard.csv"
REPORT_FILE: Final = "report.html"
TRIALS: Final = "trials"
REFERENCES: Final = "references"
TUNE_STORAGE: Final = "tune"
TRAIN_STORAGE: Final = "train"
CONFIG_FILE: Final = "config.json"
RECORD_FILE: Final = "record.npz"
EVALUATION_FILE: Final = "evaluation.json"

BUY_AND_HOLD: Final = "buy_and_hold"
"""The name of the buy-and-hold reference record, scored over the same test minutes."""

# Characters a reference's directory name keeps as they are; the rest are %-escaped. "." is
# escaped too, so that no name can become "." or "..".
_PLAIN: Final = frozenset(string.ascii_letters + string.digits + "_-")

# A trial's status in the leaderboard's `status` column.
COMPLETED: Final = "completed"
EARLY_STOPPED: Final = "early_stopped"
ERRORED: Final = "error"

# Key of the walk-forward fold ranges in evaluation.json; "folds" already holds the per-fold
# metrics, which older readers expect there.
_FOLD_RANGES: Final = "fold_ranges"
# Key of a CPCV record's path Sharpe distribution in evaluation.json.
_CPCV_PATHS: Final = "cpcv_paths"


@dataclass(frozen=True)
class TrialRecord:
    """A trial's saved out-of-sample record and the walk-forward folds it was scored on.

    `folds` is None for a record written before folds were stored with records, and empty
    for a CPCV record, whose `paths` is its distribution of path Sharpe ratios (None for a
    walk-forward record).
    """

    evaluation: Evaluation
    folds: tuple[Fold, ...] | None
    paths: PathDistribution | None = None


@dataclass(frozen=True)
class TrialReturns:
    """Several records' out-of-sample returns side by side: `returns[t, n]` is record n's
    portfolio net per-bar simple return at UTC minute `open_time_ms[t]` (epoch ms). Only the
    minutes every record was scored on are kept, ascending; the columns follow `names`."""

    names: tuple[str, ...]
    open_time_ms: np.ndarray  # int64, (T,)
    returns: np.ndarray  # float64, (T, N)


def aligned_returns(evaluations: Sequence[Evaluation]) -> TrialReturns:
    """The T x N matrix of the records' per-bar net returns on their shared minutes.

    The trials of one sweep are scored on the same test minutes, so nothing is dropped there;
    intersecting keeps the matrix well-defined for records of differing coverage.
    """
    if not evaluations:
        return TrialReturns((), np.zeros(0, dtype=np.int64), np.zeros((0, 0)))
    shared = np.asarray(evaluations[0].open_time_ms, dtype=np.int64)
    for evaluation in evaluations[1:]:
        shared = np.intersect1d(shared, np.asarray(evaluation.open_time_ms, dtype=np.int64))
    columns = []
    for evaluation in evaluations:
        times = np.asarray(evaluation.open_time_ms, dtype=np.int64)
        # Records are on an ascending timeline (np.unique built it), so searchsorted finds them.
        columns.append(
            np.asarray(evaluation.returns, dtype=np.float64)[np.searchsorted(times, shared)]
        )
    return TrialReturns(
        names=tuple(e.name for e in evaluations),
        open_time_ms=shared,
        returns=np.column_stack(columns),
    )


@dataclass(frozen=True)
class TrialDir:
    """One trial's directory (or a training checkpoint, or a reference, laid out the same way).

    `record_name` is the name a loaded record's Evaluation carries; None means the directory's
    name (a trial's id). A reference's directory holds its escaped name, so it is given here.
    """

    path: Location
    record_name: str | None = None

    def __init__(self, path: Location | str | Path, record_name: str | None = None) -> None:
        object.__setattr__(self, "path", as_location(path))
        object.__setattr__(self, "record_name", record_name)

    @property
    def trial_id(self) -> str:
        return self.path.name

    def fold(self, index: int) -> Location:
        """The model files of walk-forward fold `index`."""
        return self.path / f"fold_{index}"

    @property
    def config(self) -> Location:
        return self.path / CONFIG_FILE

    @property
    def record(self) -> Location:
        return self.path / RECORD_FILE

    @property
    def evaluation(self) -> Location:
        return self.path / EVALUATION_FILE

    def has_record(self) -> bool:
        return self.record.is_file() and self.evaluation.is_file()

    def save(
        self,
        evaluation: Evaluation,
        folds: Sequence[Fold],
        paths: PathDistribution | None = None,
    ) -> None:
        """Write the out-of-sample record: `record.npz` (`open_time_ms`, UTC epoch ms of each
        test minute, and `returns`, portfolio net per-bar simple returns) and
        `evaluation.json` (`metrics`, per-fold metrics under `folds`, `regimes`, the
        walk-forward folds' train/validation/test ranges in epoch ms, and a CPCV record's
        path Sharpe distribution). Creates the directory."""
        buffer = io.BytesIO()
        np.savez(buffer, open_time_ms=evaluation.open_time_ms, returns=evaluation.returns)
        self.record.write_bytes(buffer.getvalue())
        data = {
            "metrics": evaluation.metrics,
            "folds": evaluation.fold_metrics,
            "regimes": evaluation.regimes,
            _FOLD_RANGES: [fold.as_dict() for fold in folds],
        }
        if paths is not None:
            data[_CPCV_PATHS] = paths.as_dict()
        self.evaluation.write_text(json.dumps(data, default=float))

    def load(self, name: str | None = None) -> TrialRecord:
        """The record `save` wrote, its Evaluation named `name` (default: `record_name`, else
        the trial id)."""
        with np.load(io.BytesIO(self.record.read_bytes())) as record:
            open_time_ms = np.asarray(record["open_time_ms"], dtype=np.int64)
            returns = np.asarray(record["returns"], dtype=np.float64)
        data = json.loads(self.evaluation.read_text())
        ranges = data.get(_FOLD_RANGES)
        if name is None:
            name = self.trial_id if self.record_name is None else self.record_name
        evaluation = Evaluation(
            name=name,
            open_time_ms=open_time_ms,
            returns=returns,
            metrics=data["metrics"],
            fold_metrics=data["folds"],
            regimes=data["regimes"],
        )
        folds = None if ranges is None else tuple(Fold(**fold) for fold in ranges)
        paths = data.get(_CPCV_PATHS)
        return TrialRecord(
            evaluation=evaluation,
            folds=folds,
            paths=None if paths is None else PathDistribution.from_dict(paths),
        )


@dataclass(frozen=True)
class RunDir:
    """A sweep's output directory (`jobs.tune --out`): a local path or an object-store URI,
    `s3://` reached with `object_store` (its unset fields from the AWS environment)."""

    root: Location

    def __init__(
        self, root: Location | str | Path, object_store: ObjectStoreConfig | None = None
    ) -> None:
        object.__setattr__(self, "root", as_location(root, object_store))

    @property
    def trials(self) -> Location:
        return self.root / TRIALS

    def trial(self, trial_id: str) -> TrialDir:
        return TrialDir(self.trials / trial_id)

    @property
    def references(self) -> Location:
        return self.root / REFERENCES

    def reference(self, name: str) -> TrialDir:
        """The record directory of reference `name` (BUY_AND_HOLD, `baseline:<model>`); its
        loaded Evaluation is named `name`."""
        return TrialDir(self.references / reference_dir_name(name), record_name=name)

    def reference_names(self) -> list[str]:
        """The names of the reference records stored in the run, sorted; empty for a run
        written before references were stored."""
        if not self.references.is_dir():
            return []
        stored = (p for p in self.references.iterdir() if TrialDir(p).has_record())
        return sorted(reference_name(p.name) for p in stored)

    @property
    def leaderboard_parquet(self) -> Location:
        return self.root / LEADERBOARD_PARQUET

    @property
    def leaderboard_csv(self) -> Location:
        return self.root / LEADERBOARD_CSV

    def has_leaderboard(self) -> bool:
        return self.leaderboard_parquet.is_file() or self.leaderboard_csv.is_file()

    def leaderboard_mtime(self) -> float:
        """When the leaderboard was last written (epoch seconds); 0.0 when it is missing."""
        return max(self.leaderboard_parquet.mtime(), self.leaderboard_csv.mtime())

    def read_leaderboard(self) -> pd.DataFrame:
        """The leaderboard as written (Parquet, else CSV); FileNotFoundError when neither is
        there."""
        if self.leaderboard_parquet.is_file():
            return pd.read_parquet(io.BytesIO(self.leaderboard_parquet.read_bytes()))
        if self.leaderboard_csv.is_file():
            return pd.read_csv(io.BytesIO(self.leaderboard_csv.read_bytes()))
        raise FileNotFoundError(f"{self.root} has no leaderboard (Parquet or CSV)")

    @property
    def report(self) -> Location:
        return self.root / REPORT_FILE

    @property
    def tune_storage(self) -> Location:
        return self.root / TUNE_STORAGE

    @property
    def train_storage(self) -> Location:
        return self.root / TRAIN_STORAGE


def reference_dir_name(name: str) -> str:
    """The directory name of reference `name`: every character other than an ASCII letter,
    digit, `_` or `-` written as `%XX` per UTF-8 byte. Raises ValueError for an empty name."""
    if not name:
        raise ValueError("a reference needs a non-empty name")
    return "".join(
        char if char in _PLAIN else "".join(f"%{byte:02X}" for byte in char.encode())
        for char in name
    )


def reference_name(dir_name: str) -> str:
    """The reference name that `reference_dir_name` wrote as `dir_name`."""
    return unquote(dir_name, errors="strict")
