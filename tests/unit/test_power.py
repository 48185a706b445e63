"""The detection-power study's arithmetic: the planted component in user units (directional
accuracy, oracle Sharpe) and the summaries (promotion rates, minimum detectable accuracy,
false promotions), on hand-computed cases."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from configs.schema import PowerStudyConfig, load_config
from market.sources.sim import SimBars
from market.storage import as_location
from models.power import (
    PLANTED,
    RANDOM_WALK,
    PowerRun,
    directional_hits,
    forward_log_returns,
    hold_sharpe,
    measure_planted,
    oracle_hold_returns,
    plan_runs,
    planted_measure_of,
    runs_frame,
    strengths_frame,
    summarise_power,
    write_outputs,
)
from tests.conftest import REPO

NAN = float("nan")


def test_forward_log_returns_skip_labels_that_cross_an_outage() -> None:
    close = np.exp([0.0, 1.0, 3.0, 6.0])
    whole = np.ones(4, dtype=bool)
    np.testing.assert_allclose(forward_log_returns(close, whole, 1), [1, 2, 3, NAN])
    np.testing.assert_allclose(forward_log_returns(close, whole, 2), [3, 5, NAN, NAN])
    gap = np.array([True, True, False, True])
    np.testing.assert_allclose(forward_log_returns(close, gap, 1), [1, NAN, NAN, NAN])
    assert np.isnan(forward_log_returns(close, whole, 4)).all()


def test_directional_hits_count_only_defined_signs() -> None:
    signal = np.array([1.0, -2.0, 0.5, 3.0, -1.0, 0.0])
    forward = np.array([0.1, -0.3, -0.2, 0.0, NAN, 0.4])
    # bar 0 and 1 hit, bar 2 misses; a zero return, an undefined one and a zero signal are out
    assert directional_hits(signal, forward) == (2, 3)


def test_oracle_holds_every_horizon_and_annualises_per_hold() -> None:
    signal = np.array([1.0, 9.0, -1.0, 9.0, 1.0, 9.0])
    forward = np.array([0.02, 5.0, -0.01, 5.0, 0.03, 5.0])
    holds = oracle_hold_returns(signal, forward, 2)
    np.testing.assert_allclose(holds, [0.02, 0.01, 0.03])
    # per-hold Sharpe 0.02 / 0.01 = 2; 800 bars a year in 2-bar holds: x sqrt(400)
    assert hold_sharpe(holds, 2, 800.0) == pytest.approx(40.0)
    assert math.isnan(hold_sharpe(holds[:1], 2, 800.0))


def test_measure_planted_pools_symbols_over_the_out_of_sample_ranges() -> None:
    minutes = 8
    times = np.arange(minutes, dtype=np.int64) * 60_000
    log_close = np.array([[0, 1, 3, 2, 4, 5, 5, 9], [0, -1, -1, -2, 0, 1, 2, 3]], dtype=float)
    signal = np.array([[1, 1, 1, 1, 1, 1, 1, 1], [-1, 1, -1, -1, -1, 1, 1, 1]], dtype=float)
    block = SimBars(
        open_time_ms=np.stack([times, times]),
        open=np.exp(log_close),
        high=np.exp(log_close),
        low=np.exp(log_close),
        close=np.exp(log_close),
        volume=np.ones((2, minutes)),
        trades=np.ones((2, minutes), dtype=np.int64),
        taker_buy_base=np.ones((2, minutes)),
        present=np.ones((2, minutes), dtype=bool),
        planted_signal=signal,
    )
    # Out of sample: minutes 2..5 (the range ends at minute 6, exclusive), horizon 2 bars.
    measure = measure_planted(block, [(2 * 60_000, 6 * 60_000)], 2, 800.0)
    # symbol 0 forwards from minutes 2..5: +1, +3, +1, +4 under signal +1: 4 hits
    # symbol 1 forwards: +1, +3, +2, +2 under signals -1, -1, -1, +1: 1 hit
    assert (measure.accuracy, measure.bars) == (5 / 8, 8)
    # holds from minutes 2 and 4 of each symbol: +1, +1, then -1 x +1 and -1 x +2
    holds = np.array([1.0, 1.0, -1.0, -2.0])
    assert measure.holds == 4
    assert measure.oracle_sharpe == pytest.approx(holds.mean() / holds.std(ddof=1) * 20.0)


def _run(kind: str, strength: float, seed: int, promoted: bool, accuracy: float) -> PowerRun:
    return PowerRun(
        kind=PLANTED if kind == PLANTED else RANDOM_WALK,
        strength=strength,
        seed=seed,
        planted_accuracy=accuracy,
        oracle_sharpe=10.0 * (accuracy - 0.5),
        promoted=promoted,
        winning_score=None if accuracy < 0.5 else 100.0 * (accuracy - 0.5) + seed,
        dsr=0.99 if promoted else 0.4,
        pbo=0.1 if promoted else 0.6,
        best_directional_accuracy=accuracy,
        trials=4,
        seconds=1.0,
    )


def test_summary_rates_and_the_smallest_detected_accuracy() -> None:
    runs = [
        # 0.05: 1 of 3 promoted
        _run(PLANTED, 0.05, 1, True, 0.53),
        _run(PLANTED, 0.05, 2, False, 0.54),
        _run(PLANTED, 0.05, 3, False, 0.52),
        # 0.1: 4 of 5 promoted = 80%: detected at its median accuracy 0.57
        *[
            _run(PLANTED, 0.1, s, s != 5, a)
            for s, a in zip(range(1, 6), (0.56, 0.57, 0.58, 0.6, 0.5), strict=True)
        ],
        # 0.2: all promoted, at a higher accuracy
        _run(PLANTED, 0.2, 1, True, 0.61),
        _run(PLANTED, 0.2, 2, True, 0.63),
        _run(RANDOM_WALK, 0.0, 7, False, 0.50),
        _run(RANDOM_WALK, 0.0, 8, True, 0.51),
        _run(RANDOM_WALK, 0.0, 9, False, 0.49),
    ]
    summary = summarise_power(runs, detection_rate=0.8)
    by_strength = {s.strength: s for s in summary.strengths}
    assert [s.strength for s in summary.strengths] == [0.05, 0.1, 0.2]
    assert by_strength[0.05].promotion_rate == pytest.approx(1 / 3)
    assert by_strength[0.1].promotion_rate == pytest.approx(0.8)
    assert by_strength[0.1].planted_accuracy == pytest.approx(0.57)
    assert by_strength[0.2].planted_accuracy == pytest.approx(0.62)
    # winning scores 100 (acc - 0.5) + seed: 0.05 -> 4, 6, 5 -> median 5
    assert by_strength[0.05].median_winning_score == pytest.approx(5.0)
    assert by_strength[0.05].median_dsr == pytest.approx(0.4)
    assert summary.min_detectable_accuracy == pytest.approx(0.57)
    assert summary.min_detectable_strength == 0.1
    assert (summary.false_promotions, summary.random_walk_runs) == (1, 3)
    assert summary.false_promotion_rate == pytest.approx(1 / 3)
    assert summary.random_walk_max_dsr == pytest.approx(0.99)
    data = summary.as_dict()
    assert data["min_detectable_accuracy"] == pytest.approx(0.57)
    assert data["strengths"][1]["promotion_rate"] == pytest.approx(0.8)
    # A stricter threshold leaves only the strength promoted every time.
    assert summarise_power(runs, detection_rate=1.0).min_detectable_accuracy == pytest.approx(0.62)


def test_no_detected_strength_and_no_random_walks() -> None:
    runs = [_run(PLANTED, 0.05, 1, False, 0.52), _run(PLANTED, 0.05, 2, True, 0.53)]
    summary = summarise_power(runs, detection_rate=0.8)
    assert summary.min_detectable_accuracy is None and summary.min_detectable_strength is None
    assert (summary.false_promotions, summary.random_walk_runs) == (0, 0)
    assert summary.false_promotion_rate is None
    assert summary.as_dict()["random_walk_max_dsr"] is None


def test_planted_accuracy_and_oracle_sharpe_grow_with_the_strength() -> None:
    config = load_config(REPO / "configs/power/ci.yaml", PowerStudyConfig)
    measures = [
        planted_measure_of(config, config.sim.model_copy(update={"seed": 5, "signal_strength": s}))
        for s in (0.0, 0.1, 0.3)
    ]
    walk, weak, strong = measures
    assert abs(walk.accuracy - 0.5) < 0.03  # no planted edge: a coin
    assert walk.accuracy < weak.accuracy < strong.accuracy
    assert weak.oracle_sharpe < strong.oracle_sharpe and strong.accuracy > 0.6
    # the two symbols' out-of-sample bars, all of them with a defined 10-bar return
    assert walk.bars == weak.bars == strong.bars > 0


def test_shipped_power_configs_and_their_plans() -> None:
    ci = load_config(REPO / "configs/power/ci.yaml", PowerStudyConfig)
    full = load_config(REPO / "configs/power/full.yaml", PowerStudyConfig)
    assert len(ci.random_walk_seeds) >= 1 and len(ci.strengths) >= 1
    assert len(full.random_walk_seeds) >= 20
    assert len(full.strengths) >= 3 and len(full.seeds) >= 3
    plan = plan_runs(full)
    assert len(plan) == len(full.strengths) * len(full.seeds) + len(full.random_walk_seeds)
    assert len({run.name for run in plan}) == len(plan)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("strengths", [0.0, 0.1], "random_walk_seeds"),
        ("strengths", [0.1, 0.1], "repeat"),
        ("seeds", [1, 1], "repeat"),
        ("detection_rate", 1.5, "less than or equal"),
        ("shuffle", True, "Extra inputs"),
    ],
)
def test_power_config_rejects(field: str, value: object, message: str) -> None:
    data = load_config(REPO / "configs/power/ci.yaml", PowerStudyConfig).model_dump()
    data[field] = value
    with pytest.raises(ValidationError, match=message):
        PowerStudyConfig.model_validate(data)


def test_outputs_hold_the_tables_and_the_power_curve(tmp_path: Path) -> None:
    config = load_config(REPO / "configs/power/ci.yaml", PowerStudyConfig)
    runs = [
        _run(PLANTED, 0.1, 1, True, 0.57),
        _run(PLANTED, 0.1, 2, False, 0.56),
        _run(RANDOM_WALK, 0.0, 7, False, 0.5),
    ]
    summary = summarise_power(runs, 0.8)
    outputs = write_outputs(
        as_location(tmp_path), config, runs_frame(runs), strengths_frame(summary), summary
    )
    table = pd.read_csv(outputs["runs_csv"])
    assert list(table["run"]) == ["planted-0.1-seed1", "planted-0.1-seed2", "random_walk-seed7"]
    assert pd.read_parquet(outputs["runs_parquet"])["promoted"].tolist() == [True, False, False]
    report = Path(outputs["report"]).read_text()
    assert 'id="fig-power"' in report and "min_detectable_accuracy" in report
    assert report.count('id="plotly-js"') == 1 and report.count("Plotly.newPlot(") == 1
