"""Tune run directories as the dashboard shows them, read through `models.runs`.

`find_run_dirs` lists the runs under a directory, `load_run` reads one (leaderboard, best
completed trial's record with its walk-forward folds, the sweep's stored buy-and-hold
reference, report), and `folds_view` / `leaderboard_view` are the tables shown.

Units: times are UTC; returns are fractions; Sharpe ratios are annualised from 1-minute bars;
equity is a multiple of the starting capital.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pandas as pd

from models.folds import Fold
from models.report import LEADERBOARD_METRICS, sort_leaderboard
from models.runs import BUY_AND_HOLD, COMPLETED, RunDir, TrialRecord

# Hyper-parameters worth a column of their own in the leaderboard shown; the rest follow.
SHOWN_HYPERPARAMETERS: Final = (
    "family",
    "hidden_size",
    "num_layers",
    "window_bars",
    "learning_rate",
)
LEADERBOARD_COLUMNS: Final[tuple[str, ...]] = (
    "rank",
    "trial_id",
    "status",
    "score",
    "dsr",
    *(metric for metric in LEADERBOARD_METRICS if metric != "score"),
    *SHOWN_HYPERPARAMETERS,
)
# Per-fold out-of-sample metrics shown beside each fold's ranges.
_FOLD_METRICS: Final = ("sharpe", "total_return", "max_drawdown", "exposure")


@dataclass(frozen=True)
class RunData:
    """What the dashboard shows of one tune run directory.

    `leaderboard`: every trial, sorted by score (mean fold net Sharpe, annualised) descending.
    `best`: the saved record of the best completed trial that left one (per-bar net simple
    returns on the portfolio timeline, and its folds when they were stored), None when none
    did. `buy_and_hold`: the sweep's own buy-and-hold reference record (per-bar net simple
    returns over the same folds and test minutes, with the sweep's fees and symbols), None for
    a run written before references were stored. `notes`: readable remarks about what is
    missing.
    """

    path: Path
    leaderboard: pd.DataFrame
    best: TrialRecord | None
    buy_and_hold: TrialRecord | None
    report: Path | None
    notes: tuple[str, ...] = ()


def find_run_dirs(runs: str | Path) -> list[Path]:
    """Tune run directories under `runs` (each with a leaderboard), newest first.

    `runs` may itself be a run directory. Newest means the most recently written leaderboard;
    ties go by name, descending (`tune-<UTC time>` names sort in time order).
    """
    root = Path(runs)
    if not root.is_dir():
        return []
    if RunDir(root).has_leaderboard():
        return [root]
    found = [p for p in root.iterdir() if p.is_dir() and RunDir(p).has_leaderboard()]
    ordered = sorted(found, key=lambda p: (RunDir(p).leaderboard_mtime(), p.name), reverse=True)
    return ordered


def read_leaderboard(run: RunDir) -> pd.DataFrame:
    """The run's leaderboard (Parquet, else CSV), sorted by score descending, NaN last."""
    board = run.read_leaderboard()
    if "trial_id" in board.columns:
        board["trial_id"] = board["trial_id"].astype(str)
    return sort_leaderboard(board)


def load_run(run_dir: str | Path) -> RunData:
    """Leaderboard, best completed trial's record, stored buy-and-hold reference and report
    path of a tune run directory."""
    run = RunDir(Path(run_dir))
    report = run.report
    board = read_leaderboard(run)
    notes: list[str] = []
    best: TrialRecord | None = None
    if "trial_id" not in board.columns:
        notes.append("the leaderboard has no trial_id column")
    else:
        statuses = board["status"].astype(str) if "status" in board.columns else None
        for position, trial_id in enumerate(board["trial_id"]):
            if statuses is not None and statuses.iloc[position] != COMPLETED:
                continue
            trial = run.trial(str(trial_id))
            if trial.has_record():
                best = trial.load()
                break
            notes.append(f"trial {trial_id} left no out-of-sample record")
        if best is None:
            notes.append("no completed trial left an out-of-sample record")
    hold = run.reference(BUY_AND_HOLD)
    return RunData(
        path=run.root.local_path(),
        leaderboard=board,
        best=best,
        buy_and_hold=hold.load() if hold.has_record() else None,
        report=report.local_path() if report.is_file() else None,
        notes=tuple(notes),
    )


def missing_folds_message(record: TrialRecord) -> str | None:
    """None when the record has its walk-forward folds; otherwise why the fold table, which
    needs them, is not shown."""
    if record.folds is not None:
        return None
    return (
        f"Trial {record.evaluation.name} was recorded before walk-forward folds were stored "
        "with trial records, so its fold ranges cannot be shown; a new sweep records them."
    )


def folds_view(folds: Sequence[Fold], fold_metrics: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per walk-forward fold: its train, validation and test ranges as UTC times
    ([start, end) of bar open times) and its out-of-sample metrics after fees (Sharpe
    annualised from 1-minute bars, return and drawdown as fractions, exposure the mean
    absolute position)."""
    metrics = {int(row["fold"]): row for row in fold_metrics if "fold" in row}
    rows = []
    for fold in folds:
        row: dict[str, Any] = {"fold": fold.index}
        for part in ("train", "val", "test"):
            for edge in ("start", "end"):
                stamp = getattr(fold, f"{part}_{edge}_ms")
                row[f"{part}_{edge}"] = pd.Timestamp(stamp, unit="ms", tz="UTC")
        scored = metrics.get(fold.index, {})
        row |= {name: scored.get(name) for name in _FOLD_METRICS}
        rows.append(row)
    return pd.DataFrame(rows)


def leaderboard_view(board: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as shown: a 1-based `rank` in score order, the LEADERBOARD_COLUMNS
    present first, then the remaining columns; an all-empty `error` column is dropped."""
    view = board.reset_index(drop=True).copy()
    view.insert(0, "rank", range(1, len(view) + 1))
    if "error" in view.columns and not view["error"].fillna("").astype(str).str.strip().any():
        view = view.drop(columns="error")
    first = [c for c in LEADERBOARD_COLUMNS if c in view.columns]
    return view[first + [c for c in view.columns if c not in first]]
