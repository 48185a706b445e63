"""The online feature engine: the shared spec implemented with polars expressions.

Serve runs this over the latest bars of each symbol; tests hold it equal to the Spark engine.
Input: validated bars (the BAR_COLUMNS of market.klines, `open_time` as a UTC datetime or epoch
milliseconds), any number of symbols, any order. Output: the bars sorted by symbol and open_time
with a `segment` id and every feature and target column of the spec.
"""

from __future__ import annotations

import functools
import math
import operator

import polars as pl

from market.features import spec
from market.klines import ONE_DAY_MS, ONE_MINUTE_MS

_KEYS = ["symbol", "segment"]
# Numerical zero for a dispersion: float sums of identical values need not cancel exactly, so
# "std is 0" means std within 1e-12 of the level it is measured against (both engines agree).
DISPERSION_EPS = 1e-12


def _ms(open_time: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    if dtype.is_temporal():
        return open_time.dt.epoch("ms")
    return open_time.cast(pl.Int64)


def add_segments(bars: pl.DataFrame, interval_ms: int = ONE_MINUTE_MS) -> pl.DataFrame:
    """Sort by symbol/open_time and number each maximal run of consecutive bars per symbol.

    `interval_ms` is the bar length: 1 minute for Silver; other lengths let the same rules run
    on coarser bars (the tests use the hourly file with real outages).
    """
    dtype = bars.schema["open_time"]
    out = bars.with_columns(_ms(pl.col("open_time"), dtype).alias("_t")).sort("symbol", "_t")
    step = pl.col("_t").diff().over("symbol")
    new_segment = step.is_null() | (step != interval_ms)
    return out.with_columns(new_segment.cast(pl.Int64).cum_sum().over("symbol").alias("segment"))


def _ema(expr: pl.Expr, span: int) -> pl.Expr:
    return expr.ewm_mean(alpha=2.0 / (span + 1), adjust=False)


def compute_features(bars: pl.DataFrame, interval_ms: int = ONE_MINUTE_MS) -> pl.DataFrame:
    """Every spec feature and target for `bars` (see module docstring for the shape).

    Windows count bars; the target is HORIZON_BARS bars ahead within the segment.
    """
    df = add_segments(bars, interval_ms)
    c = pl.col("close")
    pos = pl.int_range(pl.len()).over(_KEYS)

    ret1 = (c / c.shift(1)).log()
    cols: dict[str, pl.Expr] = {}
    for k in spec.RETURN_LAGS:
        cols[f"ret_{k}"] = (c / c.shift(k)).log().over(_KEYS)
    for k in spec.SMA_WINDOWS:
        cols[f"sma_{k}"] = c.rolling_mean(k).over(_KEYS)
        cols[f"close_sma_{k}"] = (c / c.rolling_mean(k) - 1.0).over(_KEYS)

    ema_fast = _ema(c, spec.EMA_FAST)
    ema_slow = _ema(c, spec.EMA_SLOW)
    macd = ema_fast - ema_slow
    macd_signal = _ema(macd, spec.MACD_SIGNAL)
    cols["ema_12"] = ema_fast.over(_KEYS)
    cols["ema_26"] = ema_slow.over(_KEYS)
    cols["macd"] = macd.over(_KEYS)
    cols["macd_signal"] = macd_signal.over(_KEYS)
    cols["macd_hist"] = (macd - macd_signal).over(_KEYS)

    change = c.diff()
    wilder = 1.0 / spec.RSI_PERIOD
    # ewm_mean skips the leading null of diff(), so the means are seeded at the first change.
    mean_gain = change.clip(lower_bound=0.0).ewm_mean(alpha=wilder, adjust=False)
    mean_loss = (-change).clip(lower_bound=0.0).ewm_mean(alpha=wilder, adjust=False)
    cols["rsi_14"] = (
        pl.when(mean_loss == 0.0)
        .then(100.0)
        .otherwise(100.0 - 100.0 / (1.0 + mean_gain / mean_loss))
        .over(_KEYS)
    )

    # Bollinger from deviations d_j = close_(t-j) - close_t: nearby prices subtract exactly, so
    # the position inside a narrow band is not lost to cancellation against a 5-digit price.
    w = spec.BOLLINGER_WINDOW
    devs = [c.shift(j) - c for j in range(1, w)]
    mean_dev = functools.reduce(operator.add, devs) / w  # mid - close (the j=0 term is 0)
    var = (mean_dev**2 + functools.reduce(operator.add, [(d - mean_dev) ** 2 for d in devs])) / w
    band = spec.BOLLINGER_K * var.sqrt()
    mid = c + mean_dev
    flat = band <= DISPERSION_EPS * mid
    cols["bb_pctb_20"] = (
        pl.when(flat).then(0.5).otherwise((band - mean_dev) / (2.0 * band)).over(_KEYS)
    )
    cols["bb_width_20"] = pl.when(flat).then(0.0).otherwise(2.0 * band / mid).over(_KEYS)

    for k in spec.REALISED_VOL_WINDOWS:
        cols[f"rv_{k}"] = ret1.rolling_std(k, ddof=1).over(_KEYS)

    v = pl.col("volume")
    taker_ratio = pl.when(v == 0.0).then(0.5).otherwise(pl.col("taker_buy_base") / v)
    cols["taker_buy_ratio"] = taker_ratio
    cols["taker_buy_ratio_ma_10"] = taker_ratio.rolling_mean(spec.TAKER_RATIO_MA_WINDOW).over(_KEYS)
    zw = spec.VOLUME_Z_WINDOW
    v_mean = v.rolling_mean(zw)
    v_std = v.rolling_std(zw, ddof=1)
    cols["volume_z_60"] = (
        pl.when(v_std <= DISPERSION_EPS * v_mean.abs())
        .then(0.0)
        .otherwise((v - v_mean) / v_std)
        .over(_KEYS)
    )
    cols["log_volume"] = v.log1p()
    cols["log_trades"] = pl.col("trades").cast(pl.Float64).log1p()
    cols["hl_range"] = (pl.col("high") - pl.col("low")) / c

    minute = (pl.col("_t") // ONE_MINUTE_MS) % spec.MINUTES_PER_DAY
    # 1970-01-01 was a Thursday: ISO weekday 4, so Monday-based index 3.
    dow = (pl.col("_t") // ONE_DAY_MS + 3) % spec.DAYS_PER_WEEK
    tau = 2.0 * math.pi
    cols["minute_sin"] = (minute * tau / spec.MINUTES_PER_DAY).sin()
    cols["minute_cos"] = (minute * tau / spec.MINUTES_PER_DAY).cos()
    cols["dow_sin"] = (dow * tau / spec.DAYS_PER_WEEK).sin()
    cols["dow_cos"] = (dow * tau / spec.DAYS_PER_WEEK).cos()

    warm = pos >= spec.WARMUP_BARS
    feature_exprs = [
        pl.when(warm).then(cols[name].cast(pl.Float64)).alias(name) for name in spec.FEATURE_COLUMNS
    ]
    h = spec.HORIZON_BARS
    # Within a segment minutes are consecutive, so the bar h rows ahead in the same segment is
    # exactly h minutes later; past the segment's end shift() gives null.
    future_close = c.shift(-h).over(_KEYS)
    target_exprs = [
        future_close.alias("target_close_10"),
        (future_close / c).log().alias("target_ret_10"),
        pl.when(future_close.is_not_null())
        .then((future_close > c).cast(pl.Int32))
        .alias("target_up_10"),
    ]
    return df.with_columns(feature_exprs + target_exprs).drop("_t")
