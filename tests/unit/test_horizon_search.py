"""The label horizon and label kind as search dimensions: config, folds, backtest hold, the
leaderboard, the registered model and the horizon Serve reports."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
from pydantic import ValidationError

from configs.schema import (
    BacktestConfig,
    FoldConfig,
    LabelHorizon,
    LabelKind,
    SearchSpaceConfig,
    SimConfig,
)
from market.features.spec import HORIZON_BARS, LONGEST_WINDOW_BARS, TARGET_HORIZONS_BARS
from market.klines import ONE_MINUTE_MS
from market.sim_silver import simulated_bars
from models.artifact import load_registered
from models.dataset import INPUT_COLUMNS, LABEL_KINDS
from models.folds import cpcv_min_purge_bars, default_purge_bars, make_cpcv, make_folds
from models.networks import ModelSpec
from models.registry import ModelRegistry
from models.runs import COMPLETED
from models.selection import leaderboard_frame
from models.sweep import TrialOutcome, backtest_for, spec_of
from models.untrained import EAGER_THRESHOLDS, MODEL_NAME, register_model
from serve.engine.production import ServingModel
from serve.engine.signals import compute_signal

T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC


def test_the_config_offers_exactly_the_silver_horizons_and_defaults_to_today() -> None:
    assert get_args(LabelHorizon) == TARGET_HORIZONS_BARS
    assert get_args(LabelKind) == LABEL_KINDS
    space = SearchSpaceConfig()
    assert space.horizon_bars == [HORIZON_BARS] and space.label == ["direction"]
    assert SearchSpaceConfig(horizon_bars=[10, 240]).horizon_bars == [10, 240]
    with pytest.raises(ValidationError):
        SearchSpaceConfig(horizon_bars=[15])
    with pytest.raises(ValidationError):
        SearchSpaceConfig(horizon_bars=[])
    with pytest.raises(ValidationError):
        SearchSpaceConfig(label=["trend"])


def test_the_hold_follows_the_horizon_unless_the_config_sets_it() -> None:
    assert BacktestConfig().hold_bars is None
    assert backtest_for(BacktestConfig(), 60).hold_bars == 60
    assert backtest_for(BacktestConfig(hold_bars=5), 60).hold_bars == 5


@pytest.mark.parametrize("horizon", TARGET_HORIZONS_BARS)
def test_the_purge_covers_the_horizon(horizon: int) -> None:
    config = FoldConfig(train_bars=1000, val_bars=300, test_bars=300, embargo_bars=0)
    folds = make_folds(T0, T0 + 4999 * ONE_MINUTE_MS, config, horizon)
    purge = (horizon + LONGEST_WINDOW_BARS) * ONE_MINUTE_MS
    assert default_purge_bars(horizon) * ONE_MINUTE_MS == purge
    for fold in folds:
        assert fold.val_start_ms - fold.train_end_ms == purge
        assert fold.test_start_ms - fold.val_end_ms == purge
    short = config.model_copy(update={"purge_bars": horizon - 1})
    with pytest.raises(ValueError, match=f"shorter than the {horizon}-bar horizon"):
        make_folds(T0, T0 + 4999 * ONE_MINUTE_MS, short, horizon)
    cpcv = FoldConfig(scheme="cpcv", groups=4, test_groups=2, embargo_bars=20, val_bars=300)
    plan = make_cpcv(T0, T0 + 7999 * ONE_MINUTE_MS, cpcv, 16, horizon).plan
    assert plan.purge_bars == cpcv_min_purge_bars(16, horizon) == horizon + LONGEST_WINDOW_BARS + 16


def trial_config(horizon: int, label: str) -> dict[str, object]:
    return {
        "family": "gru",
        "hidden_size": 8,
        "num_layers": 1,
        "dropout": 0.0,
        "learning_rate": 1e-3,
        "window_bars": 16,
        "batch_size": 64,
        "tcn_kernel_size": 2,
        "tcn_dilations": [1, 2],
        "horizon_bars": horizon,
        "label": label,
    }


def test_a_trial_spec_and_the_leaderboard_carry_horizon_and_label() -> None:
    spec = spec_of(trial_config(60, "triple_barrier"))
    assert (spec.horizon_bars, spec.label) == (60, "triple_barrier")
    older = {k: v for k, v in trial_config(60, "direction").items() if k[:2] not in ("ho", "la")}
    assert spec_of(older).horizon_bars == HORIZON_BARS
    # A model saved before the fields existed loads as the default horizon's direction model.
    saved = spec.model_dump(exclude={"horizon_bars", "label"})
    assert ModelSpec.model_validate(saved).horizon_bars == HORIZON_BARS
    outcomes = [
        TrialOutcome("t_0", trial_config(240, "direction"), COMPLETED, 3, {"score": 1.0}),
        TrialOutcome("t_1", trial_config(30, "triple_barrier"), COMPLETED, 3, {"score": 0.5}),
    ]
    board = leaderboard_frame(outcomes, {})
    assert board["horizon_bars"].tolist() == [240, 30]
    assert board["label"].tolist() == ["direction", "triple_barrier"]


def test_serve_reports_the_horizon_of_the_model_it_serves(tmp_path: Path) -> None:
    version = register_model(tmp_path, seed=3, horizon_bars=30)
    registry = ModelRegistry(str(tmp_path))
    assert registry.metadata(MODEL_NAME, version)["horizon_bars"] == 30
    model = load_registered(registry, MODEL_NAME, version)
    assert model.spec.horizon_bars == 30 and model.spec.input_size == len(INPUT_COLUMNS)
    serving = ServingModel(version, model, {}, EAGER_THRESHOLDS, 0)
    assert serving.info().horizon_minutes == 30
    bars = simulated_bars(SimConfig(seed=3, gap_rate=0.0), ["SIMA"], 1).tail(400)
    signal = compute_signal("SIMA", bars, model, EAGER_THRESHOLDS, version, "hash")
    assert signal.horizon_minutes == 30 and signal.p_up is not None
    short = compute_signal("SIMA", bars.head(5), model, EAGER_THRESHOLDS, version, "hash")
    assert short.signal == "NEUTRAL" and short.horizon_minutes == 30
