"""Fold-parallel trials: the same sweep with its folds trained in turn and two at a time.

Both sweeps run in this process' Ray (real Tune, Train and Lightning), on the same simulated
Silver and seed, with ASHA on: one trial of a small GRU over two walk-forward folds of one epoch
each, `parallel_folds` 1 (every fold in one Train run) and 2 (a Train run per fold, both at
once). The leaderboards (status, iterations, score, validation loss, every leaderboard metric),
each fold's trained weights, the trial's per-bar out-of-sample returns and its fold metrics must
be bit-identical, and the parallel sweep must have trained each fold in its own run.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from configs.schema import (
    FoldConfig,
    ScalingSettings,
    SearchSpaceConfig,
    SimConfig,
    TuneJobConfig,
)
from market.sim_silver import silver_frame, simulated_bars
from models.artifact import load_model_files, read_model_dir
from models.dataset import arrays_from_table
from models.folds import make_schedule
from models.runs import COMPLETED, RunDir
from models.selection import leaderboard_frame
from models.sweep import TrialOutcome, run_sweep

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_two_cpus() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def tiny_job(parallel_folds: int) -> TuneJobConfig:
    return TuneJobConfig(
        seed=11,
        num_samples=1,
        max_epochs=1,
        asha=True,
        asha_grace_period=1,
        max_train_windows=800,
        parallel_folds=parallel_folds,
        search=SearchSpaceConfig(
            family=["gru"],
            hidden_size=[8],
            num_layers=[1],
            dropout=[0.0, 0.1],
            learning_rate=(0.003, 0.01),
            window_bars=[16],
            batch_size=[128],
        ),
        # Two fold runs of 0.75 CPU and the trial's 0.5 CPU driver fill the 2 CPUs.
        scaling=ScalingSettings(cpus_per_worker=0.75, trial_driver_cpus=0.5),
        folds=FoldConfig(train_bars=1500, val_bars=400, test_bars=500, max_folds=2),
    )


def test_parallel_folds_give_the_sequential_leaderboard(ray_two_cpus: None, tmp_path: Path) -> None:
    import ray

    sim = SimConfig(seed=5, anchor_date=date(2024, 1, 1), signal_strength=0.3, gap_rate=0.0)
    arrays = arrays_from_table(silver_frame(simulated_bars(sim, ["SIMAAA"], 3)).to_arrow())
    sequential_job, parallel_job = tiny_job(1), tiny_job(2)
    schedule = make_schedule(
        int(arrays.open_time_ms.min()), int(arrays.open_time_ms.max()), sequential_job.folds, 16
    )
    assert len(list(schedule)) == 2
    data_ref = ray.put(arrays)
    runs: dict[str, tuple[RunDir, TrialOutcome]] = {}
    for name, job in (("sequential", sequential_job), ("parallel", parallel_job)):
        run = RunDir(tmp_path / name)
        (outcome,) = run_sweep(job, schedule, data_ref, run)
        assert outcome.status == COMPLETED, (name, outcome.error)
        runs[name] = (run, outcome)

    (sequential_run, sequential), (parallel_run, parallel) = runs["sequential"], runs["parallel"]
    pd.testing.assert_frame_equal(
        without_trial_id([sequential]), without_trial_id([parallel]), check_exact=True
    )
    assert sequential.iterations == parallel.iterations == 4  # 2 epochs, checkpoint, evaluation
    first, second = sequential_run.trial(sequential.trial_id), parallel_run.trial(parallel.trial_id)
    for fold in (0, 1):
        one = load_model_files(read_model_dir(first.fold(fold))).net.state_dict()
        other = load_model_files(read_model_dir(second.fold(fold))).net.state_dict()
        assert one.keys() == other.keys()
        assert all(torch.equal(one[key], other[key]) for key in one), f"fold {fold} weights"
    sequential_record, parallel_record = first.load().evaluation, second.load().evaluation
    assert np.array_equal(sequential_record.open_time_ms, parallel_record.open_time_ms)
    assert np.array_equal(sequential_record.returns, parallel_record.returns)
    assert _without_model(sequential_record.fold_metrics) == _without_model(
        parallel_record.fold_metrics
    )
    # One Train run per trial in turn, one per fold in parallel.
    assert _train_runs(sequential_run) == {f"train-{sequential.trial_id}"}
    assert _train_runs(parallel_run) == {f"train-{parallel.trial_id}-fold_{i}" for i in (0, 1)}


def without_trial_id(outcomes: list[TrialOutcome]) -> pd.DataFrame:
    """The leaderboard without trial ids (they differ between experiments)."""
    return leaderboard_frame(outcomes, {}).drop(columns="trial_id")


def _without_model(fold_metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold metrics without the model's name (its trial id)."""
    return [{k: v for k, v in metrics.items() if k != "model"} for metrics in fold_metrics]


def _train_runs(run: RunDir) -> set[str]:
    return {path.name for path in run.train_storage.iterdir() if path.is_dir()}
