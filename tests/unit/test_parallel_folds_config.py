"""Fold-parallel trials' settings: `TuneJobConfig.parallel_folds` against the folds a trial
trains, and the resources one fold-parallel trial holds against a cluster's."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from configs.schema import FoldConfig, ScalingSettings, TuneJobConfig
from models.sweep import check_parallel_folds_fit, trial_resources


def test_parallel_folds_defaults_to_one_run_per_trial() -> None:
    assert TuneJobConfig().parallel_folds == 1
    with pytest.raises(ValidationError, match="parallel_folds"):
        TuneJobConfig(parallel_folds=0)


def test_parallel_folds_may_not_exceed_the_walk_forward_folds() -> None:
    assert TuneJobConfig(parallel_folds=3, folds=FoldConfig(max_folds=3)).parallel_folds == 3
    with pytest.raises(ValidationError, match=r"parallel_folds \(4\) exceeds the 3 folds"):
        TuneJobConfig(parallel_folds=4, folds=FoldConfig(max_folds=3))
    # Without max_folds the data's length decides how many folds there are.
    assert TuneJobConfig(parallel_folds=64).parallel_folds == 64


def test_parallel_folds_may_not_exceed_the_cpcv_splits() -> None:
    cpcv = FoldConfig(scheme="cpcv", groups=6, test_groups=2, val_bars=500)
    assert cpcv.most_training_units == 15
    assert TuneJobConfig(parallel_folds=15, folds=cpcv).parallel_folds == 15
    with pytest.raises(ValidationError, match=r"exceeds the 15 folds \(or splits\)"):
        TuneJobConfig(parallel_folds=16, folds=cpcv)


def test_a_trial_holds_its_driver_and_one_worker_group_per_fold_in_flight() -> None:
    scaling = ScalingSettings(num_workers=2, cpus_per_worker=1.5, trial_driver_cpus=0.5)
    job = TuneJobConfig(parallel_folds=3, scaling=scaling)
    # 3 fold runs of 2 workers x 1.5 CPU, and the driver.
    assert trial_resources(job, units=5) == {"CPU": 9.5}
    # Fewer folds than parallel_folds: only as many runs as folds.
    assert trial_resources(job, units=2) == {"CPU": 6.5}
    gpu = job.model_copy(update={"scaling": scaling.model_copy(update={"use_gpu": True})})
    assert trial_resources(gpu, units=5) == {"CPU": 9.5, "GPU": 6.0}


def test_a_fold_parallel_trial_larger_than_the_cluster_is_refused() -> None:
    job = TuneJobConfig(
        parallel_folds=2,
        scaling=ScalingSettings(cpus_per_worker=0.75, trial_driver_cpus=0.5),
    )
    check_parallel_folds_fit(job, units=2, cluster={"CPU": 2.0})
    with pytest.raises(ValueError, match=r"holds 2 CPU .* the cluster has 1.5"):
        check_parallel_folds_fit(job, units=2, cluster={"CPU": 1.5})
    gpu = job.model_copy(update={"scaling": job.scaling.model_copy(update={"use_gpu": True})})
    with pytest.raises(ValueError, match=r"holds 2 GPU .* the cluster has 1"):
        check_parallel_folds_fit(gpu, units=2, cluster={"CPU": 8.0, "GPU": 1.0})
    # Trials training their folds in one run, or with one fold only, are left to Tune.
    one_run = job.model_copy(update={"parallel_folds": 1})
    check_parallel_folds_fit(one_run, units=2, cluster={"CPU": 1.0})
    check_parallel_folds_fit(job, units=1, cluster={"CPU": 1.0})
