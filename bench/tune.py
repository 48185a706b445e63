"""Benchmark: the smoke sweep with ASHA vs without (FIFO), same seed, same data, one run.

Simulated Silver with a planted signal is written once (polars engine); then `run_selection`
runs the smoke config twice in this process' Ray. Reports wall time and trial-epochs (training
reports, one per fold epoch) of each, and their ratios. Last line: one JSON object.

    .venv/bin/python -m bench.tune [--config configs/tune/smoke.yaml] [--days 14]
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
from market.sim_silver import write_sim_silver
from models.runs import COMPLETED

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(REPO / "configs" / "tune" / "smoke.yaml"))
    parser.add_argument("--days", type=int, default=14)
    args = parser.parse_args()
    job = load_config(args.config, TuneJobConfig)
    connect(job.ray)
    from models.selection import run_selection

    figures: dict[str, Any] = {"trials": job.num_samples}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        config = SimConfig(seed=3, anchor_date=date(2024, 1, 1), signal_strength=0.3)
        write_sim_silver(work / "lake", config, ["SIMAAA", "SIMBBB"], args.days)
        for label, asha in (("asha", True), ("fifo", False)):
            variant = job.model_copy(update={"asha": asha})
            started = time.perf_counter()
            result = run_selection(
                str(work / "lake"),
                str(work / f"registry-{label}"),
                variant,
                work / f"out-{label}",
                progress=lambda line: print(line, file=sys.stderr),
            )
            seconds = time.perf_counter() - started
            board = result.leaderboard
            # training_iteration counts fold epochs plus the checkpoint and evaluation reports
            epochs = int(
                sum(
                    min(i, variant.max_epochs * result.summary["folds"])
                    for i in board["iterations"]
                )
            )
            figures[label] = {
                "seconds": round(seconds, 1),
                "trial_epochs": epochs,
                "completed": int((board["status"] == COMPLETED).sum()),
                "best_score": result.summary["best_score"],
            }
            print(f"{label}: {figures[label]}", file=sys.stderr)
    figures["time_ratio"] = round(figures["asha"]["seconds"] / figures["fifo"]["seconds"], 3)
    figures["epoch_ratio"] = round(
        figures["asha"]["trial_epochs"] / max(1, figures["fifo"]["trial_epochs"]), 3
    )
    print(json.dumps(figures, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
