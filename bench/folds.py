"""Benchmark: trial-folds per hour of one sweep with `parallel_folds` 1 vs 2, same seed, one run.

Simulated Silver with a planted signal (polars engine) is built once in memory; then the same
sweep (the smoke config's search space and folds, FIFO so that every trial trains every fold,
one trial at a time) runs twice in this process' Ray through `models.sweep.run_sweep`: its
trials training their folds in turn in one Ray Train run, then two folds at a time, each in its
own run. Every fold run gets the same scaling (`--cpus-per-worker`, default 0.75 CPU per worker,
one torch thread) and each trial's driver `--driver-cpus`, so that two fold runs and the driver
fit a 2-CPU Ray. A trial-fold is one fold model trained (and later scored); trial-folds per hour
= trials x folds / the sweep's wall time in hours (training, each trial's walk-forward
evaluation and Tune's own work). The two sweeps must give the same scores (`same_scores`).
Last line: one JSON object.

    .venv/bin/python -m bench.folds [--config configs/tune/smoke.yaml] [--days 14] [--trials 4]
        [--max-epochs N] [--max-train-windows N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

from cluster.ray_runtime import connect
from configs.schema import SimConfig, TuneJobConfig, load_config
from market.sim_silver import silver_frame, simulated_bars
from models.runs import COMPLETED

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(REPO / "configs" / "tune" / "smoke.yaml"))
    parser.add_argument("--days", type=int, default=14, help="days of simulated minutes")
    parser.add_argument("--trials", type=int, default=4, help="trials per sweep")
    parser.add_argument("--max-epochs", type=int, help="epochs per fold (default: the config's)")
    parser.add_argument(
        "--max-train-windows", type=int, help="training windows per fold (default: the config's)"
    )
    parser.add_argument("--cpus-per-worker", type=float, default=0.75)
    parser.add_argument("--driver-cpus", type=float, default=0.5)
    args = parser.parse_args()
    job = load_config(args.config, TuneJobConfig)
    job = job.model_copy(
        update={
            "asha": False,
            "num_samples": args.trials,
            "max_concurrent_trials": 1,
            "max_epochs": args.max_epochs or job.max_epochs,
            "max_train_windows": args.max_train_windows or job.max_train_windows,
            "scaling": job.scaling.model_copy(
                update={
                    "cpus_per_worker": args.cpus_per_worker,
                    "trial_driver_cpus": args.driver_cpus,
                }
            ),
        }
    )
    resources = connect(job.ray)
    import ray

    from models.dataset import arrays_from_table
    from models.folds import sweep_schedule, training_units
    from models.runs import RunDir
    from models.sweep import run_sweep

    config = SimConfig(seed=3, anchor_date=date(2024, 1, 1), signal_strength=0.3)
    arrays = arrays_from_table(
        silver_frame(simulated_bars(config, ["SIMAAA", "SIMBBB"], args.days)).to_arrow()
    )
    schedule = sweep_schedule(job, int(arrays.open_time_ms.min()), int(arrays.open_time_ms.max()))
    folds = len(training_units(schedule))
    data_ref = ray.put(arrays)
    figures: dict[str, Any] = {
        "trials": job.num_samples,
        "folds": folds,
        "epochs_per_fold": job.max_epochs,
        "max_train_windows": job.max_train_windows,
        "cluster_cpus": resources.get("CPU"),
        "cpus_per_worker": args.cpus_per_worker,
        "driver_cpus": args.driver_cpus,
    }
    scores: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for parallel in (1, 2):
            variant = job.model_copy(update={"parallel_folds": parallel})
            run = RunDir(Path(scratch) / f"parallel-{parallel}")
            started = time.perf_counter()
            outcomes = run_sweep(variant, schedule, data_ref, run)
            seconds = time.perf_counter() - started
            completed = [o for o in outcomes if o.status == COMPLETED]
            # FIFO: a completed trial trained and scored every fold.
            trial_folds = len(completed) * folds
            scores[parallel] = [float(o.metrics["score"]) for o in completed]
            figures[f"seconds_{parallel}"] = round(seconds, 1)
            figures[f"completed_{parallel}"] = len(completed)
            figures[f"trial_folds_per_hour_{parallel}"] = round(trial_folds / seconds * 3600, 1)
            print(
                f"parallel_folds={parallel}: {trial_folds} trial-folds in {seconds:.1f} s",
                file=sys.stderr,
            )
    figures["ratio"] = round(
        figures["trial_folds_per_hour_2"] / max(figures["trial_folds_per_hour_1"], 1e-9), 3
    )
    figures["same_scores"] = scores[1] == scores[2]
    print(json.dumps(figures, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
