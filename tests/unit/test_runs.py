"""models.runs: the run directory's layout, and trial and reference records with their folds
read back."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from pydantic import SecretStr

from configs.schema import ObjectStoreConfig
from market.storage import object_store_settings, s3_filesystem
from models.evaluation import Evaluation
from models.folds import Fold
from models.runs import (
    BUY_AND_HOLD,
    RunDir,
    TrialReturns,
    aligned_returns,
    reference_dir_name,
    reference_name,
)
from models.sweep import ray_storage

FOLDS = (
    Fold(0, 0, 600_000, 660_000, 780_000, 840_000, 1_200_000),
    Fold(1, 0, 1_200_000, 1_260_000, 1_380_000, 1_440_000, 1_800_000),
)


def evaluation(name: str) -> Evaluation:
    open_time_ms = np.arange(840_000, 1_800_000, 60_000, dtype=np.int64)
    returns = np.linspace(-0.001, 0.002, len(open_time_ms))
    fold_metrics = [
        {"model": name, "fold": f.index, "test_start_ms": f.test_start_ms, "sharpe": 1.5 + f.index}
        for f in FOLDS
    ]
    regimes = [{"model": name, "regime": "high_vol", "sharpe": 0.5}]
    metrics = {"score": 2.0, "bars": 16.0}
    return Evaluation(name, open_time_ms, returns, metrics, fold_metrics, regimes)


@pytest.mark.parametrize("spelling", ["path", "file_uri"])
def test_layout_of_a_run_directory(tmp_path: Path, spelling: str) -> None:
    run = RunDir(tmp_path if spelling == "path" else f"file://{tmp_path}")
    assert run.root.is_local and run.root.local_path() == tmp_path
    trial = run.trial("t_1")
    assert trial.path.local_path() == tmp_path / "trials" / "t_1" and trial.trial_id == "t_1"
    assert trial.fold(3) == trial.path / "fold_3"
    assert trial.record == trial.path / "record.npz"
    assert trial.evaluation == trial.path / "evaluation.json"
    assert trial.config == trial.path / "config.json"
    assert run.leaderboard_parquet.local_path() == tmp_path / "leaderboard.parquet"
    assert run.leaderboard_csv.local_path() == tmp_path / "leaderboard.csv"
    assert run.report.local_path() == tmp_path / "report.html"
    assert (run.tune_storage.local_path(), run.train_storage.local_path()) == (
        tmp_path / "tune",
        tmp_path / "train",
    )
    assert not run.has_leaderboard() and run.leaderboard_mtime() == 0.0
    run.leaderboard_csv.write_text("trial_id\n")
    assert (tmp_path / "leaderboard.csv").read_text() == "trial_id\n"
    assert run.has_leaderboard() and run.leaderboard_mtime() > 0
    assert list(run.read_leaderboard().columns) == ["trial_id"]
    # Written whole through a temporary file renamed into place: none is left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["leaderboard.csv"]


def test_record_and_folds_round_trip(tmp_path: Path) -> None:
    trial = RunDir(tmp_path).trial("t_1")
    assert not trial.has_record()
    saved = evaluation("t_1")
    trial.save(saved, FOLDS)
    assert trial.has_record()
    loaded = trial.load()
    assert loaded.folds == FOLDS
    got = loaded.evaluation
    assert got.name == "t_1"
    np.testing.assert_array_equal(got.open_time_ms, saved.open_time_ms)
    np.testing.assert_array_equal(got.returns, saved.returns)
    assert got.open_time_ms.dtype == np.int64 and got.returns.dtype == np.float64
    assert (got.metrics, got.fold_metrics, got.regimes) == (
        saved.metrics,
        saved.fold_metrics,
        saved.regimes,
    )
    assert trial.load("renamed").evaluation.name == "renamed"


def test_a_record_written_before_folds_were_stored_reads_with_no_folds(tmp_path: Path) -> None:
    trial = RunDir(tmp_path).trial("t_old")
    saved = evaluation("t_old")
    trial.save(saved, FOLDS)
    # The evaluation.json of an older sweep: metrics, per-fold metrics and regimes only.
    data = json.loads(trial.evaluation.read_text())
    trial.evaluation.write_text(json.dumps({k: data[k] for k in ("metrics", "folds", "regimes")}))
    loaded = trial.load()
    assert loaded.folds is None
    assert loaded.evaluation.fold_metrics == saved.fold_metrics


def test_references_round_trip_with_folds_under_reversible_directory_names(
    tmp_path: Path,
) -> None:
    run = RunDir(tmp_path)
    assert run.reference_names() == []  # a run written before references were stored
    names = [BUY_AND_HOLD, "baseline:ar5", "baseline:naive/seasonal", "..", "ü.~%"]
    for name in names:
        run.reference(name).save(evaluation(name), FOLDS)
    dirs = {p.name for p in run.references.iterdir()}
    assert run.references.local_path() == tmp_path / "references"
    assert run.reference(BUY_AND_HOLD).path == run.references / "buy_and_hold"
    assert run.reference("baseline:ar5").path.name == "baseline%3Aar5"
    # One plain path component each: nothing escapes references/ or nests under it.
    assert len(dirs) == len(names)
    assert all(d and set(d) <= set(string.ascii_letters + string.digits + "_-%") for d in dirs)
    assert all(reference_name(reference_dir_name(name)) == name for name in names)
    assert run.reference_names() == sorted(names)
    for name in names:
        loaded = run.reference(name).load()
        assert loaded.evaluation.name == name and loaded.folds == FOLDS
        np.testing.assert_array_equal(loaded.evaluation.returns, evaluation(name).returns)
        assert loaded.evaluation.metrics == evaluation(name).metrics
    # A directory without a record (an interrupted write) is not listed.
    (run.references / "partial").mkdir()
    assert run.reference_names() == sorted(names)
    with pytest.raises(ValueError, match="non-empty"):
        run.reference("")


def test_aligned_returns_stack_the_stored_records_on_their_shared_minutes(tmp_path: Path) -> None:
    run = RunDir(tmp_path)

    def stored(trial_ids: list[str]) -> TrialReturns:
        return aligned_returns([run.trial(tid).load().evaluation for tid in trial_ids])

    first, second = evaluation("t_1"), evaluation("t_2")
    second.returns = second.returns * 2.0
    # t_3 misses the first two minutes: the matrix keeps only the minutes all three share.
    third = evaluation("t_3")
    third.open_time_ms, third.returns = third.open_time_ms[2:], -third.returns[2:]
    for saved in (first, second, third):
        run.trial(saved.name).save(saved, FOLDS)
    stacked = stored(["t_2", "t_3", "t_1"])
    assert stacked.names == ("t_2", "t_3", "t_1")
    np.testing.assert_array_equal(stacked.open_time_ms, first.open_time_ms[2:])
    assert stacked.returns.shape == (len(first.returns) - 2, 3)
    np.testing.assert_array_equal(stacked.returns[:, 0], 2.0 * first.returns[2:])
    np.testing.assert_array_equal(stacked.returns[:, 1], -first.returns[2:])
    np.testing.assert_array_equal(stacked.returns[:, 2], first.returns[2:])
    assert stored([]).returns.shape == (0, 0)


def test_ray_storage_of_a_local_run_is_its_path_and_of_an_object_store_its_filesystem(
    tmp_path: Path,
) -> None:
    local = RunDir(f"file://{tmp_path}/run")
    assert ray_storage(local.tune_storage) == {"storage_path": f"{tmp_path}/run/tune"}
    config = ObjectStoreConfig(
        endpoint_url="http://127.0.0.1:1", access_key_id="key", secret_access_key=SecretStr("s")
    )
    remote = RunDir("s3://bucket/runs/one", config)
    storage = ray_storage(remote.train_storage)
    assert storage["storage_path"] == "bucket/runs/one/train"
    assert isinstance(storage["storage_filesystem"], pafs.S3FileSystem)
    assert storage["storage_filesystem"] == s3_filesystem(object_store_settings(config))
    assert str(remote.trial("t_1").fold(0)) == "s3://bucket/runs/one/trials/t_1/fold_0"
    assert list(tmp_path.iterdir()) == [], "resolving a run directory creates nothing"
