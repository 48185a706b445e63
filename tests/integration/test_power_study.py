"""The detection-power study end to end at its smallest (`configs/power/ci.yaml`).

`python -m jobs.power` runs as its own process (its own local Ray): one market with a strongly
planted signal and one random walk, each swept by real Ray Tune / Ray Train trials and judged
by the promotion gate, the two runs at once as Ray tasks. The planted signal must be found
and promoted, the random walk refused; the tables, the report with its power curve and the
JSON line must say so. The power figures themselves come from `configs/power/full.yaml`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from models.runs import RunDir

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CI_CONFIG = REPO / "configs" / "power" / "ci.yaml"


def run_power(out: Path) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-m", "jobs.power", "--config", str(CI_CONFIG), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return summary


def test_planted_signal_is_detected_and_the_random_walk_refused(tmp_path: Path) -> None:
    out = tmp_path / "power"
    summary = run_power(out)
    assert (summary["false_promotions"], summary["random_walk_runs"]) == (0, 1)
    (strength,) = summary["strengths"]
    assert strength["promotion_rate"] == 1.0 and strength["median_dsr"] >= 0.95
    assert summary["min_detectable_accuracy"] == strength["planted_accuracy"] > 0.6
    assert strength["oracle_sharpe"] > 0

    runs = pd.read_csv(out / "power_runs.csv").set_index("kind")
    planted, walk = runs.loc["planted"], runs.loc["random_walk"]
    assert bool(planted["promoted"]) and not bool(walk["promoted"])
    assert walk["dsr"] < 0.95
    # the planted component measured in user units: a coin on the random walk
    assert abs(walk["planted_accuracy"] - 0.5) < 0.03 < planted["planted_accuracy"] - 0.5
    assert set(pd.read_parquet(out / "power_runs.parquet")["run"]) == set(runs["run"])

    # The two sweeps ran at once from one driver: each holds its own trials, none of the other's.
    for name in runs["run"]:
        board = RunDir(out / "runs" / name / "sweep").read_leaderboard()
        assert len(board) == 2
        assert board["trial_id"].str.rsplit("_", n=1).str[0].nunique() == 1

    report = (out / "power_report.html").read_text()
    assert 'id="fig-power"' in report and "min_detectable_accuracy" in report
