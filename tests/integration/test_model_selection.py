"""The honesty tests: the smoke sweep of `jobs.tune` end to end on simulated Silver.

Each test runs `python -m jobs.tune` as its own process (its own local Ray, real Ray Tune, Ray
Train and Lightning) on the smoke config. Silver is written by the polars engine of the shared
spec (held equal to the Spark ETL by tests/integration/test_silver_etl.py), which keeps these
tests off the RayDP start-up.

- planted signal: the sweep finds it (out-of-sample hit rate well above 50%) and promotes;
- no signal (random walk, several seeds): nothing is promoted, DSR < 0.95. A look-ahead leak in
  the features, windows or backtest would turn noise into a 'signal' and fail this test;
- shuffled labels on the planted data: no edge, nothing promoted;
- the same seed and config give the same leaderboard.

The planted and repeated sweeps are the smoke sweep itself (4 trials, ASHA stopping some). The
control sweeps (random walks, shuffled labels) run its first two candidates on the same data:
see `control_config`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from configs.schema import SimConfig
from market.sim_silver import write_sim_silver
from models.registry import PRODUCTION, ModelRegistry
from models.runs import BUY_AND_HOLD, COMPLETED, EARLY_STOPPED, RunDir

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "tune" / "smoke.yaml"
SYMBOLS = ["SIMAAA", "SIMBBB"]
DAYS = 14
CONTROL_TRIALS = 2
BOARD_COLUMNS = ["trial_index", "status", "iterations", "score", "val_loss", "family"]


def control_config(directory: Path, search: dict[str, Any] | None = None) -> Path:
    """The smoke config with 2 trials instead of 4, for the sweeps that must find no edge.

    Their checks keep their power with 2 trials: the data, folds and test bars are the smoke
    sweep's, so each trial's out-of-sample accuracy has the same standard error; a look-ahead
    leak lifts every trial, so two trials expose it as surely as four; and the gate deflates a
    Sharpe ratio by the expected best of fewer trials, so a random walk clears a lower hurdle
    to be promoted: refusing it with 2 trials is at least as demanding as with 4.
    """
    smoke: dict[str, Any] = yaml.safe_load(SMOKE.read_text())
    smoke["num_samples"] = CONTROL_TRIALS
    smoke["search"].update(search or {})
    path = directory / "control.yaml"
    path.write_text(yaml.safe_dump(smoke))
    return path


def run_tune(
    lake: Path, registry: Path, out: Path, *extra: str, config: Path = SMOKE
) -> dict[str, Any]:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.tune",
            "--lake",
            str(lake),
            "--registry",
            str(registry),
            "--config",
            str(config),
            "--out",
            str(out),
            *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return summary


def board(out: Path) -> pd.DataFrame:
    frame = RunDir(out).read_leaderboard()
    frame["trial_index"] = frame["trial_id"].str.split("_").str[-1]
    return frame.sort_values("trial_index")[BOARD_COLUMNS].reset_index(drop=True)


@pytest.fixture(scope="module")
def planted_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lake = tmp_path_factory.mktemp("planted")
    config = SimConfig(seed=3, anchor_date=date(2024, 1, 1), signal_strength=0.3, gap_rate=2e-4)
    write_sim_silver(lake, config, SYMBOLS, DAYS)
    return lake


@pytest.fixture(scope="module")
def planted_run(planted_lake: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("planted_run")
    summary = run_tune(planted_lake, root / "registry", root / "out")
    return {"summary": summary, "root": root}


def test_planted_signal_is_found_and_promoted(planted_run: dict[str, Any]) -> None:
    summary, root = planted_run["summary"], planted_run["root"]
    assert summary["best_signal_hit_rate"] > 0.6
    assert summary["best_directional_accuracy"] > 0.55
    gate = summary["gate"]
    assert gate["promoted"], gate["reasons"]
    assert gate["dsr"] >= 0.95
    assert summary["best_score"] > max(summary["references"].values())
    registry = ModelRegistry(str(root / "registry"))
    assert registry.get_alias("signal", PRODUCTION) == gate["version"]
    metadata = registry.metadata("signal", gate["version"])
    for key in ("feature_spec_hash", "training_data_range", "seed", "metrics", "git_commit"):
        assert key in metadata
    assert (metadata["horizon_bars"], metadata["label"]) == (10, "direction")
    # PBO over the completed trials: ASHA may leave a single one, and then PBO is undefined
    completed = summary["trial_status"].get(COMPLETED, 0)
    assert summary["pbo_detail"]["trials"] == completed
    if completed >= 2:
        assert 0.0 <= summary["pbo"] <= 1.0 and summary["pbo_detail"]["splits"] > 0
    else:
        assert summary["pbo"] is None and summary["pbo_detail"]["reason"]
    assert metadata["pbo"] == summary["pbo"] == gate["pbo"]
    assert {"model.pt", "spec.json", "scaler.json"} <= set(metadata["files"])
    # every trial started is on the leaderboard, early-stopped ones included
    leaderboard = board(root / "out")
    assert len(leaderboard) == summary["trials"] == 4
    assert set(leaderboard["status"]) <= {COMPLETED, EARLY_STOPPED}
    assert (leaderboard["status"] == EARLY_STOPPED).any()
    # the best trial's record carries the walk-forward folds it was scored on
    record = RunDir(root / "out").trial(summary["best_trial"]).load()
    assert record.folds is not None and len(record.folds) == summary["folds"]
    assert [row["fold"] for row in record.evaluation.fold_metrics] == [
        fold.index for fold in record.folds
    ]
    # every reference the gate compared against is stored with the run, on the same folds
    run = RunDir(root / "out")
    assert run.reference_names() == sorted(summary["references"])
    hold = run.reference(BUY_AND_HOLD).load()
    assert hold.evaluation.name == BUY_AND_HOLD and hold.folds == record.folds
    assert hold.evaluation.score == summary["references"][BUY_AND_HOLD]
    report = RunDir(root / "out").report.read_text()
    assert "PROMOTED" in report and "buy_and_hold" in report
    shown = 'id="fig-pbo"' if summary["pbo"] is not None else "PBO undefined: "
    assert "<h2>Backtest overfitting</h2>" in report and shown in report


# The second control sweeps the longer horizons with triple-barrier and meta labels (seed 13
# samples one trial of each) over cross-asset inputs of correlated symbols: no label kind,
# horizon or input set may find an edge where there is none.
LONGER_COST_AWARE_CROSS_ASSET = {
    "horizon_bars": [30, 60],
    "label": ["triple_barrier", "meta"],
    "cross_asset": [True],
}


@pytest.mark.parametrize(
    ("seed", "search", "correlation"),
    [(11, None, 0.0), (13, LONGER_COST_AWARE_CROSS_ASSET, 0.5)],
)
def test_no_signal_is_never_promoted(
    seed: int, search: dict[str, Any] | None, correlation: float, tmp_path: Path
) -> None:
    lake = tmp_path / "lake"
    config = SimConfig(
        seed=seed,
        anchor_date=date(2024, 1, 1),
        signal_strength=0.0,
        market_correlation=correlation,
    )
    write_sim_silver(lake, config, SYMBOLS, DAYS)
    control = control_config(tmp_path, search)
    summary = run_tune(
        lake, tmp_path / "registry", tmp_path / "out", "--seed", str(seed), config=control
    )
    assert summary["trials"] == CONTROL_TRIALS
    gate = summary["gate"]
    assert not gate["promoted"]
    assert gate["dsr"] < 0.95, gate
    assert summary["best_directional_accuracy"] < 0.53
    registry = ModelRegistry(str(tmp_path / "registry"))
    assert registry.get_alias("signal", "production") is None
    # The leaderboard shows each trial's horizon and label; the registered (unpromoted) best
    # trial records its own, and its backtest held positions for that horizon.
    leaderboard = RunDir(tmp_path / "out").read_leaderboard()
    best = leaderboard.set_index("trial_id").loc[summary["best_trial"]]
    metadata = registry.metadata("signal", gate["version"])
    assert metadata["horizon_bars"] == best["horizon_bars"] == metadata["backtest"]["hold_bars"]
    assert metadata["label"] == best["label"]
    expected = search or {"horizon_bars": [10], "label": ["direction"]}
    assert set(leaderboard["horizon_bars"]) <= set(expected["horizon_bars"])
    assert set(leaderboard["label"]) == set(expected["label"])
    cross_asset = expected.get("cross_asset", [False])
    assert set(leaderboard["cross_asset"]) == set(cross_asset)
    if cross_asset == [True]:
        # One global model over both symbols, reading both symbols' returns; Serve cannot
        # build those inputs (or a meta model's side), so the gate says so.
        assert metadata["cross_asset_symbols"] == SYMBOLS
        assert "xret_SIMBBB" in metadata["input_columns"]
        assert any("cross-asset inputs are research-only" in r for r in gate["reasons"])
        if metadata["label"] == "meta":
            assert metadata["meta_label"]["primary_feature"] == "ret_10"


def test_shuffled_labels_give_no_edge(planted_lake: Path, tmp_path: Path) -> None:
    control = control_config(tmp_path)
    summary = run_tune(
        planted_lake, tmp_path / "registry", tmp_path / "out", "--shuffle-labels", config=control
    )
    assert summary["trials"] == CONTROL_TRIALS
    assert not summary["gate"]["promoted"]
    assert summary["best_directional_accuracy"] < 0.53


def test_same_seed_and_config_give_the_same_leaderboard(
    planted_lake: Path, planted_run: dict[str, Any], tmp_path: Path
) -> None:
    again = run_tune(planted_lake, tmp_path / "registry", tmp_path / "out")
    first, second = board(planted_run["root"] / "out"), board(tmp_path / "out")
    pd.testing.assert_frame_equal(first, second)
    assert again["pbo"] == planted_run["summary"]["pbo"]
