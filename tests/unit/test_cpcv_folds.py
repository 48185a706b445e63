"""CPCV as a fold scheme: the config, the splits' training and validation ranges on the minute
timeline, leak-free training windows, and path records assembled from split backtests (no Ray)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from configs.schema import BacktestConfig, FoldConfig, TuneJobConfig, load_config
from market.features.spec import HORIZON_BARS, LONGEST_WINDOW_BARS
from market.klines import ONE_MINUTE_MS
from models.cpcv import assemble_paths, path_sharpe_distribution
from models.dataset import MarketArrays, arrays_from_table, window_ends_in
from models.evaluation import OutOfSampleBars, evaluate, evaluate_cpcv, model_predictions
from models.folds import (
    CpcvFolds,
    Fold,
    cpcv_min_purge_bars,
    make_cpcv,
    make_folds,
    make_schedule,
    training_units,
)
from models.networks import ModelSpec
from models.runs import RunDir
from tests.unit.test_model_data import T0, synthetic_table

WINDOW = 16
LAST = T0 + 3999 * ONE_MINUTE_MS  # 4,000 bars: four groups of 1,000
CPCV = FoldConfig(
    scheme="cpcv", groups=4, test_groups=2, purge_bars=100, embargo_bars=20, val_bars=500
)


def ms(bar: int) -> int:
    return T0 + bar * ONE_MINUTE_MS


def bars_of(ranges: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    return [((a - T0) // ONE_MINUTE_MS, (b - T0) // ONE_MINUTE_MS) for a, b in ranges]


def test_cpcv_config_is_validated() -> None:
    assert CPCV.groups == 4 and CPCV.test_groups == 2
    with pytest.raises(ValidationError, match="smaller than groups"):
        FoldConfig(scheme="cpcv", groups=4, test_groups=4)
    with pytest.raises(ValidationError, match="needs groups"):
        FoldConfig(scheme="cpcv", groups=4)
    with pytest.raises(ValidationError, match="belong to scheme 'cpcv'"):
        FoldConfig(scheme="rolling", groups=4, test_groups=1)
    with pytest.raises(ValidationError, match="train_bars=500, max_folds=2: walk-forward"):
        FoldConfig(scheme="cpcv", groups=4, test_groups=1, train_bars=500, max_folds=2)
    assert FoldConfig.model_validate(CPCV.model_dump()) == CPCV  # a dumped config loads again
    with pytest.raises(ValidationError, match="exceeds 256"):
        FoldConfig(scheme="cpcv", groups=12, test_groups=6)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        FoldConfig(scheme="cpcv", groups=4, test_groups=0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        FoldConfig.model_validate({"scheme": "cpcv", "groups": 4, "test_groups": 1, "paths": 3})


def test_splits_train_validate_and_purge_as_hand_computed() -> None:
    cpcv = make_cpcv(T0, LAST, CPCV, WINDOW)
    assert cpcv.plan.groups == ((0, 1000), (1000, 2000), (2000, 3000), (3000, 4000))
    assert [s.test_groups for s in cpcv.plan.splits] == [
        (0, 1),
        (0, 2),
        (0, 3),
        (1, 2),
        (1, 3),
        (2, 3),
    ]
    # Each split: purge 100 bars either side of a test group, embargo 20 after it; the last
    # 500 training bars validate, 100 more before them are purged from training.
    expected = [
        ([(2120, 3400)], (3500, 4000)),  # tests [0, 2000)
        ([(1120, 1900), (3120, 3400)], (3500, 4000)),  # tests groups 0 and 2
        ([(1120, 2300)], (2400, 2900)),  # tests groups 0 and 3
        ([(0, 900), (3120, 3400)], (3500, 4000)),  # tests [1000, 3000)
        ([(0, 900), (2120, 2300)], (2400, 2900)),  # tests groups 1 and 3
        ([(0, 1300)], (1400, 1900)),  # tests [2000, 4000)
    ]
    for split, (train, val) in zip(cpcv.splits, expected, strict=True):
        assert bars_of(split.train_ranges) == train
        assert bars_of(((split.val_start_ms, split.val_end_ms),)) == [val]
    # Paths: groups 0..3 of path 0 come from splits 0, 0, 1, 2 (AFML's assignment); each block
    # is one group, trained on its split's longest run.
    assert cpcv.plan.paths.tolist() == [[0, 0, 1, 2], [1, 3, 3, 4], [2, 4, 5, 5]]
    folds = cpcv.path_folds(1)
    assert [f.index for f in folds] == [0, 1, 2, 3]
    assert (folds[0].test_start_ms, folds[0].test_end_ms) == (ms(0), ms(1000))
    assert (folds[0].train_start_ms, folds[0].train_end_ms) == (ms(1120), ms(1900))
    assert cpcv.path_models(1, ["s0", "s1", "s2", "s3", "s4", "s5"]) == ["s1", "s3", "s3", "s4"]
    assert cpcv.newest_split() is cpcv.splits[0]
    assert [u.index for u in training_units(cpcv)] == list(range(6))


def test_bad_cpcv_set_ups_name_what_they_need() -> None:
    least = HORIZON_BARS + LONGEST_WINDOW_BARS + WINDOW
    assert cpcv_min_purge_bars(WINDOW) == least
    with pytest.raises(ValueError, match=f"cpcv needs at least {least}"):
        make_cpcv(T0, LAST, CPCV.model_copy(update={"purge_bars": least - 1}), WINDOW)
    # Four groups of 250 bars cannot hold 2 x purge 100 + embargo 20 + window + horizon.
    with pytest.raises(ValueError, match="groups of 250 bars; each needs at least 256"):
        make_cpcv(T0, T0 + 999 * ONE_MINUTE_MS, CPCV, WINDOW + 10)
    # Split 4 (groups 1 and 3) keeps 780 bars in its latest run [2120, 2900): too few for 700
    # validation bars + purge 100 + a window and its horizon.
    with pytest.raises(ValueError, match=r"split 4 \(test groups \(1, 3\)\).* 780 bars"):
        make_cpcv(T0, LAST, CPCV.model_copy(update={"val_bars": 700}), WINDOW)
    with pytest.raises(ValueError, match="no walk-forward folds"):
        make_folds(T0, LAST, CPCV)
    assert isinstance(make_schedule(T0, LAST, CPCV, WINDOW), CpcvFolds)
    rolling = FoldConfig(train_bars=1000, val_bars=200, test_bars=300)
    assert isinstance(make_schedule(T0, LAST, rolling, WINDOW), list)


def test_no_training_window_reads_or_labels_a_test_bar() -> None:
    # At the least purge, every training window's label ends before a test group, and every
    # input window (and the feature windows behind it) starts after the last bar that a test
    # label spans.
    config = CPCV.model_copy(update={"purge_bars": cpcv_min_purge_bars(WINDOW)})
    arrays = arrays_from_table(synthetic_table(np.arange(4000)))
    cpcv = make_cpcv(T0, LAST, config, WINDOW)
    for split, plan_split in zip(cpcv.splits, cpcv.plan.splits, strict=True):
        ends = window_ends_in(arrays, split.train_ranges, WINDOW, labelled=True)
        assert len(ends) > 0
        labelled = np.zeros(4000, dtype=bool)  # bars a test label spans: test .. + horizon
        for g in plan_split.test_groups:
            start, end = cpcv.plan.groups[g]
            labelled[start : end + HORIZON_BARS] = True
        test_bars = np.zeros(4000 + HORIZON_BARS, dtype=bool)
        test_bars[plan_split.test] = True
        for t in ends:
            assert not test_bars[t : t + HORIZON_BARS + 1].any()
            first_read = max(0, t - WINDOW + 1 - LONGEST_WINDOW_BARS)
            assert not labelled[first_read : t + 1].any()
        val = window_ends_in(
            arrays, ((split.val_start_ms, split.val_end_ms),), WINDOW, labelled=True
        )
        assert len(np.intersect1d(val, ends)) == 0 and not test_bars[val].any()


@dataclass(frozen=True)
class SignModel:
    """A stand-in for a loaded split model: always long (+1) or short (-1), sure of it."""

    side: float
    spec: ModelSpec

    def predict_ends(self, inputs: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.full(len(ends), self.side), np.full(len(ends), 0.5 + 0.4 * self.side)


def group_folds(cpcv: CpcvFolds, groups: tuple[int, ...]) -> list[Fold]:
    return [f for f in cpcv.path_folds(0) if f.index in groups]


def split_backtests(
    arrays: MarketArrays, cpcv: CpcvFolds, models: list[SignModel], config: BacktestConfig
) -> np.ndarray:
    """Each split's model backtested on its own test groups alone: splits x bars."""
    out = np.full((len(cpcv.splits), cpcv.plan.n_bars), np.nan)
    for split, model in zip(cpcv.plan.splits, models, strict=True):
        folds = group_folds(cpcv, split.test_groups)
        test = OutOfSampleBars.of(arrays, folds)
        predicted, p_up = model_predictions(arrays, folds, test, [model] * len(folds))
        record = evaluate("s", arrays, folds, test, config, predicted, p_up)
        out[split.index, (record.open_time_ms - T0) // ONE_MINUTE_MS] = record.returns
    return out


def test_paths_are_their_splits_backtests_laid_end_to_end(tmp_path: Path) -> None:
    arrays = arrays_from_table(synthetic_table(np.arange(4000), warmup=80))
    cpcv = make_cpcv(T0, LAST, CPCV, WINDOW)
    config = BacktestConfig(taker_fee_bps=1.0, p_up_threshold=0.55)
    spec = ModelSpec(family="gru", input_size=1, hidden_size=4, window_bars=WINDOW)
    models = [SignModel(1.0 if s % 2 else -1.0, spec) for s in range(len(cpcv.splits))]
    scored = evaluate_cpcv("candidate", arrays, cpcv, config, models)
    paths = assemble_paths(cpcv.plan, split_backtests(arrays, cpcv, models, config))
    expected = path_sharpe_distribution(paths, config.bars_per_year)
    distribution = scored.distribution
    assert distribution.paths == 3 and distribution.groups == 4
    np.testing.assert_allclose(distribution.sharpes.sharpes, expected.sharpes)
    assert len(set(np.round(expected.sharpes, 9))) == 3  # the paths really differ
    assert scored.record.score == pytest.approx(expected.mean)
    # The fee scenarios are path Sharpes too; the maker fee (2 bps) is above this taker one.
    assert scored.record.metrics["score_taker"] == pytest.approx(expected.mean)
    assert scored.record.metrics["score_maker"] < scored.record.metrics["score_taker"]
    np.testing.assert_allclose(scored.record.returns, paths.mean(axis=0))
    assert scored.record.metrics["bars"] == 4000
    assert {row["path"] for row in scored.record.fold_metrics} == {0, 1, 2}
    hold = evaluate_cpcv("hold", arrays, cpcv, config, None)
    assert hold.distribution.sharpes.std == pytest.approx(0.0, abs=1e-9)
    # The run directory keeps the distribution beside the record.
    trial = RunDir(tmp_path).trial("candidate")
    trial.save(scored.record, (), scored.distribution)
    loaded = trial.load()
    assert loaded.folds == () and loaded.paths is not None
    assert loaded.paths.as_dict() == distribution.as_dict()
    assert loaded.evaluation.score == pytest.approx(scored.record.score)
    RunDir(tmp_path).trial("walk_forward").save(scored.record, group_folds(cpcv, (0,)))
    assert RunDir(tmp_path).trial("walk_forward").load().paths is None


def test_the_example_config_fits_two_weeks_of_minutes() -> None:
    job = load_config(Path(__file__).parents[2] / "configs/tune/cpcv.yaml", TuneJobConfig)
    window = max(job.search.window_bars)
    cpcv = make_cpcv(T0, T0 + (14 * 1440 - 1) * ONE_MINUTE_MS, job.folds, window)
    assert (len(cpcv.splits), cpcv.plan.n_paths) == (15, 5)
    assert cpcv.plan.purge_bars == cpcv_min_purge_bars(window) == 103
    assert {end - start for start, end in cpcv.plan.groups} == {3360}
