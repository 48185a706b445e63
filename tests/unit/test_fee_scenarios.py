"""Every evaluation also scores its positions under the other fee side (maker vs taker)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from configs.schema import BacktestConfig, FoldConfig
from models.dataset import arrays_from_table
from models.evaluation import Evaluation, OutOfSampleBars, evaluate
from models.folds import make_folds
from models.report import LEADERBOARD_METRICS, _section_leaderboard, sort_leaderboard
from models.runs import COMPLETED
from models.selection import leaderboard_frame
from models.sweep import TrialOutcome
from tests.unit.test_gate_and_evaluation import two_symbols
from tests.unit.test_model_data import T0

FOLDS = FoldConfig(train_bars=400, val_bars=100, test_bars=200, embargo_bars=10)
SCENARIO_COLUMNS = ("score_taker", "score_maker", "total_return_taker", "total_return_maker")


def _random_record(config: BacktestConfig, seed: int = 7) -> Evaluation:
    arrays = arrays_from_table(two_symbols(np.arange(0, 1500)))
    folds = make_folds(T0, int(arrays.open_time_ms.max()), FOLDS)
    test = OutOfSampleBars.of(arrays, folds)
    rng = np.random.default_rng(seed)
    predicted = rng.normal(0.0, 0.01, len(test.rows))
    p_up = np.clip(0.5 + 20.0 * predicted, 0.0, 1.0)
    return evaluate("random", arrays, folds, test, config, predicted, p_up)


@pytest.mark.parametrize("sizing", ["all_in", "probability"])
def test_maker_scenario_beats_taker_on_the_same_positions(sizing: str) -> None:
    taker = _random_record(BacktestConfig(sizing=sizing, taker_fee_bps=10.0, maker_fee_bps=2.0))  # type: ignore[arg-type]
    m = taker.metrics
    assert m["trades"] > 10
    # The configured side is the record itself; the other rescored the same positions.
    assert m["score_taker"] == m["score"] and m["total_return_taker"] == m["total_return"]
    assert m["score_maker"] > m["score_taker"]
    assert m["total_return_maker"] > m["total_return_taker"]
    # Configured on the maker side with a threshold that keeps the taker decisions, the maker
    # record is the taker record's maker scenario and vice versa.
    maker = _random_record(
        BacktestConfig(
            sizing=sizing,  # type: ignore[arg-type]
            fee_side="maker",
            taker_fee_bps=10.0,
            maker_fee_bps=2.0,
            min_edge_bps=16.0,  # 2 * (10 - 2): the taker round trip's edge
        )
    )
    assert maker.score == pytest.approx(m["score_maker"], rel=1e-9)
    assert maker.metrics["score_taker"] == pytest.approx(m["score_taker"], rel=1e-9)


def test_equal_fees_give_equal_scenarios() -> None:
    m = _random_record(BacktestConfig(taker_fee_bps=4.0, maker_fee_bps=4.0)).metrics
    assert m["score_maker"] == pytest.approx(m["score_taker"], rel=1e-12)


def test_leaderboard_and_report_show_the_scenario_columns() -> None:
    assert set(SCENARIO_COLUMNS) <= set(LEADERBOARD_METRICS)
    record = _random_record(BacktestConfig())
    outcome = TrialOutcome("t1", {}, COMPLETED, 1, dict(record.metrics))
    board = leaderboard_frame([outcome], {"t1": math.nan})
    for column in SCENARIO_COLUMNS:
        assert board.loc[0, column] == pytest.approx(record.metrics[column])
    html = _section_leaderboard(sort_leaderboard(board))
    assert all(f">{column}<" in html for column in SCENARIO_COLUMNS)


def test_evaluation_sizes_positions_by_probability() -> None:
    all_in = _random_record(BacktestConfig()).metrics
    sized = _random_record(BacktestConfig(sizing="probability")).metrics
    # Same entries, smaller positions: less turnover per bar.
    assert 0.0 < sized["turnover"] < all_in["turnover"]
