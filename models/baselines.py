"""Honest, causal baselines that every candidate model must beat on the same walk-forward folds.

Each baseline is a darts model fitted on a fold's training window only, and predicts, at every
bar t of the fold's test window, the LOG return over the next `horizon` 1-minute bars,
ln(close[t + horizon] / close[t]), together with P(up) = P(close[t + horizon] > close[t]).
A prediction at test bar t uses the training window and test closes up to and including t,
never later ones. NaN means "no opinion" downstream.

The baselines:

- ``persistence``: darts ``NaiveSeasonal(K=1)`` on log closes. Its forecast is the last observed
  log close, so the predicted log return is exactly 0 and P(up) exactly 0.5 at every test bar.
- ``drift``: darts ``NaiveDrift`` on the training log closes. Its slope (log return per bar,
  from the first to the last training close) is extrapolated over `horizon` bars. It depends on
  the training window only, so it is one constant for the whole test window.
- ``ar_linear``: darts ``LinearRegressionModel`` (an AR model: ordinary least squares on the last
  `AR_LAGS` 1-minute log returns, with intercept) with ``output_chunk_length=horizon``; the
  `horizon` per-bar return forecasts are summed into the `horizon`-bar log return. It is fitted on
  the training window and applied at every test bar without refitting, through the fitted
  estimator on a vectorised lag matrix, which equals darts' own ``predict`` /
  ``historical_forecasts(retrain=False)`` at each bar (the tests check this).

P(up) is Phi(predicted_return / sigma), with sigma the standard deviation of the baseline's own
`horizon`-bar prediction residuals on the training window.

Data breaks: `test_block_ids` marks contiguous runs of test bars. The AR baseline never uses a
return that crosses a break or the train/test boundary (a fold may embargo bars between the two),
so its first `AR_LAGS` bars of each block are NaN. Persistence and drift need no test lags and
have an opinion at every bar. The training window is taken to be one contiguous run.

darts is imported inside the functions because it pulls in torch, which would make importing
this module (and every module importing it) slow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray
from scipy.special import ndtr

if TYPE_CHECKING:
    from darts import TimeSeries
    from darts.models import LinearRegressionModel

PERSISTENCE = "persistence"
DRIFT = "drift"
AR_LINEAR = "ar_linear"
BASELINE_NAMES: tuple[str, ...] = (PERSISTENCE, DRIFT, AR_LINEAR)

# A few lags: 1-minute returns carry at most a short-lived autocorrelation (bid-ask bounce,
# brief momentum), and more lags only add estimation noise to a baseline.
AR_LAGS = 5

_RETURN_COLUMN = "log_return"
_LOG_CLOSE_COLUMN = "log_close"


@dataclass(frozen=True)
class BaselineForecast:
    """One baseline's predictions over a test window, one entry per 1-minute test bar.

    `predicted_return` is the predicted LOG return over the next `horizon` bars,
    ln(close[t + horizon] / close[t]); `p_up` is P(close[t + horizon] > close[t]) in [0, 1].
    Both are float64 and NaN together where the baseline has no opinion.
    """

    name: str
    predicted_return: NDArray[np.float64]
    p_up: NDArray[np.float64]


def darts_baselines(
    train_close: NDArray[np.float64],
    test_close: NDArray[np.float64],
    test_block_ids: NDArray[np.integer],
    horizon: int = 10,
    seed: int = 0,
) -> list[BaselineForecast]:
    """Persistence, drift and AR baselines for one walk-forward fold, in `BASELINE_NAMES` order.

    `train_close` are the training window's 1-minute closes (one contiguous run, at least
    `AR_LAGS + horizon + 2` bars); `test_close` are the test window's 1-minute closes and
    `test_block_ids` (nondecreasing, aligned to `test_close`) mark its contiguous runs.
    `horizon` is in bars. `seed` is forwarded to darts; the fits are deterministic given it.
    """
    train = _validated_closes(train_close, "train_close")
    test = _validated_closes(test_close, "test_close")
    blocks = _validated_block_ids(test_block_ids, len(test))
    if horizon < 1:
        raise ValueError(f"horizon must be at least 1 bar, got {horizon}")
    min_train = AR_LAGS + horizon + 2
    if len(train) < min_train:
        raise ValueError(f"train_close has {len(train)} bars; at least {min_train} are needed")

    log_train = np.log(train)
    realised_train = log_train[horizon:] - log_train[:-horizon]
    n_test = len(test)

    persistence = _last_value_forecast_return(log_train, horizon)
    persistence_forecast = BaselineForecast(
        name=PERSISTENCE,
        predicted_return=np.full(n_test, persistence, dtype=np.float64),
        # Exactly 0.5 by definition, whatever sigma would be: no directional opinion.
        p_up=np.full(n_test, 0.5, dtype=np.float64),
    )

    drift = _drift_forecast_return(log_train, horizon)
    drift_sigma = float(np.std(realised_train - drift))
    drift_return = np.full(n_test, drift, dtype=np.float64)
    drift_forecast = BaselineForecast(
        name=DRIFT, predicted_return=drift_return, p_up=_p_up(drift_return, drift_sigma)
    )

    model = fit_ar_model(train, horizon=horizon, seed=seed)
    train_blocks = np.zeros(len(train), dtype=np.int64)
    in_sample = ar_forecast_returns(model, train, train_blocks, horizon)[:-horizon]
    residuals = realised_train - in_sample
    ar_sigma = float(np.std(residuals[np.isfinite(residuals)]))
    ar_return = ar_forecast_returns(model, test, blocks, horizon)
    ar_forecast = BaselineForecast(
        name=AR_LINEAR, predicted_return=ar_return, p_up=_p_up(ar_return, ar_sigma)
    )

    return [persistence_forecast, drift_forecast, ar_forecast]


def fit_ar_model(
    train_close: NDArray[np.float64], horizon: int = 10, seed: int = 0, lags: int = AR_LAGS
) -> LinearRegressionModel:
    """darts `LinearRegressionModel` fitted on the 1-minute log returns of `train_close`.

    It regresses each of the next `horizon` 1-minute log returns on the last `lags` ones
    (`output_chunk_length=horizon`, one OLS output per step, with intercept).
    """
    from darts.models import LinearRegressionModel

    returns = np.diff(np.log(_validated_closes(train_close, "train_close")))
    model = LinearRegressionModel(lags=lags, output_chunk_length=horizon, random_state=seed)
    model.fit(_series(returns, _RETURN_COLUMN))
    return model


def ar_forecast_returns(
    model: LinearRegressionModel,
    close: NDArray[np.float64],
    block_ids: NDArray[np.integer],
    horizon: int,
) -> NDArray[np.float64]:
    """Per bar t, the fitted AR model's `horizon`-bar LOG return forecast from closes up to t.

    Equal to summing darts' ``model.predict(horizon, series=<log returns of t's block up to
    t>)``, without darts' per-call overhead: the lag matrix is built in darts' feature order and
    passed to the same fitted estimator darts calls. NaN for the first `lags` bars of each block
    (`block_ids`), whose lags would reach across a break.
    """
    lags = _check_ar_layout(model, horizon)
    log_close = np.log(_validated_closes(close, "close"))
    n = len(log_close)
    ids = _validated_block_ids(block_ids, n)
    out = np.full(n, np.nan, dtype=np.float64)
    if n == 0:
        return out

    returns = np.empty(n, dtype=np.float64)
    returns[1:] = np.diff(log_close)
    is_block_start = np.r_[True, ids[1:] != ids[:-1]]
    # The return into a block's first bar spans a break (or the train/test boundary).
    returns[is_block_start] = np.nan
    bar = np.arange(n)
    block_start = np.maximum.accumulate(np.where(is_block_start, bar, 0))
    rows = np.flatnonzero(bar - block_start >= lags)
    if len(rows) == 0:
        return out

    # Row t holds returns t-lags+1 .. t, oldest first, as darts orders lag-L .. lag-1.
    windows = sliding_window_view(returns, lags)
    per_step = model.model.predict(windows[rows - lags + 1])
    out[rows] = np.asarray(per_step, dtype=np.float64).reshape(len(rows), horizon).sum(axis=1)
    return out


def _check_ar_layout(model: LinearRegressionModel, horizon: int) -> int:
    """The model's number of lags, after checking its features/labels are laid out as assumed."""
    lags = len(model.lagged_feature_names)
    expected_features = [f"{_RETURN_COLUMN}_target_lag-{k}" for k in range(lags, 0, -1)]
    if model.lagged_feature_names != expected_features:
        raise ValueError(f"unexpected AR features {model.lagged_feature_names}")
    expected_labels = [f"{_RETURN_COLUMN}_target_hrz{h}" for h in range(horizon)]
    if model.lagged_label_names != expected_labels:
        raise ValueError(
            f"AR model forecasts {model.lagged_label_names}, not {horizon} steps of returns"
        )
    return lags


