"""The engine snapshot: frozen, picklable (it crosses a Serve handle), and the serving rules on it
(staleness, no model, the signal to serve). No engine, no Ray: snapshots built by hand."""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import replace

import pytest

from configs.schema import BacktestConfig
from serve.engine.snapshot import (
    NO_MODEL_DETAIL,
    ConfidenceHistogram,
    EngineSnapshot,
    ModelInfo,
    NoModelError,
    OutcomeSummary,
    Signal,
    SignalCount,
    SignalPendingError,
    SymbolState,
    UnknownSymbolError,
)

TAKEN_AT = 1_800_000_000.0

SIGNAL = Signal(
    symbol="SIMAAA",
    signal="BUY",
    confidence=0.62,
    p_up=0.62,
    predicted_return=0.0004,
    predicted_close=101.04,
    horizon_minutes=10,
    as_of="2024-03-01T05:12:00Z",
    bar_open_time_ms=1_709_269_860_000,
    close=101.0,
    model_version="v0001",
    feature_spec_hash="abc",
    reason=None,
)

MODEL = ModelInfo(
    version="v0001",
    family="gru",
    window_bars=16,
    horizon_minutes=10,
    feature_spec_hash="abc",
    metrics={"score": 0.01, "folds": [1, 2]},
    training_data_range={"start_ms": 1, "end_ms": 2},
    evaluated_range=None,
    gate={"promoted": True, "reasons": []},
    thresholds=BacktestConfig(p_up_threshold=0.6),
    loaded_at_ms=1_800_000_000_000,
)


def snapshot(
    *, model: ModelInfo | None = MODEL, staleness_s: float = 5.0, signal: Signal | None = SIGNAL
) -> EngineSnapshot:
    return EngineSnapshot(
        sequence=3,
        taken_at=TAKEN_AT,
        stale_after_s=30.0,
        symbols=(
            SymbolState("SIMAAA", staleness_s=staleness_s, signal=signal, feed_error=None),
            SymbolState("SIMBBB", staleness_s=float("inf"), signal=None, feed_error="timeout"),
        ),
        model=model,
        load_error=None,
        reloads=1,
        signal_counts=(SignalCount("SIMAAA", "BUY", 4),),
        confidence=ConfidenceHistogram(buckets=(0.5, 1.0), counts=(0, 4), sum=2.4),
        outcomes=(OutcomeSummary("SIMAAA", 4, 2, 2, 1, hit_rate=0.5, pnl_bps=3.0),),
    )


def test_snapshot_is_frozen_all_the_way_down() -> None:
    snap = snapshot()
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.reloads = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.symbols[0].staleness_s = 0.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        SIGNAL.signal = "SELL"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        MODEL.version = "v2"  # type: ignore[misc]
    assert isinstance(snap.symbols, tuple) and isinstance(snap.outcomes, tuple)


def test_snapshot_pickles_and_round_trips() -> None:
    snap = snapshot()
    copy = pickle.loads(pickle.dumps(snap))
    assert copy == snap and copy is not snap
    assert copy.model is not None and copy.model.thresholds == MODEL.thresholds
    assert copy.signal("SIMAAA", TAKEN_AT) == SIGNAL


def test_staleness_counts_the_snapshot_age() -> None:
    snap = snapshot(staleness_s=5.0)
    assert snap.staleness("SIMAAA", TAKEN_AT) == (5.0, False)
    # An engine that stopped reporting: the snapshot ages, its symbols go stale with it.
    assert snap.staleness("SIMAAA", TAKEN_AT + 25.0) == (30.0, False)
    assert snap.staleness("SIMAAA", TAKEN_AT + 26.0) == (31.0, True)
    # A clock behind the engine's never makes data fresher than the snapshot said.
    assert snap.staleness("SIMAAA", TAKEN_AT - 10.0) == (5.0, False)
    assert snap.staleness("SIMBBB", TAKEN_AT)[1]  # no bar held at all
    with pytest.raises(UnknownSymbolError):
        snap.staleness("NOPE", TAKEN_AT)


def test_signal_turns_neutral_on_stale_features() -> None:
    snap = snapshot(staleness_s=5.0)
    assert snap.signal("SIMAAA", TAKEN_AT + 1.0) is SIGNAL
    stale = snap.signal("SIMAAA", TAKEN_AT + 40.0)
    assert stale == replace(
        SIGNAL, signal="NEUTRAL", confidence=0.0, reason="stale features: no new bar for 45 s"
    )


def test_no_model_and_pending_signal() -> None:
    with pytest.raises(NoModelError, match=NO_MODEL_DETAIL) as caught:
        snapshot(model=None).require_model()
    assert caught.value.load_error is None
    failed = replace(snapshot(model=None), load_error="loading signal v2 failed: boom")
    with pytest.raises(NoModelError, match="boom"):
        failed.signal("SIMAAA", TAKEN_AT)
    assert snapshot().require_model() is MODEL
    with pytest.raises(SignalPendingError, match="waiting for bars"):
        snapshot(signal=None).signal("SIMAAA", TAKEN_AT)
    with pytest.raises(UnknownSymbolError):
        snapshot().signal("NOPE", TAKEN_AT)
    assert snapshot().symbol_names == ("SIMAAA", "SIMBBB")
