"""Performance metrics of a per-bar return series, and Bailey & López de Prado's PSR / DSR.

Conventions (they matter, because every figure here is compared across trials and models):

* A *bar* is one minute. Returns are per-bar simple returns ``equity[k] / equity[k-1] - 1``.
* Annualisation assumes a 24/7, 365-day market: ``bars_per_year = 525_600`` one-minute bars
  (``BacktestConfig.bars_per_year``). An annualised ratio is the per-bar ratio times
  ``sqrt(bars_per_year)``; the annual return is compounded, not scaled.
* ``sharpe_per_bar`` is the quantity the PSR / DSR formulas take: per-bar mean over per-bar
  standard deviation (ddof=1), with no risk-free rate (crypto has no natural one per minute).
* Kurtosis is *raw* (a normal distribution has 3), not excess, because that is what the
  PSR formula of Bailey & López de Prado (2012, 2014) is written in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import norm

__all__ = [
    "EULER_MASCHERONI",
    "annual_return",
    "annualised_sharpe",
    "annualised_sortino",
    "deflated_sharpe_ratio",
    "expected_max_sharpe",
    "max_drawdown",
    "moments",
    "performance_summary",
    "probabilistic_sharpe_ratio",
    "sharpe_per_bar",
    "summarise",
]

EULER_MASCHERONI = 0.5772156649015329

# Pearson's inequality says raw kurtosis >= 1 + skew**2 for every distribution; a caller that
# passes less has mixed up raw and excess kurtosis. The slack absorbs floating-point rounding.
_MOMENT_SLACK = 1e-9


def _as_returns(returns: np.ndarray) -> np.ndarray:
    r = np.asarray(returns, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"returns must be one-dimensional, got shape {r.shape}")
    return r


def _constant(r: np.ndarray) -> bool:
    """Whether every return is the same: its computed std is then rounding noise, not 0."""
    return r.size < 2 or float(np.max(r)) == float(np.min(r))


def sharpe_per_bar(returns: np.ndarray) -> float:
    """Per-bar Sharpe ratio: mean / std (ddof=1) of per-bar simple returns, not annualised.

    0.0 when there are fewer than 2 bars or the standard deviation is 0 (all returns equal;
    a flat strategy has no risk-adjusted edge, and 0.0 keeps it comparable in a ranking
    where NaN would not be).
    """
    r = _as_returns(returns)
    if _constant(r):
        return 0.0
    std = float(np.std(r, ddof=1))
    if not std > 0.0:
        return 0.0
    return float(np.mean(r)) / std


def annualised_sharpe(returns: np.ndarray, bars_per_year: float) -> float:
    """Annualised Sharpe: per-bar Sharpe times sqrt(bars_per_year) (525,600 for 1-minute bars)."""
    return sharpe_per_bar(returns) * math.sqrt(bars_per_year)


def annualised_sortino(returns: np.ndarray, bars_per_year: float) -> float:
    """Annualised Sortino: per-bar mean / downside deviation, times sqrt(bars_per_year).

    The downside deviation is ``sqrt(mean(min(r, 0)**2))`` over *all* bars (target 0), not
    only the losing ones, so it is comparable with the Sharpe denominator. 0.0 with fewer
    than 2 bars or no losing bar, mirroring `sharpe_per_bar`.
    """
    r = _as_returns(returns)
    if r.size < 2:
        return 0.0
    downside = math.sqrt(float(np.mean(np.minimum(r, 0.0) ** 2)))
    if not downside > 0.0:
        return 0.0
    return float(np.mean(r)) / downside * math.sqrt(bars_per_year)


def _equity_curve(returns: np.ndarray) -> np.ndarray:
    """Equity after each bar, starting from 1.0 before the first bar (which is prepended)."""
    equity = np.empty(returns.size + 1, dtype=np.float64)
    equity[0] = 1.0
    np.cumprod(1.0 + returns, out=equity[1:])
    return equity


def max_drawdown(returns: np.ndarray) -> float:
    """Largest peak-to-trough loss of the compounded equity, as a positive fraction of the peak.

    The starting equity 1.0 counts as a peak, so a strategy that only loses has a drawdown.
    """
    r = _as_returns(returns)
    if r.size == 0:
        return 0.0
    equity = _equity_curve(r)
    peak = np.maximum.accumulate(equity)
    return float(np.max(1.0 - equity / peak))


def annual_return(returns: np.ndarray, bars_per_year: float) -> float:
    """Compounded annual return: ``equity_end ** (bars_per_year / n_bars) - 1``.

    -1.0 when the equity ends at or below zero (the account is wiped out), 0.0 with no bars.
    """
    r = _as_returns(returns)
    return _annualise(float(np.prod(1.0 + r)) if r.size else 1.0, r.size, bars_per_year)


def _annualise(equity_end: float, n_bars: int, bars_per_year: float) -> float:
    if n_bars == 0:
        return 0.0
    if equity_end <= 0.0:
        return -1.0
    # log/exp instead of ** so that a huge exponent on a tiny sample overflows to inf, not raises
    with np.errstate(over="ignore"):
        return float(np.expm1(math.log(equity_end) * bars_per_year / n_bars))


def moments(returns: np.ndarray) -> tuple[float, float]:
    """(skew, raw kurtosis) of per-bar returns, population (biased) estimators.

    Biased moments always satisfy kurtosis >= 1 + skew**2, which keeps the PSR denominator
    non-negative. A series with fewer than 2 bars or zero variance gets the normal values
    (0.0, 3.0): it has no measurable non-normality, and PSR stays defined.
    """
    r = _as_returns(returns)
    if _constant(r):
        return 0.0, 3.0
    centred = r - np.mean(r)
    # Products, not `**3` / `**4`: numpy's generic pow is ~50x slower on 500k bars.
    squared = centred * centred
    m2 = float(np.mean(squared))
    if not m2 > 0.0:
        return 0.0, 3.0
    m3 = float(np.mean(squared * centred))
    m4 = float(np.mean(squared * squared))
    return m3 / m2**1.5, m4 / (m2 * m2)


def _segments(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first bar, one past the last bar) of each run of constant non-zero position."""
    prev = np.empty_like(positions)
    prev[0] = 0.0
    prev[1:] = positions[:-1]
    starts = np.flatnonzero((positions != 0.0) & (positions != prev))
    nxt = np.empty_like(positions)
    nxt[-1] = 0.0
    nxt[:-1] = positions[1:]
    ends = np.flatnonzero((positions != 0.0) & (positions != nxt)) + 1
    return starts, ends


