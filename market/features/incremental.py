"""The incremental feature engine: every spec feature advanced by one new bar per symbol.

The live path keeps one `IncrementalFeatures` for its symbols. Each bar close calls `advance`
once with the new 1-minute bars of any number of symbols; every feature of those symbols moves
on by one bar in a fixed amount of work per symbol, in one vectorised numpy pass (no Python loop
over symbols):

- Recursive features (EMA 12/26, MACD and its EMA 9 signal, the Wilder mean gain and loss of
  RSI 14) hold their last value per symbol and take one recursion step.
- Rolling features (returns, SMAs, the Bollinger band, realised volatility, the taker-ratio
  mean, the volume z-score) read the last spec.LONGEST_WINDOW_BARS (61) inputs of the symbol,
  kept in a fixed-size buffer (oldest first, shifted by one bar per advance), with the batch
  engine's formulas: window sums, Bollinger deviations from the current close, and realised
  variance from the sums of ret_1 and its square. The buffer is stored bar-major (input, bar,
  symbol), so a window sum adds whole rows of symbols, and when every symbol advances at once
  the shifted buffer simply replaces the old one.
- Pointwise features (taker ratio, log volume and trades, high-low range, the cyclic time
  encodings) come from the new bar alone.

Segments are the batch engines' (DESIGN.md section 4): a symbol's first bar, or a bar whose
open time is not the previous bar's plus one minute, starts a new segment. Its state starts
afresh (EMAs seeded with the segment's first close, the Wilder means at its first change, the
window buffer emptied) and the features stay null (NaN) for its first spec.WARMUP_BARS (240)
bars. A bar at or before the symbol's last open time (a duplicate or an older bar) is an error:
`advance` raises `StaleBarError` and changes nothing. The values therefore equal those of the
batch engine (market.features.polars_engine) on the same bars within floating-point rounding
(the tests hold them within 1e-9 at each column's scale).

Every feature row `advance` computes (null rows of the warm-up included) also goes into a
per-symbol ring of the last `window_rows` rows, with its bar's close, which `windows` returns as
a model's input windows (symbols x rows x features, oldest row first; the closes scale the
price-unit features into model inputs, models.dataset.model_inputs) with a mask of the symbols
whose whole window is past the warm-up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from market.features import spec
from market.features.polars_engine import DISPERSION_EPS
from market.klines import ONE_DAY_MS, ONE_MINUTE_MS

FloatArray = np.ndarray

# The inputs the rolling features read, one row each in a symbol's window buffer.
_CLOSE, _RET_1, _TAKER_RATIO, _VOLUME = range(4)
_WINDOW_INPUTS = 4
# open_time before any bar: a symbol's first bar always starts a segment.
_NO_BAR = np.iinfo(np.int64).min
# Column of each spec feature in the feature rows `advance` returns and `windows` holds.
FEATURE_INDEX = {name: j for j, name in enumerate(spec.FEATURE_COLUMNS)}


class StaleBarError(ValueError):
    """A bar is not newer than the last bar already taken for its symbol."""


@dataclass(frozen=True)
class BarArrays:
    """New 1-minute bars of several symbols, at most one per symbol, as aligned 1-D arrays.

    `symbol` holds indices into the engine's symbols; `open_time_ms` epoch milliseconds (UTC);
    the others are the validated bar values as float64.
    """

    symbol: np.ndarray
    open_time_ms: np.ndarray
    high: FloatArray
    low: FloatArray
    close: FloatArray
    volume: FloatArray
    trades: FloatArray
    taker_buy_base: FloatArray

    def __len__(self) -> int:
        return int(self.symbol.shape[0])

    def rows(self, selection: slice | np.ndarray) -> BarArrays:
        """The bars at `selection` (a slice or an index / boolean array)."""
        return BarArrays(
            symbol=self.symbol[selection],
            open_time_ms=self.open_time_ms[selection],
            high=self.high[selection],
            low=self.low[selection],
            close=self.close[selection],
            volume=self.volume[selection],
            trades=self.trades[selection],
            taker_buy_base=self.taker_buy_base[selection],
        )


@dataclass(frozen=True)
class FeatureWindows:
    """The last `window_rows` feature rows of some symbols, as a model reads them.

    values: (symbols, window_rows, len(spec.FEATURE_COLUMNS)) float64, oldest row first,
        columns in spec.FEATURE_COLUMNS order; NaN throughout for a symbol that is not ready.
    close: (symbols, window_rows) float64, the close of each row's bar (NaN where `values` is).
    ready: (symbols,) bool, true where every row of the window is past the segment's warm-up.
    open_time_ms: (symbols,) int64, the open time of each symbol's newest row (the last bar it
        took; the int64 minimum for a symbol that has taken none), so a caller can tell a
        current window from one whose symbol missed the latest bar.
    """

    values: FloatArray
    close: FloatArray
    ready: np.ndarray
    open_time_ms: np.ndarray


class IncrementalFeatures:
    """Per-symbol feature state advanced one 1-minute bar at a time (see module docstring).

    `symbols` names the symbols, in the order of their indices; `window_rows` (>= 1) is how
    many of each symbol's latest feature rows `windows` returns (a model's input window).
    Memory: about (4 * 61 + 8 + 34 * window_rows) float64 per symbol. Not thread-safe: one
    caller at a time advances or reads it.
    """

    def __init__(self, symbols: Sequence[str], window_rows: int) -> None:
        if window_rows < 1:
            raise ValueError(f"window_rows must be at least 1, got {window_rows}")
        if len(set(symbols)) != len(symbols):
            raise ValueError("symbols must be distinct")
        self.symbols: tuple[str, ...] = tuple(symbols)
        self.window_rows = window_rows
        n = len(self.symbols)
        self._index = {name: i for i, name in enumerate(self.symbols)}
        self._last_open_time = np.full(n, _NO_BAR, dtype=np.int64)
        # Bars taken in the current segment (0 before the first bar).
        self._segment_bars = np.zeros(n, dtype=np.int64)
        self._ema_fast = np.full(n, np.nan)
        self._ema_slow = np.full(n, np.nan)
        self._macd_signal = np.full(n, np.nan)
        self._mean_gain = np.full(n, np.nan)
        self._mean_loss = np.full(n, np.nan)
        self._inputs = np.full((_WINDOW_INPUTS, spec.LONGEST_WINDOW_BARS, n), np.nan)
        self._rows = np.full((n, window_rows, len(spec.FEATURE_COLUMNS)), np.nan)
        self._row_close = np.full((n, window_rows), np.nan)
        self._rows_written = np.zeros(n, dtype=np.int64)
        tau = 2.0 * math.pi
        minute_angle = np.arange(spec.MINUTES_PER_DAY) * tau / spec.MINUTES_PER_DAY
        day_angle = np.arange(spec.DAYS_PER_WEEK) * tau / spec.DAYS_PER_WEEK
        self._minute_sin, self._minute_cos = np.sin(minute_angle), np.cos(minute_angle)
        self._dow_sin, self._dow_cos = np.sin(day_angle), np.cos(day_angle)

    @property
    def segment_bars(self) -> np.ndarray:
        """Bars each symbol has taken in its current segment (a copy; 0 before its first)."""
        return self._segment_bars.copy()

    def symbol_indices(self, names: Sequence[str] | pl.Series) -> np.ndarray:
        """The indices of `names`; raises ValueError naming the first unknown symbol."""
        try:
            return np.fromiter((self._index[name] for name in names), dtype=np.intp)
        except KeyError as error:
            raise ValueError(f"unknown symbol {error.args[0]!r}") from None

    def bar_arrays(self, bars: pl.DataFrame) -> BarArrays:
        """`bars` (market.klines.BAR_COLUMNS; open_time in epoch ms or a UTC datetime) as
        BarArrays in their row order; raises ValueError for a symbol this engine lacks."""
        open_time = bars["open_time"]
        if open_time.dtype.is_temporal():
            open_time = open_time.dt.epoch("ms")

        def floats(name: str) -> FloatArray:
            return bars[name].cast(pl.Float64).to_numpy()

        return BarArrays(
            symbol=self.symbol_indices(bars["symbol"]),
            open_time_ms=open_time.cast(pl.Int64).to_numpy(),
            high=floats("high"),
            low=floats("low"),
            close=floats("close"),
            volume=floats("volume"),
            trades=floats("trades"),
            taker_buy_base=floats("taker_buy_base"),
        )

    def advance(self, bars: BarArrays) -> FloatArray:
        """Take one new bar for each symbol in `bars`; returns their feature rows.

        The result is (len(bars), len(spec.FEATURE_COLUMNS)) float64 in spec.FEATURE_COLUMNS
        order, NaN in the first WARMUP_BARS bars of a segment. A bar whose open time is not its
        symbol's last one plus a minute starts a new segment. Raises StaleBarError when a bar
        is not newer than its symbol's last, ValueError for a symbol index out of range, a
        symbol given twice or arrays of unequal lengths; nothing changes when it raises.
        """
        self._check(bars)
        idx = bars.symbol
        time = bars.open_time_ms
        continues = (self._segment_bars[idx] > 0) & (
            time == self._last_open_time[idx] + ONE_MINUTE_MS
        )
        count = np.where(continues, self._segment_bars[idx] + 1, 1)

        # The window buffer, shifted by one bar; a new segment's starts empty.
        every_symbol = len(bars) == len(self.symbols) and bool((idx[1:] > idx[:-1]).all())
        window = np.empty((_WINDOW_INPUTS, spec.LONGEST_WINDOW_BARS, len(bars)))
        window[:, :-1] = self._inputs[:, 1:] if every_symbol else self._inputs[:, 1:, idx]
        if not continues.all():
            window[:, :-1, ~continues] = np.nan
        close = bars.close
        previous_close = window[_CLOSE, -2]
        with np.errstate(divide="ignore", invalid="ignore"):
            taker_ratio = np.where(bars.volume == 0.0, 0.5, bars.taker_buy_base / bars.volume)
            window[_RET_1, -1] = np.log(close / previous_close)
        window[_CLOSE, -1] = close
        window[_TAKER_RATIO, -1] = taker_ratio
        window[_VOLUME, -1] = bars.volume

        f = self._recursive(idx, continues, count, close, previous_close)
        f.update(_windowed(window))
        f["taker_buy_ratio"] = taker_ratio
        f["log_volume"] = np.log1p(bars.volume)
        f["log_trades"] = np.log1p(bars.trades)
        f["hl_range"] = (bars.high - bars.low) / close
        minute = (time // ONE_MINUTE_MS) % spec.MINUTES_PER_DAY
        # 1970-01-01 was a Thursday: ISO weekday 4, so Monday-based index 3.
        dow = (time // ONE_DAY_MS + 3) % spec.DAYS_PER_WEEK
        f["minute_sin"], f["minute_cos"] = self._minute_sin[minute], self._minute_cos[minute]
        f["dow_sin"], f["dow_cos"] = self._dow_sin[dow], self._dow_cos[dow]
        rows = np.stack([f[name] for name in spec.FEATURE_COLUMNS], axis=1)
        # Features are kept from WARMUP_BARS bars into the segment (position count - 1).
        rows[count <= spec.WARMUP_BARS] = np.nan

        if every_symbol:
            self._inputs = window
        else:
            self._inputs[:, :, idx] = window
        self._segment_bars[idx] = count
        self._last_open_time[idx] = time
        slot = self._rows_written[idx] % self.window_rows
        self._rows[idx, slot] = rows
        self._row_close[idx, slot] = close
        self._rows_written[idx] += 1
        return rows

    def windows(self, symbols: np.ndarray | None = None) -> FeatureWindows:
        """The last `window_rows` feature rows of `symbols` (indices; all symbols when None)."""
        idx = np.arange(len(self.symbols)) if symbols is None else np.asarray(symbols, np.intp)
        w = self.window_rows
        # The newest row sits at slot (written - 1) % w; read the w slots before it, in order.
        slots = (self._rows_written[idx, None] - w + np.arange(w)) % w
        values = self._rows[idx[:, None], slots]
        close = self._row_close[idx[:, None], slots]
        ready = self._segment_bars[idx] >= spec.WARMUP_BARS + w
        values[~ready] = np.nan
        close[~ready] = np.nan
        return FeatureWindows(values, close, ready, self._last_open_time[idx].copy())

    def _check(self, bars: BarArrays) -> None:
        n = len(bars)
        columns = (
            bars.open_time_ms,
            bars.high,
            bars.low,
            bars.close,
            bars.volume,
            bars.trades,
            bars.taker_buy_base,
        )
        if bars.symbol.ndim != 1 or any(c.shape != (n,) for c in columns):
            raise ValueError("the arrays of a BarArrays must be 1-D and of equal length")
        idx = bars.symbol
        if n and (idx.min() < 0 or idx.max() >= len(self.symbols)):
            raise ValueError(f"symbol indices must lie in [0, {len(self.symbols)})")
        if np.unique(idx).shape[0] != n:
            raise ValueError("a symbol appears more than once among the bars of one advance")
        stale = np.flatnonzero(bars.open_time_ms <= self._last_open_time[idx])
        if stale.size:
            last = self._last_open_time[idx]
            shown = ", ".join(
                f"{self.symbols[idx[i]]} at {bars.open_time_ms[i]} (last {last[i]})"
                for i in stale[:3]
            )
            raise StaleBarError(
                f"{stale.size} bar(s) not newer than their symbol's last bar (open_time ms): "
                f"{shown}; nothing was advanced"
            )

    def _recursive(
        self,
        idx: np.ndarray,
        continues: np.ndarray,
        count: np.ndarray,
        close: FloatArray,
        previous_close: FloatArray,
    ) -> dict[str, FloatArray]:
        """One step of EMA 12/26, MACD, its signal and RSI's Wilder means; the new values are
        stored and returned. A segment's first bar seeds the EMAs (its MACD, 0, seeds the
        signal); its second bar, the first change, seeds the Wilder means."""

        def ema(state: FloatArray, x: FloatArray, alpha: float) -> FloatArray:
            y = np.where(continues, alpha * x + (1.0 - alpha) * state[idx], x)
            state[idx] = y
            return y

        ema_fast = ema(self._ema_fast, close, 2.0 / (spec.EMA_FAST + 1))
        ema_slow = ema(self._ema_slow, close, 2.0 / (spec.EMA_SLOW + 1))
        macd = ema_fast - ema_slow
        signal = ema(self._macd_signal, macd, 2.0 / (spec.MACD_SIGNAL + 1))

        change = close - previous_close  # NaN at a segment's first bar
        wilder = 1.0 / spec.RSI_PERIOD
        first_change = count == 2

        def wilder_mean(state: FloatArray, x: FloatArray) -> FloatArray:
            y = np.where(first_change, x, wilder * x + (1.0 - wilder) * state[idx])
            state[idx] = y
            return y

        gain = wilder_mean(self._mean_gain, np.maximum(change, 0.0))
        loss = wilder_mean(self._mean_loss, np.maximum(-change, 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            rsi = 100.0 - 100.0 / (1.0 + gain / loss)
        rsi[loss == 0.0] = 100.0
        return {
            "ema_12": ema_fast,
            "ema_26": ema_slow,
            "macd": macd,
            "macd_signal": signal,
            "macd_hist": macd - signal,
            "rsi_14": rsi,
        }


def _windowed(window: FloatArray) -> dict[str, FloatArray]:
    """The rolling features at the newest bar of each symbol's window buffer.

    `window` is (4, LONGEST_WINDOW_BARS, symbols), oldest bar first; a value whose window
    reaches before the segment's first bar reads NaN (only ever in the warm-up).
    """
    f: dict[str, FloatArray] = {}
    close = window[_CLOSE]
    now = close[-1]
    ret_1 = window[_RET_1]
    for k in spec.RETURN_LAGS:
        # The sum of the last k one-bar log returns, as the batch engine computes ret_k.
        f[f"ret_{k}"] = ret_1[-1] if k == 1 else ret_1[-k:].sum(axis=0)
    for k in spec.SMA_WINDOWS:
        sma = close[-k:].sum(axis=0) / k
        f[f"sma_{k}"] = sma
        f[f"close_sma_{k}"] = now / sma - 1.0

    # Bollinger from the deviations of the window's closes from the current one, as the batch
    # engine does (precise for a narrow band at a 5-digit price).
    w = spec.BOLLINGER_WINDOW
    deviation = close[-w:-1] - now
    mean_dev = deviation.sum(axis=0) / w
    var = np.maximum((deviation * deviation).sum(axis=0) / w - mean_dev * mean_dev, 0.0)
    band = spec.BOLLINGER_K * np.sqrt(var)
    mid = now + mean_dev
    flat = band <= DISPERSION_EPS * mid
    with np.errstate(divide="ignore", invalid="ignore"):
        f["bb_pctb_20"] = np.where(flat, 0.5, (band - mean_dev) / (2.0 * band))
        f["bb_width_20"] = np.where(flat, 0.0, 2.0 * band / mid)

    for k in spec.REALISED_VOL_WINDOWS:
        recent = ret_1[-k:]
        total = recent.sum(axis=0)
        var = ((recent * recent).sum(axis=0) - total * total / k) / (k - 1)
        f[f"rv_{k}"] = np.sqrt(np.maximum(var, 0.0))

    k = spec.TAKER_RATIO_MA_WINDOW
    f["taker_buy_ratio_ma_10"] = window[_TAKER_RATIO, -k:].sum(axis=0) / k

    k = spec.VOLUME_Z_WINDOW
    volume = window[_VOLUME, -k:]
    v_mean = volume.sum(axis=0) / k
    spread = volume - v_mean
    v_std = np.sqrt((spread * spread).sum(axis=0) / (k - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        f["volume_z_60"] = np.where(
            v_std <= DISPERSION_EPS * np.abs(v_mean), 0.0, spread[-1] / v_std
        )
    return f
