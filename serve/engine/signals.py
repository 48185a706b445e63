"""One signal from the latest bars: online features -> model inputs -> the model -> a decision.

The decision rule is the backtest's (`models.backtest.decide_signals`), with the thresholds the
model was selected with, so a served BUY means exactly what a BUY meant in the walk-forward
evaluation that justified promoting the model.
"""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl

from configs.schema import BacktestConfig
from market.features.spec import HORIZON_BARS
from market.klines import BAR_COLUMNS, ONE_MINUTE_MS
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


def compute_signal(
    symbol: str,
    bars: pl.DataFrame,
    model: LoadedModel,
    thresholds: BacktestConfig,
    model_version: str,
    feature_spec_hash: str,
) -> Signal:
    """The signal for the newest bar of `bars` (validated 1-minute bars of one symbol, sorted).

    The window is the model's last `window_bars` bars; they must be consecutive minutes with
    every input finite, otherwise the answer is NEUTRAL with the reason.
    Raises ValueError when `bars` is empty.
    """
    if bars.height == 0:
        raise ValueError(f"no bars for {symbol}")
    features = latest_features(bars)
    window = model.spec.window_bars
    tail = features.tail(window)
    open_times = tail["open_time"].cast(pl.Int64).to_numpy()
    last_open = int(open_times[-1])
    close = float(tail["close"][-1])
    base = Signal(
        symbol=symbol,
        signal="NEUTRAL",
        confidence=0.0,
        p_up=None,
        predicted_return=None,
        predicted_close=None,
        horizon_minutes=HORIZON_BARS,
        as_of=bar_close_iso(last_open),
        bar_open_time_ms=last_open,
        close=close,
        model_version=model_version,
        feature_spec_hash=feature_spec_hash,
        reason=None,
    )
    if tail.height < window:
        return base.with_reason(
            "NEUTRAL", 0.0, f"only {tail.height} bars held; the model reads {window}"
        )
    if np.any(np.diff(open_times) != ONE_MINUTE_MS):
        return base.with_reason("NEUTRAL", 0.0, f"a gap in the last {window} bars")
    columns = {
        name: tail[name].cast(pl.Float64).fill_null(float("nan")).to_numpy()
        for name in INPUT_COLUMNS
    }
    inputs = model_inputs(columns, tail["close"].cast(pl.Float64).to_numpy())
    predicted, p_up = model.predict_windows(inputs[None, :, :])
    if not (math.isfinite(predicted[0]) and math.isfinite(p_up[0])):
        return base.with_reason("NEUTRAL", 0.0, "features not warm yet (non-finite inputs)")
    decision = int(decide_signals(p_up, predicted, thresholds)[0])
    probability = float(p_up[0])
    ret = float(predicted[0])
    return replace(
        base,
        signal=SIGNAL_NAMES[decision],
        confidence=max(probability, 1.0 - probability),
        p_up=probability,
        predicted_return=_finite(ret),
        predicted_close=_finite(close * math.exp(ret)),
        reason=None if decision else "edge below the cost threshold",
    )


def bars_frame(symbol: str, bars: list[dict[str, Any]]) -> pl.DataFrame:
    """Client-supplied bars (dicts of the validated-bar fields) as the frame features read."""
    frame = pl.DataFrame(bars).with_columns(pl.lit(symbol).alias("symbol"))
    return frame.select(BAR_COLUMNS).with_columns(
        pl.col("open_time").cast(pl.Int64), pl.col("trades").cast(pl.Int64)
    )