def performance_summary(
    returns: np.ndarray,
    positions: np.ndarray,
    bars_per_year: float,
    trade_pnls: np.ndarray | None = None,
) -> dict[str, float]:
    """Headline figures of one backtest.

    Args:
        returns: per-bar net simple returns (1-minute bars), aligned with `positions`.
        positions: position held after each bar's fills (+1 long, -1 short, 0 flat, or a
            fraction); used for trades, turnover and exposure only.
        bars_per_year: bars in a year (525,600 for 24/7 1-minute bars).
        trade_pnls: net return of each closed round trip. When None the round trips are
            read off `positions` and each one's return is the compounded return of the bars
            from its entry bar through its exit bar (inclusive; approximate when a reversal
            shares its bar with the next trade's entry).

    Returns:
        bars; total_return, annual_return (compounded, see `annual_return`); sharpe and sortino
        (annualised), sharpe_per_bar; max_drawdown (positive fraction of the peak); calmar
        (annual_return / max_drawdown, NaN without a drawdown); hit_rate (share of round trips
        with positive net P&L, NaN with none); trades (round trips); turnover (sum of
        ``|position[k] - position[k-1]|`` over all bars, starting from flat, divided by the
        number of bars: the average share of equity traded per bar, a reversal counting 2);
        exposure (share of bars with a non-zero position); skew and kurtosis (raw) of per-bar
        returns; mean_trade_pnl (NaN with no trades); final_equity.
    """
    r = _as_returns(returns)
    return summarise(r, positions, bars_per_year, trade_pnls, _equity_curve(r)[1:])


