"""Performance metrics and Bailey & López de Prado's PSR / DSR, against hand-computed numbers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from models.metrics import (
    EULER_MASCHERONI,
    annual_return,
    annualised_sharpe,
    annualised_sortino,
    deflated_sharpe_ratio,
    expected_max_sharpe,
    max_drawdown,
    moments,
    performance_summary,
    probabilistic_sharpe_ratio,
    sharpe_per_bar,
)


def phi(z: float) -> float:
    """Standard normal CDF through erf, so the expected numbers do not come from scipy."""
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def trial_sharpes(variance: float, n: int, seed: int = 0) -> np.ndarray:
    """n trial Sharpes whose sample variance (ddof=1) is exactly `variance`."""
    x = np.random.default_rng(seed).normal(size=n)
    x = (x - x.mean()) / x.std(ddof=1)
    return x * math.sqrt(variance)


# ----- per-bar and annualised ratios -------------------------------------------------------


def test_sharpe_per_bar_and_annualised_by_hand() -> None:
    r = np.array([0.01, -0.02, 0.03, 0.0])
    mean = 0.005
    # deviations 0.005, -0.025, 0.025, -0.005 -> sum of squares 1.3e-3 over n-1 = 3
    std = math.sqrt(1.3e-3 / 3.0)
    assert sharpe_per_bar(r) == pytest.approx(mean / std, rel=1e-12)
    assert annualised_sharpe(r, 525_600.0) == pytest.approx(
        mean / std * math.sqrt(525_600.0), rel=1e-12
    )


def test_sharpe_is_zero_without_dispersion_or_bars() -> None:
    assert sharpe_per_bar(np.zeros(100)) == 0.0
    assert sharpe_per_bar(np.full(50, 0.001)) == 0.0
    assert sharpe_per_bar(np.array([0.01])) == 0.0
    assert sharpe_per_bar(np.array([])) == 0.0


def test_sortino_uses_downside_deviation_over_all_bars() -> None:
    r = np.array([0.03, -0.01, 0.02, -0.02])
    downside = math.sqrt((0.01**2 + 0.02**2) / 4.0)  # all four bars in the denominator
    assert annualised_sortino(r, 100.0) == pytest.approx(0.005 / downside * 10.0, rel=1e-12)
    assert annualised_sortino(np.array([0.01, 0.02, 0.0]), 100.0) == 0.0


def test_drawdown_and_annual_return_by_hand() -> None:
    r = np.array([0.1, -0.5, 0.2, 0.0])  # equity 1.1, 0.55, 0.66, 0.66
    assert max_drawdown(r) == pytest.approx(0.5)
    assert annual_return(r, 8.0) == pytest.approx(0.66**2 - 1.0)
    # the starting equity is a peak: a first-bar loss is a drawdown
    assert max_drawdown(np.array([-0.1, 0.05])) == pytest.approx(0.1)
    assert max_drawdown(np.array([0.01, 0.02])) == 0.0
    assert annual_return(np.array([-1.0, 0.5]), 525_600.0) == -1.0


def test_moments_are_raw_population_moments() -> None:
    # Bernoulli(1/4) scaled: skew (1-2p)/sqrt(p(1-p)), raw kurtosis (1-3p(1-p))/(p(1-p))
    r = np.array([0.0, 0.0, 0.0, 0.01])
    skew, kurt = moments(r)
    p = 0.25
    assert skew == pytest.approx((1 - 2 * p) / math.sqrt(p * (1 - p)), rel=1e-9)
    assert kurt == pytest.approx((1 - 3 * p * (1 - p)) / (p * (1 - p)), rel=1e-9)
    assert moments(np.full(10, 0.01)) == (0.0, 3.0)
    normal = np.random.default_rng(3).normal(size=200_000)
    assert moments(normal)[1] == pytest.approx(3.0, abs=0.05)  # raw, not excess


def test_performance_summary_on_a_hand_made_series() -> None:
    r = np.array([0.1, -0.5, 0.2, 0.0])
    pos = np.array([0.0, 1.0, 1.0, -1.0])
    s = performance_summary(r, pos, 8.0, trade_pnls=np.array([0.05, -0.01, 0.0]))
    assert s["bars"] == 4
    assert s["total_return"] == pytest.approx(0.66 - 1.0)
    assert s["annual_return"] == pytest.approx(0.66**2 - 1.0)
    assert s["max_drawdown"] == pytest.approx(0.5)
    assert s["calmar"] == pytest.approx((0.66**2 - 1.0) / 0.5)
    assert s["hit_rate"] == pytest.approx(1.0 / 3.0)  # 0.0 is not a win
    assert s["trades"] == 3
    assert s["turnover"] == pytest.approx((0 + 1 + 0 + 2) / 4)  # reversal counts 2
    assert s["exposure"] == pytest.approx(0.75)
    assert s["sharpe_per_bar"] == pytest.approx(sharpe_per_bar(r))
    assert s["sharpe"] == pytest.approx(sharpe_per_bar(r) * math.sqrt(8.0))
    assert (s["skew"], s["kurtosis"]) == pytest.approx(moments(r))
    assert s["final_equity"] == pytest.approx(0.66)


def test_performance_summary_reads_trades_off_positions() -> None:
    r = np.array([0.0, -0.01, 0.02, 0.01, 0.0, -0.02, 0.0])
    pos = np.array([0.0, 1.0, 1.0, 0.0, -1.0, 0.0, 0.0])
    s = performance_summary(r, pos, 525_600.0)
    assert s["trades"] == 2
    # trade 1 holds bars 1-2 and exits at 3: returns of bars 1..3; trade 2: bars 4..5
    first = 0.99 * 1.02 * 1.01 - 1.0
    second = 1.0 * 0.98 - 1.0
    assert s["mean_trade_pnl"] == pytest.approx((first + second) / 2)
    assert s["hit_rate"] == pytest.approx(0.5)
    empty = performance_summary(np.zeros(5), np.zeros(5), 525_600.0)
    assert math.isnan(empty["hit_rate"]) and empty["trades"] == 0
    assert math.isnan(empty["calmar"]) and empty["sharpe"] == 0.0


# ----- PSR / DSR ---------------------------------------------------------------------------


def test_psr_matches_the_formula_by_hand() -> None:
    sr, n = 0.1, 101
    # normal returns: denominator sqrt(1 + (3 - 1) / 4 * 0.01)
    assert probabilistic_sharpe_ratio(sr, 0.0, n, 0.0, 3.0) == pytest.approx(
        phi(0.1 * 10.0 / math.sqrt(1.005)), rel=1e-12
    )
    # fat left tail and negative skew widen the Sharpe's standard error
    z = (0.1 - 0.05) * 10.0 / math.sqrt(1.0 + 2.0 * 0.1 + (9.0 - 1.0) / 4.0 * 0.01)
    assert probabilistic_sharpe_ratio(0.1, 0.05, 101, -2.0, 9.0) == pytest.approx(phi(z))
    assert probabilistic_sharpe_ratio(0.05, 0.05, 500, 0.0, 3.0) == pytest.approx(0.5)


def test_psr_edge_cases() -> None:
    assert math.isnan(probabilistic_sharpe_ratio(0.1, 0.0, 1, 0.0, 3.0))
    assert math.isnan(probabilistic_sharpe_ratio(math.nan, 0.0, 100, 0.0, 3.0))
    with pytest.raises(ValueError, match="raw"):
        probabilistic_sharpe_ratio(0.1, 0.0, 100, 0.0, 0.0)  # excess kurtosis of a normal
    # sr=1, skew=2, kurtosis=1+skew**2: a zero denominator -> the step function
    assert probabilistic_sharpe_ratio(1.0, 0.5, 100, 2.0, 5.0) == 1.0
    assert probabilistic_sharpe_ratio(1.0, 1.5, 100, 2.0, 5.0) == 0.0


def test_expected_max_sharpe_by_hand() -> None:
    v, n = 0.04, 50
    g = EULER_MASCHERONI

    # Phi^-1 values by bisection on erf, independent of scipy
    def inv(p: float) -> float:
        lo, hi = -10.0, 10.0
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if phi(mid) < p else (lo, mid)
        return (lo + hi) / 2

    expected = math.sqrt(v) * ((1 - g) * inv(1 - 1 / n) + g * inv(1 - 1 / (n * math.e)))
    assert expected_max_sharpe(v, n) == pytest.approx(expected, rel=1e-9)
    assert expected_max_sharpe(v, 1) == 0.0
    assert expected_max_sharpe(0.0, 100) == 0.0
    with pytest.raises(ValueError):
        expected_max_sharpe(-1.0, 10)
    with pytest.raises(ValueError):
        expected_max_sharpe(0.1, 0)


def test_dsr_worked_example_of_bailey_and_lopez_de_prado_2014() -> None:
    """SR 2.5 annualised, 1250 daily returns, 100 trials with variance 0.5 of annualised
    Sharpes, skew -3, kurtosis 10: DSR ~ 0.9004 (SR0 ~ 0.1132 per day)."""
    periods_per_year = 250.0
    sr = 2.5 / math.sqrt(periods_per_year)
    variance = 0.5 / periods_per_year  # a Sharpe scales by sqrt(T), its variance by T
    srs = trial_sharpes(variance, 100)
    sr0 = expected_max_sharpe(variance, 100)
    assert sr0 == pytest.approx(0.1132, abs=1e-4)
    assert sr0 * math.sqrt(periods_per_year) == pytest.approx(1.7894, abs=1e-4)
    dsr = deflated_sharpe_ratio(sr, srs, 1250, -3.0, 10.0)
    assert dsr == pytest.approx(0.9004, abs=1e-4)
    z = (sr - sr0) * math.sqrt(1249) / math.sqrt(1 + 3 * sr + 9 / 4 * sr * sr)
    assert dsr == pytest.approx(phi(z), rel=1e-9)


def test_dsr_falls_as_trials_grow() -> None:
    srs = trial_sharpes(1e-4, 20)
    counts = (2, 20, 50, 200, 1000)
    sr0s = [expected_max_sharpe(1e-4, n) for n in counts]
    values = [deflated_sharpe_ratio(0.03, srs, 5000, 0.0, 3.0, n_trials=n) for n in counts[1:]]
    assert all(a < b for a, b in itertools.pairwise(sr0s))
    assert all(a > b for a, b in itertools.pairwise(values))
    # more dispersion among the trials also deflates more
    assert deflated_sharpe_ratio(0.03, srs * 2.0, 5000, 0.0, 3.0) < values[0]


def test_dsr_edge_cases() -> None:
    psr0 = probabilistic_sharpe_ratio(0.02, 0.0, 1000, 0.0, 3.0)
    assert deflated_sharpe_ratio(0.02, [0.02], 1000, 0.0, 3.0) == pytest.approx(psr0)
    assert deflated_sharpe_ratio(0.02, [0.01, 0.01, 0.01], 1000, 0.0, 3.0) == pytest.approx(psr0)
    # an early-stopped trial without a Sharpe still counts in N, not in the variance
    with_nan = deflated_sharpe_ratio(0.02, [0.01, 0.02, math.nan], 1000, 0.0, 3.0)
    finite = deflated_sharpe_ratio(0.02, [0.01, 0.02], 1000, 0.0, 3.0, n_trials=3)
    assert with_nan == pytest.approx(finite)
    with pytest.raises(ValueError):
        deflated_sharpe_ratio(0.02, [0.01, 0.02, 0.03], 1000, 0.0, 3.0, n_trials=2)
