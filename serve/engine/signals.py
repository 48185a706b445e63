"""Signals: features -> model inputs -> the model -> a decision.

`compute_signal` answers for one symbol from its bars (the batch engine recomputes the
features: `/predict`); `compute_signals` answers for many symbols at once from the incremental
engine's windows, with one forward pass (the live engine at each bar close).

The decision rule is the backtest's (`models.backtest.decide_signals`), with the thresholds the
model was selected with, so a served BUY means exactly what a BUY meant in the walk-forward
evaluation that justified promoting the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import polars as pl

from configs.schema import BacktestConfig
from market.bar_columns import BarColumns
from market.features.incremental import FEATURE_INDEX, FeatureWindows
from market.features.polars_engine import segment_features
from market.klines import ONE_MINUTE_MS
from models.artifact import LoadedModel
from models.backtest import decide_signals
from models.dataset import INPUT_COLUMNS, model_inputs
from serve.engine.online_features import latest_features
from serve.engine.snapshot import Signal, SignalName

SIGNAL_NAMES: dict[int, SignalName] = {1: "BUY", -1: "SELL", 0: "NEUTRAL"}


def bar_close_iso(open_time_ms: int) -> str:
    """ISO-8601 UTC time at which the 1-minute bar opening at `open_time_ms` closed."""
    closed = datetime.fromtimestamp((open_time_ms + ONE_MINUTE_MS) / 1000, tz=UTC)
    return closed.isoformat().replace("+00:00", "Z")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _neutral(
    symbol: str,
    open_time_ms: int,
    close: float,
    model_version: str,
    feature_spec_hash: str,
    horizon_bars: int,
) -> Signal:
    """The NEUTRAL, no-opinion signal of the bar opening at `open_time_ms` for a model whose
    targets look `horizon_bars` bars (minutes) ahead; callers set the decision or the reason."""
    return Signal(
        symbol=symbol,
        signal="NEUTRAL",
        confidence=0.0,
        p_up=None,
        predicted_return=None,
        predicted_close=None,
        horizon_minutes=horizon_bars,
        as_of=bar_close_iso(open_time_ms),
        bar_open_time_ms=open_time_ms,
        close=close,
        model_version=model_version,
        feature_spec_hash=feature_spec_hash,
        reason=None,
    )


def _decided(base: Signal, predicted: float, p_up: float, decision: int) -> Signal:
    """`base` with the model's opinion (finite `p_up`) and the decision rule's answer."""
    return replace(
        base,
        signal=SIGNAL_NAMES[decision],
        confidence=max(p_up, 1.0 - p_up),
        p_up=p_up,
        predicted_return=_finite(predicted),
        predicted_close=_finite(base.close * math.exp(predicted)),
        reason=None if decision else "edge below the cost threshold",
    )


NOT_WARM_REASON = "features not warm yet (non-finite inputs)"


def _gap_reason(window: int) -> str:
    return f"a gap in the last {window} bars"


def compute_signal(
    symbol: str,
    bars: pl.DataFrame | BarColumns,
    model: LoadedModel,
    thresholds: BacktestConfig,
    model_version: str,
    feature_spec_hash: str,
) -> Signal:
    """The signal for the newest bar of `bars` (validated 1-minute bars of one symbol, sorted:
    a frame of market.klines.BAR_COLUMNS or the bar columns alone).

    The window is the model's last `window_bars` bars; they must be consecutive minutes with
    every input finite, otherwise the answer is NEUTRAL with the reason. Bar columns that form
    one segment (what `/predict` passes) have their features computed from their arrays
    (`segment_features`: the batch engine's values, bit for bit, without a frame); a frame, or
    columns with a missing minute, go through the batch engine's frame.
    Raises ValueError when `bars` is empty.
    """
    window = model.spec.window_bars
    if isinstance(bars, BarColumns) and len(bars) and bars.one_segment():
        features = segment_features(bars)
        open_times = bars.open_time[-window:]
        close = bars.close[-window:]
        columns = {name: features[name][-window:] for name in INPUT_COLUMNS}
    else:
        frame = bars.frame(symbol) if isinstance(bars, BarColumns) else bars
        if frame.height == 0:
            raise ValueError(f"no bars for {symbol}")
        tail = latest_features(frame).tail(window)
        open_times = tail["open_time"].cast(pl.Int64).to_numpy()
        close = tail["close"].cast(pl.Float64).to_numpy()
        # One select for every input column (one polars call, not one per column): [bars, inputs].
        inputs = pl.col(INPUT_COLUMNS).cast(pl.Float64).fill_null(float("nan"))
        matrix = tail.select(inputs).to_numpy()
        columns = {name: matrix[:, j] for j, name in enumerate(INPUT_COLUMNS)}
    return _window_signal(
        symbol, open_times, close, columns, model, thresholds, model_version, feature_spec_hash
    )


def _window_signal(
    symbol: str,
    open_times: np.ndarray,
    close: np.ndarray,
    columns: dict[str, np.ndarray],
    model: LoadedModel,
    thresholds: BacktestConfig,
    model_version: str,
    feature_spec_hash: str,
) -> Signal:
    """`compute_signal` from the last (at most `window_bars`) bars: their open times (epoch
    ms), closes and input feature columns (NaN where null)."""
    window = model.spec.window_bars
    base = _neutral(
        symbol,
        int(open_times[-1]),
        float(close[-1]),
        model_version,
        feature_spec_hash,
        model.spec.horizon_bars,
    )
    if open_times.shape[0] < window:
        return base.with_reason(
            "NEUTRAL", 0.0, f"only {open_times.shape[0]} bars held; the model reads {window}"
        )
    if np.any(np.diff(open_times) != ONE_MINUTE_MS):
        return base.with_reason("NEUTRAL", 0.0, _gap_reason(window))
    inputs = model_inputs(columns, close)
    predicted, p_up = model.predict_windows(inputs[None, :, :])
    if not (math.isfinite(predicted[0]) and math.isfinite(p_up[0])):
        return base.with_reason("NEUTRAL", 0.0, NOT_WARM_REASON)
    decision = int(decide_signals(p_up, predicted, thresholds)[0])
    return _decided(base, float(predicted[0]), float(p_up[0]), decision)


def compute_signals(
    symbols: Sequence[str],
    windows: FeatureWindows,
    segment_bars: np.ndarray,
    close: np.ndarray,
    model: LoadedModel,
    thresholds: BacktestConfig,
    model_version: str,
    feature_spec_hash: str,
) -> list[Signal]:
    """The signals of the newest bars of several symbols, from the incremental engine's state,
    with one forward pass of `model` over every ready window.

    `windows`: the symbols' last `model.spec.window_bars` feature rows
    (market.features.incremental.IncrementalFeatures.windows, in `symbols` order);
    `segment_bars`: bars each symbol has taken in its current segment; `close`: the close of
    each symbol's newest bar. Gives what `compute_signal` gives on the symbol's held bars when
    they cover at least `min_history_bars(window_bars)` minutes (the caller's check): a window
    that reaches back past the start of its segment is NEUTRAL for the gap, one within the
    segment's warm-up or with a non-finite input is NEUTRAL for warming up. Features equal the
    batch engine's within ONLINE_RELATIVE_TOLERANCE (the recursive ones are seeded where the
    incremental state's segment starts, not at the oldest bar held).
    """
    window = model.spec.window_bars
    if windows.values.shape[:2] != (len(symbols), window):
        raise ValueError(
            f"windows of shape {windows.values.shape[:2]} for {len(symbols)} symbols and a "
            f"{window}-bar model"
        )
    ready = np.flatnonzero(windows.ready)
    predicted = np.full(len(symbols), np.nan)
    p_up = np.full(len(symbols), np.nan)
    if ready.size:
        values = windows.values[ready]
        columns = {name: values[..., FEATURE_INDEX[name]] for name in INPUT_COLUMNS}
        predicted[ready], p_up[ready] = model.predict_windows(
            model_inputs(columns, windows.close[ready])
        )
    finite = np.isfinite(predicted) & np.isfinite(p_up)
    decisions = np.zeros(len(symbols), dtype=np.int64)
    if finite.any():
        decisions[finite] = decide_signals(p_up[finite], predicted[finite], thresholds)
    signals = []
    for i, symbol in enumerate(symbols):
        base = _neutral(
            symbol,
            int(windows.open_time_ms[i]),
            float(close[i]),
            model_version,
            feature_spec_hash,
            model.spec.horizon_bars,
        )
        if finite[i]:
            signals.append(_decided(base, float(predicted[i]), float(p_up[i]), int(decisions[i])))
        elif segment_bars[i] < window:
            signals.append(base.with_reason("NEUTRAL", 0.0, _gap_reason(window)))
        else:
            signals.append(base.with_reason("NEUTRAL", 0.0, NOT_WARM_REASON))
    return signals