def _last_value_forecast_return(log_train: NDArray[np.float64], horizon: int) -> float:
    """darts NaiveSeasonal(K=1)'s `horizon`-bar log return: its forecast minus the last value."""
    from darts.models import NaiveSeasonal

    model = NaiveSeasonal(K=1).fit(_series(log_train, _LOG_CLOSE_COLUMN))
    forecast = model.predict(horizon).values(copy=False)
    return float(forecast[-1, 0] - log_train[-1])


def _drift_forecast_return(log_train: NDArray[np.float64], horizon: int) -> float:
    """darts NaiveDrift's extrapolated `horizon`-bar log return from the training log closes.

    In log space the drift line's slope does not depend on the level it starts from, so the
    return extrapolated from the training end holds at every test bar.
    """
    from darts.models import NaiveDrift

    model = NaiveDrift().fit(_series(log_train, _LOG_CLOSE_COLUMN))
    forecast = model.predict(horizon).values(copy=False)
    return float(forecast[-1, 0] - log_train[-1])


def _p_up(predicted_return: NDArray[np.float64], sigma: float) -> NDArray[np.float64]:
    """Phi(predicted_return / sigma); NaN stays NaN.

    A zero sigma (a training window without residual spread) takes Phi's limit: 1, 0 or 0.5 by
    the sign of the prediction, rather than dividing by zero.
    """
    if sigma > 0.0:
        return np.asarray(ndtr(predicted_return / sigma), dtype=np.float64)
    return np.where(
        np.isnan(predicted_return), np.nan, 0.5 * (1.0 + np.sign(predicted_return))
    ).astype(np.float64)


def _series(values: NDArray[np.float64], column: str) -> TimeSeries:
    """A univariate darts series on an integer (bar) index."""
    from darts import TimeSeries

    return TimeSeries.from_values(values.reshape(-1, 1), columns=[column])


def _validated_closes(close: NDArray[np.float64], name: str) -> NDArray[np.float64]:
    values = np.asarray(close, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0.0):
        raise ValueError(f"{name} must hold finite, positive closes")
    return values


def _validated_block_ids(block_ids: NDArray[np.integer], n: int) -> NDArray[np.int64]:
    ids = np.asarray(block_ids)
    if ids.shape != (n,):
        raise ValueError(f"block ids have shape {ids.shape}, expected ({n},)")
    if n and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"block ids must be integers, got {ids.dtype}")
    if np.any(np.diff(ids) < 0):
        raise ValueError("block ids must be nondecreasing")
    return ids.astype(np.int64)
