"""The signal engine's batched path: incremental features and one model forward pass per tick
give the signals of the per-symbol path (batch engine over the held bars, one model call per
symbol), on simulator data with gaps, backfills and a symbol that joins late; hot swaps keep
or rebuild the feature state. No Ray; a fake clock."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from market.sim_silver import simulated_bars
from models.registry import ModelRegistry
from serve.engine.engine import SignalEngine
from serve.engine.feed import BarFeed
from serve.engine.online_features import min_history_bars
from serve.engine.signals import compute_signal
from serve.engine.snapshot import Signal
from tests.serve_support import MODEL_NAME, register_model
from tests.unit.test_serve_engine import FakeClock, config_for

SYMBOLS = ["SIMAAA", "SIMBBB", "SIMCCC", "SIMLATE"]
LATE = "SIMLATE"
GAPPY = "SIMCCC"
# Probability, confidence and predicted return of the two paths agree within this (absolute;
# they lie in [0, 1] and are ~1e-3 for the return). The features differ by at most
# ONLINE_RELATIVE_TOLERANCE (1e-6, recursive features seeded at different bars) before the
# model's float32 inputs; measured differences here are below 3e-8.
TOLERANCE = 1e-6


class ScriptedFeed(BarFeed):
    """A simulator replay with two scripted events: GAPPY's source lacks three minutes in the
    middle of the run (an outage), and LATE releases nothing until `joins_at` (clock seconds),
    then every bar due at once (a symbol whose first bars arrive as one backfill)."""

    joins_at = math.inf

    def _replay_sources(self) -> list[pl.DataFrame]:
        sources = super()._replay_sources()
        gappy = self.symbols.index(GAPPY)
        first_missing = self.config.history_bars + 8
        source = sources[gappy]
        sources[gappy] = pl.concat([source.head(first_missing), source.slice(first_missing + 3)])
        return sources

    def _replay_due_counts(self, now_s: float) -> np.ndarray:
        due = super()._replay_due_counts(now_s)
        if now_s < self.joins_at:
            due[self.symbols.index(LATE)] = 0
        return due


def make_engine(tmp_path: Path, clock: FakeClock) -> SignalEngine:
    """An engine over SYMBOLS on a ScriptedFeed in which LATE joins 12 s (bars) in."""
    config = config_for(tmp_path, symbols=SYMBOLS, history_bars=280)
    feed = ScriptedFeed(config.feed, clock=clock)
    feed.joins_at = clock.now + 12.0
    return SignalEngine(config, feed=feed, clock=clock)


def per_symbol_signal(engine: SignalEngine, symbol: str) -> Signal | None:
    """What the per-symbol path serves: the batch engine over the held bars, one model call."""
    serving = engine.serving
    assert serving is not None
    bars = engine.feed.bars(symbol)
    if bars.height < min_history_bars(serving.model.spec.window_bars):
        return None
    return compute_signal(
        symbol, bars, serving.model, serving.thresholds, serving.version, engine.model.spec_hash
    )


def assert_same(actual: Signal | None, expected: Signal) -> None:
    assert actual is not None
    exact = ("symbol", "signal", "bar_open_time_ms", "close", "as_of", "reason", "model_version")
    assert {k: getattr(actual, k) for k in exact} == {k: getattr(expected, k) for k in exact}
    for name in ("p_up", "confidence", "predicted_return"):
        a, e = getattr(actual, name), getattr(expected, name)
        assert (a is None) == (e is None), name
        if e is not None:
            assert abs(a - e) <= TOLERANCE, (name, a, e)


def forward_counter(engine: SignalEngine) -> list[int]:
    """Wrap the serving network's forward; the list collects each call's batch size."""
    assert engine.serving is not None
    net = engine.serving.model.net
    forward = net.forward
    calls: list[int] = []

    def counted(x: torch.Tensor) -> Any:
        calls.append(int(x.shape[0]))
        return forward(x)

    net.forward = counted  # type: ignore[method-assign]
    return calls


def test_batched_signals_equal_the_per_symbol_path_with_gaps_backfills_and_a_late_symbol(
    tmp_path: Path,
) -> None:
    register_model(tmp_path / "registry", seed=1)
    clock = FakeClock()
    engine = make_engine(tmp_path, clock)
    assert engine.refresh_model()
    reasons: dict[str | None, int] = {}
    compared = 0
    late_joined = False
    for step in range(16):
        clock.now += 1.0 + step % 3  # 1-3 new bars per symbol and tick: small backfills
        new_bars = engine.tick()
        late_joined |= new_bars[LATE] > 100
        for symbol, count in new_bars.items():
            if count == 0:
                continue
            expected = per_symbol_signal(engine, symbol)
            if expected is None:
                assert symbol not in engine.signals
                continue
            assert_same(engine.signals.get(symbol), expected)
            reasons[expected.reason] = reasons.get(expected.reason, 0) + 1
            compared += 1
    assert late_joined
    # The run covers model opinions, gaps inside the window and the warm-up after a gap.
    assert reasons.get(None, 0) + reasons.get("edge below the cost threshold", 0) > 20
    assert reasons.get("a gap in the last 16 bars", 0) > 0, reasons
    assert reasons.get("features not warm yet (non-finite inputs)", 0) > 0, reasons
    assert compared > 45


def test_one_tick_runs_the_model_once_over_every_symbol_whose_bar_closed(tmp_path: Path) -> None:
    register_model(tmp_path / "registry", seed=1)
    clock = FakeClock()
    config = config_for(tmp_path, symbols=SYMBOLS[:3], history_bars=280)
    engine = SignalEngine(config, clock=clock)
    assert engine.refresh_model()
    engine.tick()
    calls = forward_counter(engine)
    for _ in range(3):
        clock.now += 1.0
        engine.tick()
    assert calls == [3, 3, 3]
    clock.now += 3.0  # three bars per symbol: advanced bar by bar, still one forward pass
    assert engine.tick() == dict.fromkeys(SYMBOLS[:3], 3)
    assert calls == [3, 3, 3, 3]
    for symbol in SYMBOLS[:3]:
        expected = per_symbol_signal(engine, symbol)
        assert expected is not None and expected.p_up is not None
        assert_same(engine.signals[symbol], expected)


@pytest.mark.parametrize("window_bars", [16, 32])
def test_hot_swap_keeps_or_rebuilds_the_feature_state(tmp_path: Path, window_bars: int) -> None:
    registry_dir = tmp_path / "registry"
    register_model(registry_dir, seed=1)
    clock = FakeClock()
    config = config_for(tmp_path, symbols=SYMBOLS[:2], history_bars=300)
    engine = SignalEngine(config, clock=clock)
    assert engine.refresh_model()
    for _ in range(3):
        clock.now += 1.0
        engine.tick()
    state = engine._features
    version = register_model(registry_dir, seed=2, window_bars=window_bars, promote=False)
    ModelRegistry(str(registry_dir)).set_alias(MODEL_NAME, "production", version, reason="swap")
    assert engine.refresh_model()
    assert engine._features is not None
    assert engine._features.window_rows == window_bars
    assert (engine._features is state) == (window_bars == 16)
    for _ in range(2):  # the first signal of the new model, and the next bar's
        for symbol in SYMBOLS[:2]:
            expected = per_symbol_signal(engine, symbol)
            assert expected is not None and expected.p_up is not None
            assert expected.model_version == version
            assert_same(engine.signals[symbol], expected)
        clock.now += 1.0
        engine.tick()


def test_a_late_minute_filling_a_hole_rebuilds_the_state(tmp_path: Path) -> None:
    register_model(tmp_path / "registry", seed=1)
    clock = FakeClock()
    engine = make_engine(tmp_path, clock)
    assert engine.refresh_model()
    for _ in range(12):  # past GAPPY's three missing minutes
        clock.now += 1.0
        engine.tick()
    assert engine.signals[GAPPY].p_up is None  # no opinion over the gap
    # The missing minutes come late, inside the held window: the feed counts them as new.
    feed = engine.feed
    assert isinstance(feed, ScriptedFeed)
    source = simulated_bars(feed.config.sim, [GAPPY], feed.config.sim_days)
    # A replay cannot take a late minute: hold the windows as a live (binance) feed does.
    for symbol in feed.symbols:
        feed._states[symbol].bars = feed.bars(symbol)
    feed._replay = None
    state = feed._states[GAPPY]
    late = source.filter(~pl.col("open_time").is_in(state.bars["open_time"].implode()))
    held = state.bars["open_time"]
    late = late.filter(pl.col("open_time").is_between(held.min(), held.max()))
    assert late.height == 3
    with feed._lock:
        assert feed._merge(state, late) == 3
    engine._take_new_bars([GAPPY], {GAPPY: 3}, feed.newest_bars([GAPPY], [3]))
    engine._update_signals([GAPPY])
    expected = per_symbol_signal(engine, GAPPY)
    assert expected is not None and expected.p_up is not None
    assert_same(engine.signals[GAPPY], expected)
