"""A tiny CPCV sweep end to end: `python -m jobs.tune` (its own local Ray, real Ray Tune, Ray
Train and Lightning) with `folds.scheme: cpcv` on simulated Silver with a planted signal.

The example config (configs/tune/cpcv.yaml) is shrunk to N = 3 groups and k = 2 test groups
(3 splits, so 3 models per trial, and 2 backtest paths) and one one-epoch trial of a small GRU;
what a sweep of several trials adds (DSR, PBO) is the walk-forward tests' concern.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from configs.schema import FoldConfig, SimConfig, TuneJobConfig, load_config
from market.sim_silver import write_sim_silver
from models.registry import ModelRegistry
from models.runs import BUY_AND_HOLD, RunDir

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs" / "tune" / "cpcv.yaml"


def tiny_cpcv_config(path: Path) -> Path:
    job = load_config(EXAMPLE, TuneJobConfig)
    tiny = job.model_copy(
        update={
            "num_samples": 1,
            "max_epochs": 1,
            "asha": False,
            "max_train_windows": 1500,
            "search": job.search.model_copy(
                update={"family": ["gru"], "hidden_size": [8], "window_bars": [16]}
            ),
            "folds": FoldConfig(
                scheme="cpcv", groups=3, test_groups=2, val_bars=500, embargo_bars=30
            ),
        }
    )
    path.write_text(yaml.safe_dump(tiny.model_dump(mode="json")))
    return path


def test_a_cpcv_sweep_records_the_path_sharpe_distribution(tmp_path: Path) -> None:
    lake, out, registry = tmp_path / "lake", tmp_path / "out", tmp_path / "registry"
    sim = SimConfig(seed=3, anchor_date=date(2024, 1, 1), signal_strength=0.3)
    write_sim_silver(lake, sim, ["SIMAAA"], 4)  # 5,760 bars: groups of 1,920
    config = tiny_cpcv_config(tmp_path / "cpcv.yaml")
    command = [sys.executable, "-m", "jobs.tune", "--lake", str(lake), "--registry"]
    command += [str(registry), "--config", str(config), "--out", str(out)]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])

    assert summary["scheme"] == "cpcv" and summary["folds"] == 3
    assert summary["trial_status"] == {"completed": 1}
    distributions = summary["path_sharpes"]
    assert list(distributions) == [summary["best_trial"]]
    for stats in distributions.values():
        assert stats["paths"] == len(stats["sharpes"]) == 2
        assert (stats["groups"], stats["test_groups"], stats["embargo_bars"]) == (3, 2, 30)
        assert stats["mean"] == pytest.approx(np.mean(stats["sharpes"]))
        assert stats["std"] == pytest.approx(np.std(stats["sharpes"]))
        assert stats["share_positive"] == np.mean(np.array(stats["sharpes"]) > 0)
        assert set(stats["quantiles"]) == {"0.05", "0.25", "0.50", "0.75", "0.95"}
    best = distributions[summary["best_trial"]]
    assert summary["best_score"] == pytest.approx(best["mean"])
    # The planted signal is learnt (better than a coin out of sample), if not yet after fees.
    assert summary["best_directional_accuracy"] > 0.52

    run = RunDir(out)
    record = run.trial(summary["best_trial"]).load()
    assert record.folds == () and record.paths is not None
    assert record.paths.as_dict() == best
    assert {row["path"] for row in record.evaluation.fold_metrics} == {0, 1}
    hold = run.reference(BUY_AND_HOLD).load()
    assert hold.paths is not None and hold.paths.paths == 2
    assert hold.evaluation.score == summary["references"][BUY_AND_HOLD]
    assert len(run.reference_names()) > 1  # the darts baselines too, on the same paths

    report = run.report.read_text()
    assert "<h2>Path Sharpe distribution</h2>" in report and 'id="fig-path-sharpes"' in report
    version = summary["gate"]["version"]
    metadata = ModelRegistry(str(registry)).metadata("signal", version)
    assert metadata["cpcv_paths"] == best
    # Registered: split 0, tested on groups 0 and 1, trained on the newest group only.
    training = metadata["training_data_range"]
    assert len(training["ranges"]) == 1
    assert training["start_ms"] >= metadata["evaluated_range"]["start_ms"] + 2 * 1920 * 60_000