def summarise(
    returns: np.ndarray,
    positions: np.ndarray,
    bars_per_year: float,
    trade_pnls: np.ndarray | None,
    equity: np.ndarray,
) -> dict[str, float]:
    """`performance_summary` given the equity curve already (after each bar, from 1.0).

    A backtest has its equity at hand; recompounding 500k returns would cost more than the
    rest of the summary, so the backtester calls this directly. `equity` must be the
    compounded `returns` (starting from 1.0 before the first bar).
    """
    r = _as_returns(returns)
    pos = np.asarray(positions, dtype=np.float64)
    eq = np.asarray(equity, dtype=np.float64)
    if pos.shape != r.shape or eq.shape != r.shape:
        raise ValueError(
            f"returns {r.shape}, positions {pos.shape} and equity {eq.shape} must match"
        )
    n = r.size
    if n == 0:
        pnls = np.empty(0) if trade_pnls is None else np.asarray(trade_pnls, dtype=np.float64)
        return _figures(r, pnls, 1.0, 0.0, 0.0, 0.0, bars_per_year)
    if trade_pnls is None:
        starts, ends = _segments(pos)
        growth = np.concatenate(([1.0], eq))
        # ends[j] is one past the last held bar: that bar's return carries the exit fill
        last = np.minimum(ends, n - 1)
        pnls = growth[last + 1] / growth[starts] - 1.0
    else:
        pnls = np.asarray(trade_pnls, dtype=np.float64)
    peak = np.maximum.accumulate(eq)
    # The initial 1.0 is a peak too: a strategy that only loses still has a drawdown.
    np.maximum(peak, 1.0, out=peak)
    mdd = 1.0 - float(np.min(eq / peak))
    steps = pos[1:] - pos[:-1]
    np.abs(steps, out=steps)
    turnover = (float(np.sum(steps)) + abs(float(pos[0]))) / n
    exposure = float(np.count_nonzero(pos)) / n
    return _figures(r, pnls, float(eq[-1]), mdd, turnover, exposure, bars_per_year)


def _figures(
    r: np.ndarray,
    pnls: np.ndarray,
    equity_end: float,
    mdd: float,
    turnover: float,
    exposure: float,
    bars_per_year: float,
) -> dict[str, float]:
    n = r.size
    skew, kurtosis = moments(r)
    ann = _annualise(equity_end, n, bars_per_year)
    return {
        "bars": float(n),
        "total_return": equity_end - 1.0,
        "annual_return": ann,
        "sharpe": annualised_sharpe(r, bars_per_year),
        "sharpe_per_bar": sharpe_per_bar(r),
        "sortino": annualised_sortino(r, bars_per_year),
        "max_drawdown": mdd,
        "calmar": ann / mdd if mdd > 0.0 else math.nan,
        "hit_rate": float(np.mean(pnls > 0.0)) if pnls.size else math.nan,
        "trades": float(pnls.size),
        "mean_trade_pnl": float(np.mean(pnls)) if pnls.size else math.nan,
        "turnover": turnover,
        "exposure": exposure,
        "skew": skew,
        "kurtosis": kurtosis,
        "final_equity": equity_end,
    }


def probabilistic_sharpe_ratio(
    sr: float, sr_benchmark: float, n_bars: int, skew: float, kurtosis: float
) -> float:
    """Probability that the true Sharpe exceeds `sr_benchmark` (Bailey & López de Prado 2012).

    ``PSR = Phi((sr - sr*) * sqrt(n - 1) / sqrt(1 - skew * sr + (kurtosis - 1) / 4 * sr**2))``

    Args:
        sr: observed Sharpe ratio *per bar* (not annualised).
        sr_benchmark: the benchmark Sharpe, per bar.
        n_bars: number of returns the Sharpe was estimated from.
        skew: skewness of those returns.
        kurtosis: their *raw* kurtosis (3 for a normal distribution).

    Returns:
        A probability in [0, 1]. NaN when `n_bars` < 2 or an input is not finite. When the
        denominator is 0 (a two-point distribution with kurtosis == 1 + skew**2 at just the
        observed Sharpe, so the estimate has no sampling error) the answer is the step
        1.0 if sr > sr* else 0.0.

    Raises:
        ValueError: kurtosis < 1 + skew**2 - 1e-9, which no distribution has (it usually means
            excess kurtosis was passed where raw kurtosis is expected).
    """
    if n_bars < 2 or not all(math.isfinite(v) for v in (sr, sr_benchmark, skew, kurtosis)):
        return math.nan
    if kurtosis < 1.0 + skew * skew - _MOMENT_SLACK:
        raise ValueError(
            f"kurtosis {kurtosis} < 1 + skew**2 = {1.0 + skew * skew}: pass raw, not excess, "
            "kurtosis"
        )
    # Pearson's inequality bounds this below by (1 - skew*sr/2)**2 >= 0; clip the rounding.
    variance = max(1.0 - skew * sr + (kurtosis - 1.0) / 4.0 * sr * sr, 0.0)
    if variance == 0.0:
        return 1.0 if sr > sr_benchmark else 0.0
    z = (sr - sr_benchmark) * math.sqrt(n_bars - 1) / math.sqrt(variance)
    return float(norm.cdf(z))


