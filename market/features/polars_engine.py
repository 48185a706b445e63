"""The batch feature engine: the shared spec over any number of symbols' bars in one pass.

POST /predict (`segment_features`: these kernels over one segment's arrays, no frame), the live
engine, the simulated Silver and the parity tests run this; the Spark ETL runs the independent
numpy kernel (market.features.numpy_kernel), the incremental engine
(market.features.incremental) advances the same features bar by bar, and the tests hold the three
equal. Input: validated bars (the BAR_COLUMNS of market.klines, `open_time` as a UTC datetime or
epoch milliseconds), any number of symbols, any order. Output: the bars sorted by symbol and
open_time with a `segment` id and every feature and target column of the spec.

How it computes each quantity once: polars orders the bars and marks where each segment (a run
of consecutive bars of one symbol) starts; every feature is then one numpy array over the whole
sorted frame. Rolling windows need no grouping: a feature is only kept WARMUP_BARS (240) bars
into its segment and no window reaches back more than spec.LONGEST_WINDOW_BARS (61) bars, so
every kept value reads bars of its own segment only. They run block by block, so that their
temporaries stay in the CPU cache. Only the recursive features (EMA, MACD signal, Wilder RSI),
seeded at each segment's first bar, run per segment: one polars call over one list per segment.
One warm-up mask then nulls the first WARMUP_BARS rows of every segment in every feature.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import polars as pl
import pyarrow as pa

from market.bar_columns import BarColumns
from market.features import spec
from market.klines import ONE_DAY_MS, ONE_MINUTE_MS

# Numerical zero for a dispersion: float sums of identical values need not cancel exactly, so
# "std is 0" means std within 1e-12 of the level it is measured against (both engines agree).
DISPERSION_EPS = 1e-12

_TIME = "_t"  # open time in epoch ms
_NEW_RUN = "_new_run"  # true at the first bar of each (symbol, segment)
# Rows per block of the windowed features: a block's dozen float arrays (64 KiB each) stay in a
# core's L2 cache, where the whole-frame arrays (4.6 MB per column for a year of minutes) do not.
_BLOCK_ROWS = 8192

FloatArray = np.ndarray


def _ms(open_time: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    if dtype.is_temporal():
        return open_time.dt.epoch("ms")
    return open_time.cast(pl.Int64)


def _new_run(interval_ms: int) -> tuple[pl.Expr, pl.Expr]:
    """(first bar of its symbol, first bar of its segment) over bars sorted by symbol, time."""
    symbol = pl.col("symbol")
    new_symbol = symbol.ne_missing(symbol.shift(1)) | (pl.int_range(pl.len()) == 0)
    return new_symbol, (new_symbol | (pl.col(_TIME).diff() != interval_ms)).fill_null(True)


def _segmented(bars: pl.DataFrame, interval_ms: int) -> pl.DataFrame:
    """Bars sorted by symbol and time, with `_t`, `segment` (per symbol, from 1), `_new_run`."""
    dtype = bars.schema["open_time"]
    frame = bars.with_columns(_ms(pl.col("open_time"), dtype).alias(_TIME))
    new_symbol, new_run = _new_run(interval_ms)
    flags = frame.select(
        new_symbol.alias("s"), new_run.alias("r"), (pl.col(_TIME).diff() < 0).alias("back")
    )
    # Sorting gathers every column; bars usually arrive sorted (Silver, the feeds), so skip it
    # when they are: symbols in order, and times non-decreasing within each symbol.
    in_order = bool(frame["symbol"].is_sorted()) and not bool(
        flags.select((pl.col("back") & ~pl.col("s")).any()).item()
    )
    if not in_order:
        frame = frame.sort("symbol", _TIME)
        flags = frame.select(new_symbol.alias("s"), new_run.alias("r"))
    run = flags["r"].cast(pl.Int64).cum_sum()
    # A symbol's first run id, carried down its rows, numbers its segments from 1.
    first_run = pl.select(pl.when(flags["s"]).then(run).forward_fill()).to_series()
    return frame.with_columns((run - first_run + 1).alias("segment"), flags["r"].alias(_NEW_RUN))


def add_segments(bars: pl.DataFrame, interval_ms: int = ONE_MINUTE_MS) -> pl.DataFrame:
    """Sort by symbol/open_time and number each maximal run of consecutive bars per symbol.

    `interval_ms` is the bar length: 1 minute for Silver; other lengths let the same rules run
    on coarser bars (the tests use the hourly file with real outages). Adds `_t` (open time in
    epoch ms) and `segment` (Int64, 1 for each symbol's first run).
    """
    return _segmented(bars, interval_ms).drop(_NEW_RUN)


def _window_sum(x: FloatArray, k: int, width: int = 1) -> FloatArray:
    """Sums over k rows ending at each row (NaN in the first k-1 rows), from `x`, the sums
    over `width` rows (plain values when 1); k must be a multiple of `width`."""
    n = x.shape[0]
    total = x.copy()
    for j in range(width, k, width):
        total[j:] += x[: max(n - j, 0)]
    total[: k - 1] = np.nan
    return total


def _log_return(c: FloatArray, k: int) -> FloatArray:
    """ln(c_t / c_(t-k)); NaN in the first k rows."""
    out = np.full(c.shape[0], np.nan)
    np.divide(c[k:], c[: max(c.shape[0] - k, 0)], out=out[k:])
    return np.log(out, out=out)


def _bollinger(c: FloatArray) -> tuple[FloatArray, FloatArray]:
    """(%B, width) of the band over the last BOLLINGER_WINDOW closes.

    Computed from deviations d_j = close_(t-j) - close_t: nearby prices subtract exactly, so the
    position inside a narrow band is not lost to cancellation against a 5-digit price. With
    d_0 = 0 in the window, mean(d)^2 <= w var, so var = mean(d^2) - mean(d)^2 keeps its relative
    precision (no cancellation beyond a factor w + 1).
    """
    w = spec.BOLLINGER_WINDOW
    n = max(c.shape[0] - (w - 1), 0)  # rows with a full window: c[w-1:]
    now = c[w - 1 :]
    dev_sum = np.zeros(n)
    dev_sq_sum = np.zeros(n)
    d = np.empty(n)
    for j in range(1, w):
        np.subtract(c[w - 1 - j : w - 1 - j + n], now, out=d)
        dev_sum += d
        d *= d
        dev_sq_sum += d
    mean_dev = dev_sum / w  # mid - close
    var = np.maximum(dev_sq_sum / w - mean_dev * mean_dev, 0.0)
    band = spec.BOLLINGER_K * np.sqrt(var)
    mid = now + mean_dev
    flat = band <= DISPERSION_EPS * mid
    pctb = np.full(c.shape[0], np.nan)
    width = np.full(c.shape[0], np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        pctb[w - 1 :] = np.where(flat, 0.5, (band - mean_dev) / (2.0 * band))
        width[w - 1 :] = np.where(flat, 0.0, 2.0 * band / mid)
    return pctb, width


def _window_sums(x: FloatArray, windows: tuple[int, ...]) -> dict[int, FloatArray]:
    """Sums of x over each window (rows ending at each row); a window that is a multiple of
    the previous one extends its sums (5 -> 10 -> 20 costs 4 + 1 + 1 additions)."""
    sums: dict[int, FloatArray] = {}
    width, total = 1, x
    for k in sorted(set(windows)):
        if k == 1:
            sums[k] = x
            continue
        if k % width:
            width, total = 1, x
        total = _window_sum(total, k, width)
        sums[k], width = total, k
    return sums


def _windowed(c: FloatArray, ratio: FloatArray) -> dict[str, FloatArray]:
    """Returns, moving averages, realised volatility and the Bollinger band of a block of rows."""
    f: dict[str, FloatArray] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        ret_1 = _log_return(c, 1)
    # ret_k as the sum of the last k one-bar log returns: one logarithm instead of one per lag,
    # and the sums nest with those of the realised volatility (1e-16 absolute error).
    sums = _window_sums(ret_1, (*spec.RETURN_LAGS, *spec.REALISED_VOL_WINDOWS))
    for k in spec.RETURN_LAGS:
        f[f"ret_{k}"] = ret_1 if k == 1 else sums[k]
    for k, total in _window_sums(c, spec.SMA_WINDOWS).items():
        sma = total / k
        f[f"sma_{k}"] = sma
        f[f"close_sma_{k}"] = c / sma - 1.0
    f["bb_pctb_20"], f["bb_width_20"] = _bollinger(c)
    # Sample variance from the window sums of ret_1 and its square: log returns have a mean far
    # below their spread, so the difference keeps its precision (1e-15 against two passes on the
    # real year), and a window of zero returns gives exactly 0.
    squares = _window_sums(ret_1 * ret_1, spec.REALISED_VOL_WINDOWS)
    for k in spec.REALISED_VOL_WINDOWS:
        var = squares[k] - sums[k] * sums[k] / k
        var /= k - 1
        f[f"rv_{k}"] = np.sqrt(np.maximum(var, 0.0, out=var), out=var)
    k = spec.TAKER_RATIO_MA_WINDOW
    f["taker_buy_ratio_ma_10"] = _window_sum(ratio, k) / k
    return f


# Rows before a row that the windowed features read (ret_1 over the longest rv window).
_WINDOWED_LOOKBACK = spec.LONGEST_WINDOW_BARS


def _by_block(
    compute: Callable[..., dict[str, FloatArray]],
    inputs: list[FloatArray],
    lookback: int,
    out: dict[str, FloatArray],
) -> None:
    """`compute` over blocks of rows, each given the `lookback` rows before it as well; every
    array it returns is written into the row range of its block in `out[name]`.

    Equal to `compute` over the whole arrays when a row's outputs read only its own row and the
    `lookback` rows before it (the same arithmetic runs on the same values).
    """
    n = inputs[0].shape[0]
    for start in range(0, n, _BLOCK_ROWS):
        stop = min(start + _BLOCK_ROWS, n)
        first = max(start - lookback, 0)
        part = compute(*(x[first:stop] for x in inputs))
        for name, values in part.items():
            out[name][start:stop] = values[start - first :]


def _per_segment(
    values: FloatArray,
    offsets: np.ndarray,
    exprs: Mapping[str, Callable[[pl.Expr], pl.Expr]],
) -> dict[str, FloatArray]:
    """Each expression (a function of the expression of the values) run on every segment's
    values on their own.

    `offsets` (n_segments + 1, from 0 to len(values)) bound the segments. The values become one
    list per segment (no copy), so polars evaluates the expressions segment by segment in one
    call, whatever the number of segments. One segment (a /predict window) skips the lists:
    the same expressions run on the values as one column, the same kernels on the same values.
    """
    if offsets.shape[0] == 2:
        column = pl.col("values")
        one = pl.DataFrame({"values": values}).select(
            expr(column).alias(name) for name, expr in exprs.items()
        )
        return {name: one[name].to_numpy() for name in exprs}
    segments = pa.ListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values))
    frame = pl.DataFrame({"segments": pl.Series(segments)})
    out = frame.select(
        pl.col("segments").list.eval(expr(pl.element())).explode().alias(name)
        for name, expr in exprs.items()
    )
    return {name: out[name].to_numpy() for name in exprs}


def _ewm(expr: pl.Expr, alpha: float) -> pl.Expr:
    """y_0 = x_0, y_t = alpha x_t + (1 - alpha) y_(t-1); leading nulls are skipped."""
    return expr.ewm_mean(alpha=alpha, adjust=False)


def _recursive(c: FloatArray, offsets: np.ndarray) -> dict[str, FloatArray]:
    """EMA 12/26, MACD, its signal and the Wilder mean gain/loss, each seeded at the first bar
    of its segment (`offsets` bound the segments)."""
    wilder = 1.0 / spec.RSI_PERIOD
    # diff() starts each segment with a null that ewm_mean skips: the Wilder means are seeded
    # at the segment's first change.
    out = _per_segment(
        c,
        offsets,
        {
            "ema_fast": lambda close: _ewm(close, 2.0 / (spec.EMA_FAST + 1)),
            "ema_slow": lambda close: _ewm(close, 2.0 / (spec.EMA_SLOW + 1)),
            "gain": lambda close: _ewm(close.diff().clip(lower_bound=0.0), wilder),
            "loss": lambda close: _ewm((-close.diff()).clip(lower_bound=0.0), wilder),
        },
    )
    out["macd"] = out["ema_fast"] - out["ema_slow"]
    signal_alpha = 2.0 / (spec.MACD_SIGNAL + 1)
    out.update(_per_segment(out["macd"], offsets, {"signal": lambda m: _ewm(m, signal_alpha)}))
    return out


def _rolling_mean_std(x: FloatArray, k: int) -> tuple[FloatArray, FloatArray]:
    """Rolling mean and sample std (ddof=1) over k rows: polars' O(n), numerically stable
    kernels (a window of equal values has std exactly 0)."""
    series = pl.Series(x)
    return series.rolling_mean(k).to_numpy(), series.rolling_std(k, ddof=1).to_numpy()


def _cyclic(values: np.ndarray, period: int, sin: FloatArray, cos: FloatArray) -> None:
    """sin and cos of 2 pi value / period into `sin` and `cos`, looked up in a table of the
    period's values; `values` lie in [0, period)."""
    angle = np.arange(period) * (2.0 * math.pi) / period
    # mode="clip" skips the bounds check of the default mode (the values are in range).
    np.take(np.sin(angle), values, out=sin, mode="clip")
    np.take(np.cos(angle), values, out=cos, mode="clip")


def _fill_features(
    column: Callable[[str], FloatArray],
    t: np.ndarray,
    offsets: np.ndarray,
    f: dict[str, FloatArray],
) -> None:
    """Every spec feature over bars sorted by symbol and time, before the warm-up mask, written
    into the arrays of `f` (one per feature name, one value per bar). `column(name)` gives the
    bar column `name` (close, high, low, volume, trades, taker_buy_base) as float64, `t` the
    open times (epoch ms), `offsets` the segments' bounds (from 0 to the number of bars)."""
    c, v = column("close"), column("volume")
    ratio = f["taker_buy_ratio"]
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(column("taker_buy_base"), v, out=ratio)
    ratio[v == 0.0] = 0.5
    _by_block(_windowed, [c, ratio], _WINDOWED_LOOKBACK, f)

    rec = _recursive(c, offsets)
    f["ema_12"][:], f["ema_26"][:] = rec["ema_fast"], rec["ema_slow"]
    f["macd"][:], f["macd_signal"][:] = rec["macd"], rec["signal"]
    np.subtract(rec["macd"], rec["signal"], out=f["macd_hist"])
    rsi = f["rsi_14"]
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(rec["gain"], rec["loss"], out=rsi)
        rsi += 1.0
        np.divide(100.0, rsi, out=rsi)
        np.subtract(100.0, rsi, out=rsi)
    rsi[rec["loss"] == 0.0] = 100.0

    v_mean, v_std = _rolling_mean_std(v, spec.VOLUME_Z_WINDOW)
    z = f["volume_z_60"]
    with np.errstate(divide="ignore", invalid="ignore"):
        np.subtract(v, v_mean, out=z)
        z /= v_std
    z[v_std <= DISPERSION_EPS * np.abs(v_mean)] = 0.0
    np.log1p(v, out=f["log_volume"])
    np.log1p(column("trades"), out=f["log_trades"])
    np.subtract(column("high"), column("low"), out=f["hl_range"])
    f["hl_range"] /= c

    minute = (t // ONE_MINUTE_MS) % spec.MINUTES_PER_DAY
    # 1970-01-01 was a Thursday: ISO weekday 4, so Monday-based index 3.
    dow = (t // ONE_DAY_MS + 3) % spec.DAYS_PER_WEEK
    _cyclic(minute, spec.MINUTES_PER_DAY, f["minute_sin"], f["minute_cos"])
    _cyclic(dow, spec.DAYS_PER_WEEK, f["dow_sin"], f["dow_cos"])


def _null_where_not(keep: np.ndarray) -> tuple[pa.Buffer, int]:
    """An Arrow validity bitmap that is valid where `keep` is true, and its null count."""
    return pa.py_buffer(np.packbits(keep, bitorder="little")), int(keep.size - keep.sum())


def _masked(name: str, values: np.ndarray, validity: tuple[pa.Buffer, int]) -> pl.Series:
    """`values` as a Series that is null where the bitmap says so (the values are not copied)."""
    bitmap, null_count = validity
    data = np.ascontiguousarray(values)
    array = pa.Array.from_buffers(
        pa.from_numpy_dtype(data.dtype), data.size, [bitmap, pa.py_buffer(data)], null_count
    )
    return pl.Series(name, array)


def compute_features(bars: pl.DataFrame, interval_ms: int = ONE_MINUTE_MS) -> pl.DataFrame:
    """Every spec feature and target for `bars` (see module docstring for the shape).

    Windows count bars; each target is its horizon (spec.TARGET_HORIZONS_BARS) bars ahead
    within the segment. Feature values are null in the first WARMUP_BARS rows of each segment.
    """
    frame = _segmented(bars, interval_ms)
    n = frame.height
    run_starts = np.flatnonzero(frame[_NEW_RUN].to_numpy())
    run_stops = np.append(run_starts[1:], n)
    lengths = run_stops - run_starts
    # Row index within its segment; features are kept from WARMUP_BARS rows in.
    position = np.arange(n) - np.repeat(run_starts, lengths)
    warm = _null_where_not(position >= spec.WARMUP_BARS)
    # One allocation for every float output: the kernel backs it with huge pages, where 35
    # separate arrays are each paged in 4 KiB at a time (measured: 20x the page faults).
    horizons = spec.TARGET_HORIZONS_BARS
    names = (
        *spec.FEATURE_COLUMNS,
        *(spec.target_close_column(h) for h in horizons),
        *(spec.target_ret_column(h) for h in horizons),
    )
    store = dict(zip(names, np.empty((len(names), n)), strict=True))

    def column(name: str) -> FloatArray:
        return frame[name].cast(pl.Float64).to_numpy()

    _fill_features(column, frame[_TIME].to_numpy(), np.append(run_starts, n), store)
    columns = [_masked(name, store[name], warm) for name in spec.FEATURE_COLUMNS]

    close = frame["close"].cast(pl.Float64).to_numpy()
    segment_length = np.repeat(lengths, lengths)
    for h in horizons:
        # Within a segment bars are consecutive, so the bar h rows ahead in the same segment is
        # exactly h intervals later; a bar with no such row has no target.
        has_target = _null_where_not(position + h < segment_length)
        future_close = store[spec.target_close_column(h)]
        target_ret = store[spec.target_ret_column(h)]
        future_close[: max(n - h, 0)] = close[h:]
        future_close[max(n - h, 0) :] = np.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            np.divide(future_close, close, out=target_ret)
            np.log(target_ret, out=target_ret)
        columns += [
            _masked(spec.target_close_column(h), future_close, has_target),
            _masked(spec.target_ret_column(h), target_ret, has_target),
            _masked(spec.target_up_column(h), (future_close > close).astype(np.int32), has_target),
        ]
    return frame.with_columns(columns).drop(_TIME, _NEW_RUN)


def segment_features(bars: BarColumns) -> dict[str, FloatArray]:
    """Every spec feature of one symbol's bars that form one segment (consecutive 1-minute bars
    in time order, `BarColumns.one_segment`), as float64 arrays aligned with the bars, NaN in
    the first WARMUP_BARS (240) rows: bit for bit the values `compute_features` gives the same
    bars (the same kernels over the same arrays; a test holds them equal), without building,
    segmenting or masking a frame, and without the targets. For `POST /predict`, whose bars are
    checked to be one segment. Raises ValueError when they are not.
    """
    if not bars.one_segment():
        raise ValueError("the bars are not consecutive 1-minute bars in time order")
    n = len(bars)
    store = dict(zip(spec.FEATURE_COLUMNS, np.empty((len(spec.FEATURE_COLUMNS), n)), strict=True))
    if n == 0:
        return store

    def column(name: str) -> FloatArray:
        values: FloatArray = getattr(bars, name)
        return values.astype(np.float64, copy=False)

    _fill_features(column, bars.open_time, np.array([0, n]), store)
    for values in store.values():
        values[: spec.WARMUP_BARS] = np.nan
    return store
