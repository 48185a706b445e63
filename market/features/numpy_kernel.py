"""The feature spec as a numpy kernel over one symbol's sorted bars.

The Spark engine runs this inside `applyInPandas` (one call per symbol, after Spark has
validated, de-duplicated, ordered and segmented the bars). It is written independently of the
polars engine: sliding-window views for rolling statistics and IIR filters for the recursive
ones, so that the parity test between the engines compares two implementations, not one.
All windows are counted in 1-minute bars.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.signal import lfilter

from market.features import spec
from market.features.polars_engine import DISPERSION_EPS
from market.klines import ONE_DAY_MS, ONE_MINUTE_MS

FloatArray = np.ndarray


def _rolling(x: FloatArray, k: int, stat: str, ddof: int = 0) -> FloatArray:
    out = np.full(x.shape[0], np.nan)
    if x.shape[0] >= k:
        view = sliding_window_view(x, k)
        if stat == "mean":
            out[k - 1 :] = view.mean(axis=1)
        else:
            out[k - 1 :] = view.std(axis=1, ddof=ddof)
    return out


def _ema(x: FloatArray, alpha: float) -> FloatArray:
    """y_0 = x_0, y_t = alpha x_t + (1 - alpha) y_(t-1) (pandas' adjust=False)."""
    if x.shape[0] == 0:
        return x.copy()
    y, _ = lfilter([alpha], [1.0, alpha - 1.0], x, zi=[(1.0 - alpha) * x[0]])
    return np.asarray(y)


def _lag_ratio_log(c: FloatArray, k: int) -> FloatArray:
    out = np.full(c.shape[0], np.nan)
    if c.shape[0] > k:
        out[k:] = np.log(c[k:] / c[:-k])
    return out


def _segment_features(
    c: FloatArray, high: FloatArray, low: FloatArray, vol: FloatArray, taker: FloatArray
) -> dict[str, FloatArray]:
    n = c.shape[0]
    f: dict[str, FloatArray] = {}
    for k in spec.RETURN_LAGS:
        f[f"ret_{k}"] = _lag_ratio_log(c, k)
    for k in spec.SMA_WINDOWS:
        sma = _rolling(c, k, "mean")
        f[f"sma_{k}"] = sma
        f[f"close_sma_{k}"] = c / sma - 1.0

    ema_fast = _ema(c, 2.0 / (spec.EMA_FAST + 1))
    ema_slow = _ema(c, 2.0 / (spec.EMA_SLOW + 1))
    macd = ema_fast - ema_slow
    signal = _ema(macd, 2.0 / (spec.MACD_SIGNAL + 1))
    f.update(ema_12=ema_fast, ema_26=ema_slow, macd=macd, macd_signal=signal)
    f["macd_hist"] = macd - signal

    rsi = np.full(n, np.nan)
    if n > 1:
        change = np.diff(c)
        mean_gain = _ema(np.maximum(change, 0.0), 1.0 / spec.RSI_PERIOD)
        mean_loss = _ema(np.maximum(-change, 0.0), 1.0 / spec.RSI_PERIOD)
        with np.errstate(divide="ignore", invalid="ignore"):
            rs = mean_gain / mean_loss
        rsi[1:] = np.where(mean_loss == 0.0, 100.0, 100.0 - 100.0 / (1.0 + rs))
    f["rsi_14"] = rsi

    w = spec.BOLLINGER_WINDOW
    pctb = np.full(n, np.nan)
    width = np.full(n, np.nan)
    if n >= w:
        # Deviations from the current close keep a narrow band's geometry exact (see polars).
        dev = sliding_window_view(c, w) - c[w - 1 :, None]
        mean_dev = dev.mean(axis=1)
        band = spec.BOLLINGER_K * dev.std(axis=1)
        mid = c[w - 1 :] + mean_dev
        flat = band <= DISPERSION_EPS * mid
        with np.errstate(divide="ignore", invalid="ignore"):
            pctb[w - 1 :] = np.where(flat, 0.5, (band - mean_dev) / (2.0 * band))
            width[w - 1 :] = np.where(flat, 0.0, 2.0 * band / mid)
    f["bb_pctb_20"] = pctb
    f["bb_width_20"] = width

    ret1 = f["ret_1"]
    for k in spec.REALISED_VOL_WINDOWS:
        f[f"rv_{k}"] = _rolling(ret1, k, "std", ddof=1)

    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(vol == 0.0, 0.5, taker / vol)
    f["taker_buy_ratio"] = ratio
    f["taker_buy_ratio_ma_10"] = _rolling(ratio, spec.TAKER_RATIO_MA_WINDOW, "mean")
    zw = spec.VOLUME_Z_WINDOW
    v_mean = _rolling(vol, zw, "mean")
    v_std = _rolling(vol, zw, "std", ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(v_std <= DISPERSION_EPS * np.abs(v_mean), 0.0, (vol - v_mean) / v_std)
    z[np.isnan(v_mean)] = np.nan
    f["volume_z_60"] = z
    f["hl_range"] = (high - low) / c
    return f


def compute_symbol_features(
    open_time_ms: np.ndarray,
    segment: np.ndarray,
    columns: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Features for one symbol's bars, sorted by open time, with segment ids.

    `columns` holds float arrays `close`, `high`, `low`, `volume`, `trades`, `taker_buy_base`.
    Returns float arrays (NaN where the value is null: warm-up or undefined) for every
    feature in the spec, aligned with the input rows.
    """
    n = open_time_ms.shape[0]
    out = {name: np.full(n, np.nan) for name in spec.FEATURE_COLUMNS}
    if n == 0:
        return out
    starts = np.flatnonzero(np.r_[True, segment[1:] != segment[:-1]])
    ends = np.r_[starts[1:], n]
    warm = np.zeros(n, dtype=bool)
    for a, b in zip(starts, ends, strict=True):
        if b - a <= spec.WARMUP_BARS:
            continue
        warm[a + spec.WARMUP_BARS : b] = True
        seg = _segment_features(
            columns["close"][a:b],
            columns["high"][a:b],
            columns["low"][a:b],
            columns["volume"][a:b],
            columns["taker_buy_base"][a:b],
        )
        lo = a + spec.WARMUP_BARS
        for name, values in seg.items():
            out[name][lo:b] = values[spec.WARMUP_BARS :]

    out["log_volume"] = np.where(warm, np.log1p(columns["volume"]), np.nan)
    out["log_trades"] = np.where(warm, np.log1p(columns["trades"]), np.nan)
    minute = (open_time_ms // ONE_MINUTE_MS) % spec.MINUTES_PER_DAY
    dow = (open_time_ms // ONE_DAY_MS + 3) % spec.DAYS_PER_WEEK
    tau = 2.0 * math.pi
    for name, values in (
        ("minute_sin", np.sin(minute * tau / spec.MINUTES_PER_DAY)),
        ("minute_cos", np.cos(minute * tau / spec.MINUTES_PER_DAY)),
        ("dow_sin", np.sin(dow * tau / spec.DAYS_PER_WEEK)),
        ("dow_cos", np.cos(dow * tau / spec.DAYS_PER_WEEK)),
    ):
        out[name] = np.where(warm, values, np.nan)
    return out