def expected_max_sharpe(trial_srs_variance: float, n_trials: int) -> float:
    """Expected maximum of `n_trials` Sharpe ratios drawn with true Sharpe 0 (the DSR's SR0).

    ``sqrt(V) * ((1 - g) * Phi^-1(1 - 1/N) + g * Phi^-1(1 - 1/(N e)))``, g = Euler-Mascheroni.
    The result is in the units of the trial Sharpes whose variance V is given (per bar if
    they are per bar). 0.0 for a single trial (nothing was selected) or zero variance.

    Raises:
        ValueError: n_trials < 1, or a negative or non-finite variance.
    """
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    if not math.isfinite(trial_srs_variance) or trial_srs_variance < 0.0:
        raise ValueError(f"trial Sharpe variance must be finite and >= 0, got {trial_srs_variance}")
    if n_trials == 1 or trial_srs_variance == 0.0:
        return 0.0
    g = EULER_MASCHERONI
    quantiles = (1.0 - g) * norm.ppf(1.0 - 1.0 / n_trials) + g * norm.ppf(
        1.0 - 1.0 / (n_trials * math.e)
    )
    return math.sqrt(trial_srs_variance) * float(quantiles)


def deflated_sharpe_ratio(
    sr: float,
    trial_srs: Sequence[float] | np.ndarray,
    n_bars: int,
    skew: float,
    kurtosis: float,
    n_trials: int | None = None,
) -> float:
    """Deflated Sharpe ratio (Bailey & López de Prado 2014): PSR against the expected best of N.

    Args:
        sr: the selected strategy's Sharpe ratio *per bar*.
        trial_srs: per-bar Sharpe ratios of the trials of the search (the selected one
            included). Non-finite entries (trials that never produced a Sharpe) are left out
            of the variance but may still be counted through `n_trials`.
        n_bars: bars the selected Sharpe was estimated from.
        skew: skewness of the selected strategy's per-bar returns.
        kurtosis: their raw kurtosis (3 = normal).
        n_trials: N, every trial *started*, early-stopped ones included: the caller must pass
            it when `trial_srs` only holds finished trials, or the deflation is understated.
            Defaults to ``len(trial_srs)``.

    Returns:
        PSR(sr, SR0) with SR0 = `expected_max_sharpe` of the trial Sharpes' variance (ddof=1)
        and N. With one trial, or fewer than two finite trial Sharpes (no variance to
        estimate), SR0 = 0 and the DSR is the plain PSR against 0. NaN as in
        `probabilistic_sharpe_ratio`.

    Raises:
        ValueError: n_trials < len(trial_srs) or < 1; see also `probabilistic_sharpe_ratio`.
    """
    srs = np.asarray(list(trial_srs), dtype=np.float64)
    total = srs.size if n_trials is None else n_trials
    if total < max(srs.size, 1):
        raise ValueError(f"n_trials={total} is fewer than the {srs.size} trial Sharpes given")
    finite = srs[np.isfinite(srs)]
    variance = float(np.var(finite, ddof=1)) if finite.size >= 2 else 0.0
    sr0 = expected_max_sharpe(variance, total)
    return probabilistic_sharpe_ratio(sr, sr0, n_bars, skew, kurtosis)
