"""The darts baselines: shapes, exact persistence, drift sign, AR skill, causality, breaks."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from models.baselines import (
    AR_LAGS,
    AR_LINEAR,
    BASELINE_NAMES,
    DRIFT,
    PERSISTENCE,
    BaselineForecast,
    ar_forecast_returns,
    darts_baselines,
    fit_ar_model,
)

HORIZON = 10


def closes_from_returns(log_returns: NDArray[np.float64], start: float = 30_000.0) -> NDArray:
    """Closes whose 1-minute log returns are `log_returns`."""
    return np.asarray(start * np.exp(np.r_[0.0, np.cumsum(log_returns)]), dtype=np.float64)


def ar1_returns(n: int, phi: float, seed: int) -> NDArray[np.float64]:
    """1-minute log returns following r_t = phi * r_{t-1} + eps_t, eps ~ N(0, 1e-3^2)."""
    eps = np.random.default_rng(seed).normal(0.0, 1e-3, size=n)
    out = np.empty(n)
    prev = 0.0
    for i, e in enumerate(eps):
        prev = phi * prev + e
        out[i] = prev
    return out


def realised_return(close: NDArray[np.float64], horizon: int = HORIZON) -> NDArray[np.float64]:
    """ln(close[t + horizon] / close[t]) per bar, NaN where t + horizon is past the end."""
    out = np.full(len(close), np.nan)
    out[:-horizon] = np.log(close[horizon:] / close[:-horizon])
    return out


def by_name(forecasts: list[BaselineForecast]) -> dict[str, BaselineForecast]:
    return {f.name: f for f in forecasts}


def finite_corr(a: NDArray[np.float64], b: NDArray[np.float64]) -> float:
    mask = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[mask], b[mask])[0, 1])


@pytest.fixture(scope="module")
def random_walk_fold() -> tuple[NDArray, NDArray, NDArray]:
    close = closes_from_returns(np.random.default_rng(3).normal(0.0, 1e-3, size=6_000))
    blocks = np.repeat(np.arange(3), 1_000).astype(np.int64)
    return close[:3_000], close[3_001:], blocks


def test_shapes_dtypes_and_names(random_walk_fold: tuple[NDArray, NDArray, NDArray]) -> None:
    train, test, blocks = random_walk_fold
    forecasts = darts_baselines(train, test, blocks, horizon=HORIZON)
    assert tuple(f.name for f in forecasts) == BASELINE_NAMES == (PERSISTENCE, DRIFT, AR_LINEAR)
    for f in forecasts:
        assert f.predicted_return.dtype == np.float64 and f.p_up.dtype == np.float64
        assert f.predicted_return.shape == f.p_up.shape == test.shape
        np.testing.assert_array_equal(np.isnan(f.predicted_return), np.isnan(f.p_up))
        p = f.p_up[np.isfinite(f.p_up)]
        assert np.all((p >= 0.0) & (p <= 1.0))


def test_persistence_is_exactly_zero_and_half(
    random_walk_fold: tuple[NDArray, NDArray, NDArray],
) -> None:
    train, test, blocks = random_walk_fold
    persistence = by_name(darts_baselines(train, test, blocks))[PERSISTENCE]
    assert np.all(persistence.predicted_return == 0.0)
    assert np.all(persistence.p_up == 0.5)


@pytest.mark.parametrize("trend", [2e-4, -2e-4])
def test_drift_follows_training_trend(trend: float) -> None:
    noise = np.random.default_rng(5).normal(0.0, 1e-3, size=4_000)
    close = closes_from_returns(trend + noise)
    train, test = close[:3_000], close[3_000:]
    drift = by_name(darts_baselines(train, test, np.zeros(len(test), dtype=np.int64)))[DRIFT]

    # NaiveDrift's line from the first to the last training log close, over HORIZON bars.
    expected = HORIZON * np.log(train[-1] / train[0]) / (len(train) - 1)
    np.testing.assert_allclose(drift.predicted_return, expected, rtol=1e-9)
    assert np.sign(drift.predicted_return[0]) == np.sign(trend)
    assert np.all(drift.predicted_return == drift.predicted_return[0])
    assert (drift.p_up[0] > 0.5) == (trend > 0)


def test_ar_recovers_planted_ar1() -> None:
    close = closes_from_returns(ar1_returns(30_000, phi=0.5, seed=11))
    train, test = close[:20_000], close[20_000:]
    ar = by_name(darts_baselines(train, test, np.zeros(len(test), dtype=np.int64)))[AR_LINEAR]
    realised = realised_return(test)

    # Population correlation of the optimal forecast with the 10-bar return is ~0.18 here.
    assert finite_corr(ar.predicted_return, realised) > 0.12
    mask = np.isfinite(ar.p_up) & np.isfinite(realised) & (realised != 0.0)
    hit_rate = np.mean((ar.p_up[mask] > 0.5) == (realised[mask] > 0.0))
    assert hit_rate > 0.53


def test_ar_has_no_skill_on_random_walk() -> None:
    close = closes_from_returns(np.random.default_rng(13).normal(0.0, 1e-3, size=40_000))
    train, test = close[:20_000], close[20_000:]
    ar = by_name(darts_baselines(train, test, np.zeros(len(test), dtype=np.int64)))[AR_LINEAR]
    assert abs(finite_corr(ar.predicted_return, realised_return(test))) < 0.05


def test_p_up_is_monotone_in_predicted_return() -> None:
    close = closes_from_returns(ar1_returns(6_000, phi=0.2, seed=17))
    train, test = close[:4_000], close[4_000:]
    ar = by_name(darts_baselines(train, test, np.zeros(len(test), dtype=np.int64)))[AR_LINEAR]
    mask = np.isfinite(ar.predicted_return)
    order = np.argsort(ar.predicted_return[mask])
    assert np.all(np.diff(ar.p_up[mask][order]) >= 0.0)
    np.testing.assert_array_equal(ar.p_up[mask] > 0.5, ar.predicted_return[mask] > 0.0)


def test_causal_later_closes_do_not_change_earlier_predictions(
    random_walk_fold: tuple[NDArray, NDArray, NDArray],
) -> None:
    train, test, blocks = random_walk_fold
    t = 1_500
    perturbed = test.copy()
    perturbed[t + 1 :] *= np.exp(np.random.default_rng(7).normal(0.0, 5e-3, len(test) - t - 1))

    before = by_name(darts_baselines(train, test, blocks))
    after = by_name(darts_baselines(train, perturbed, blocks))
    for name in BASELINE_NAMES:
        np.testing.assert_array_equal(
            before[name].predicted_return[: t + 1], after[name].predicted_return[: t + 1]
        )
        np.testing.assert_array_equal(before[name].p_up[: t + 1], after[name].p_up[: t + 1])
    assert not np.array_equal(
        before[AR_LINEAR].predicted_return[t + 1 :],
        after[AR_LINEAR].predicted_return[t + 1 :],
        equal_nan=True,
    )


def test_block_breaks_are_not_crossed(random_walk_fold: tuple[NDArray, NDArray, NDArray]) -> None:
    train, test, _ = random_walk_fold
    blocks = np.repeat([0, 4, 9], [700, 1_200, 1_100]).astype(np.int64)
    starts = [0, 700, 1_900]
    ar = by_name(darts_baselines(train, test, blocks))[AR_LINEAR]

    expected_nan = np.zeros(len(test), dtype=bool)
    for s in starts:
        expected_nan[s : s + AR_LAGS] = True
    np.testing.assert_array_equal(np.isnan(ar.predicted_return), expected_nan)

    # A jump across the break into the last block must not reach its predictions.
    jumped = test.copy()
    jumped[1_900:] *= 1.5
    after = by_name(darts_baselines(train, jumped, blocks))[AR_LINEAR]
    np.testing.assert_allclose(
        after.predicted_return[1_900:], ar.predicted_return[1_900:], rtol=1e-12, atol=1e-15
    )


def test_vectorised_ar_equals_darts_predict() -> None:
    close = closes_from_returns(ar1_returns(3_000, phi=0.3, seed=19))
    train, test = close[:2_000], close[2_001:]
    blocks = np.repeat([0, 1], [400, 600]).astype(np.int64)
    model = fit_ar_model(train, horizon=HORIZON, seed=0)
    ours = ar_forecast_returns(model, test, blocks, HORIZON)
    from_baselines = by_name(darts_baselines(train, test, blocks))[AR_LINEAR]
    np.testing.assert_array_equal(ours, from_baselines.predicted_return)

    from darts import TimeSeries

    log_close = np.log(test)
    for t in [AR_LAGS, 57, 399, 400 + AR_LAGS, 733, 999]:
        start = 0 if t < 400 else 400
        history = np.diff(log_close[start : t + 1]).reshape(-1, 1)
        darts_forecast = model.predict(HORIZON, series=TimeSeries.from_values(history))
        expected = float(darts_forecast.values().sum())
        assert ours[t] == pytest.approx(expected, rel=1e-10, abs=1e-15)

    # darts' own rolling path over the second block, one forecast per bar.
    block = np.diff(log_close[400:]).reshape(-1, 1)
    rolled = model.historical_forecasts(
        TimeSeries.from_values(block),
        start=AR_LAGS,
        forecast_horizon=HORIZON,
        stride=1,
        retrain=False,
        overlap_end=True,
        last_points_only=False,
        verbose=False,
    )
    rolled_sums = np.array([f.values().sum() for f in rolled])
    # rolled[k] reads block returns 0 .. AR_LAGS + k - 1: closes up to test bar 400 + AR_LAGS + k.
    np.testing.assert_allclose(
        ours[400 + AR_LAGS : 400 + AR_LAGS + len(rolled_sums)], rolled_sums, rtol=1e-10, atol=1e-15
    )


def test_deterministic(random_walk_fold: tuple[NDArray, NDArray, NDArray]) -> None:
    train, test, blocks = random_walk_fold
    first = darts_baselines(train, test, blocks, seed=42)
    second = darts_baselines(train, test, blocks, seed=42)
    for a, b in zip(first, second, strict=True):
        assert a.name == b.name
        np.testing.assert_array_equal(a.predicted_return, b.predicted_return)
        np.testing.assert_array_equal(a.p_up, b.p_up)


def test_rejects_bad_inputs(random_walk_fold: tuple[NDArray, NDArray, NDArray]) -> None:
    train, test, blocks = random_walk_fold
    with pytest.raises(ValueError, match="shape"):
        darts_baselines(train, test, blocks[:-1])
    with pytest.raises(ValueError, match="nondecreasing"):
        darts_baselines(train, test, blocks[::-1].copy())
    bad = test.copy()
    bad[10] = 0.0
    with pytest.raises(ValueError, match="positive"):
        darts_baselines(train, bad, blocks)
    with pytest.raises(ValueError, match="at least"):
        darts_baselines(train[: AR_LAGS + HORIZON], test, blocks)
