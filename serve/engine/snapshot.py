"""The engine's state as the API reads it, and the serving rules that read it.

`EngineSnapshot` is what the engine hands the ingress: frozen values only, picklable, because it
crosses a Ray Serve handle from the engine deployment to every ingress replica (and is held by the
plain-uvicorn backend in-process). The rules every reader shares live here as its methods, so the
engine and the API cannot disagree: when a symbol's features are stale (`staleness`), when there
is no model to serve (`require_model`), and what `/signal` answers (`signal`).

This module imports nothing heavier than the config schema: the API process depends on it
without loading the model or feature code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Literal, TypeVar

from pydantic import JsonValue

from configs.schema import BacktestConfig

# Why no model is served when the registry gave no load error: nothing is promoted yet.
NO_MODEL_DETAIL = "no production model"

T = TypeVar("T")

SignalName = Literal["BUY", "SELL", "NEUTRAL"]


@dataclass(frozen=True)
class SnapshotUnchanged:
    """The engine's answer to a reader whose snapshot is still current: nothing changed since,
    as checked at `checked_at` (epoch seconds, engine clock)."""

    checked_at: float


class UnknownSymbolError(KeyError):
    """A symbol the feed does not serve."""


class NoModelError(RuntimeError):
    """No production model is loaded. `load_error` is why the last load failed; None when
    nothing was promoted yet (the message then says so)."""

    def __init__(self, load_error: str | None) -> None:
        super().__init__(load_error or NO_MODEL_DETAIL)
        self.load_error = load_error


class SignalPendingError(RuntimeError):
    """A model is loaded but the symbol has no signal yet (too few bars held)."""


class InvalidBarsError(ValueError):
    """Client-supplied bars the engine cannot use (for example too few for the model's window).

    Its message is written for the client and is returned verbatim as the 422 detail: it names
    only the request's own facts, never a server path or an exception from deeper down."""


class PredictBusyError(RuntimeError):
    """Every `/predict` worker is busy and the queue before them is full: the request is refused
    at once (503 with Retry-After) rather than queued without bound."""

    def __init__(self, retry_after_s: float = 1.0) -> None:
        super().__init__("every prediction worker is busy; retry later")
        self.retry_after_s = retry_after_s


def require_loaded(model: T | None, load_error: str | None) -> T:
    """`model`, or NoModelError with `load_error` as its reason when none is loaded."""
    if model is None:
        raise NoModelError(load_error)
    return model


@dataclass(frozen=True)
class Signal:
    """A served signal for the bar that closed at `as_of` (its open time + 1 minute).

    `predicted_return` is the model's 10-minute log return; `predicted_close` applies it to the
    decision bar's close. `confidence` is the probability the model gives its more likely
    direction, max(p_up, 1 - p_up), in [0.5, 1]; 0 when there is no opinion (stale data, gaps).
    `bar_open_time_ms` is epoch milliseconds (UTC).
    """

    symbol: str
    signal: SignalName
    confidence: float
    p_up: float | None
    predicted_return: float | None
    predicted_close: float | None
    horizon_minutes: int
    as_of: str
    bar_open_time_ms: int
    close: float
    model_version: str
    feature_spec_hash: str
    reason: str | None

    def with_reason(self, signal: SignalName, confidence: float, reason: str) -> Signal:
        """The same bar with an overriding decision (for example NEUTRAL on stale data)."""
        return replace(self, signal=signal, confidence=confidence, reason=reason)


@dataclass(frozen=True)
class ModelInfo:
    """The serving model's registry facts, as `/models/current` shows them.

    `metrics`, the ranges and `gate` are the registry metadata as registered (JSON; None when
    absent). `loaded_at_ms` is when this service loaded it, epoch milliseconds;
    `horizon_minutes` is how far ahead its signals look (the label horizon it was trained for).
    """

    version: str
    family: str
    window_bars: int
    horizon_minutes: int
    feature_spec_hash: str | None
    metrics: dict[str, JsonValue]
    training_data_range: JsonValue
    evaluated_range: JsonValue
    gate: JsonValue
    thresholds: BacktestConfig
    loaded_at_ms: int


@dataclass(frozen=True)
class SymbolState:
    """One served symbol at snapshot time. `staleness_s`: seconds since its newest bar became
    available (infinity when none is held); `signal`: None until the first one is computed;
    `feed_error`: the error of its latest feed poll, None when that poll succeeded."""

    symbol: str
    staleness_s: float
    signal: Signal | None
    feed_error: str | None


@dataclass(frozen=True)
class SignalCount:
    """Signals recorded for one symbol and class since the Gold store began."""

    symbol: str
    signal: str
    count: int


@dataclass(frozen=True)
class ConfidenceHistogram:
    """Confidence of recorded signals: `counts[i]` signals at most `buckets[i]` (and above
    `buckets[i - 1]`), `sum` of all of them. Not cumulative."""

    buckets: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float


@dataclass(frozen=True)
class OutcomeSummary:
    """Realised outcomes of one symbol's served signals: `signals` served, `filled` (outcome
    known), `directional` (filled BUY/SELL), `hits` among those, `hit_rate` (hits / directional;
    None when there is none), `pnl_bps` (cumulative per-signal P&L, basis points, gross of fees;
    0.0 when nothing is filled)."""

    symbol: str
    signals: int
    filled: int
    directional: int
    hits: int
    hit_rate: float | None
    pnl_bps: float


@dataclass(frozen=True)
class EngineSnapshot:
    """Everything the API serves from memory, taken at `taken_at` (epoch seconds, engine clock).

    `stale_after_s`: seconds without a new bar after which a symbol's features are stale.
    `sequence` identifies the engine state it was built from (a new one for every change);
    `reloads` counts production models loaded.
    """

    sequence: int
    taken_at: float
    stale_after_s: float
    symbols: tuple[SymbolState, ...]
    model: ModelInfo | None
    load_error: str | None
    reloads: int
    signal_counts: tuple[SignalCount, ...]
    confidence: ConfidenceHistogram
    outcomes: tuple[OutcomeSummary, ...]

    @property
    def symbol_names(self) -> tuple[str, ...]:
        return tuple(state.symbol for state in self.symbols)

    @cached_property
    def _by_symbol(self) -> dict[str, SymbolState]:
        # Built on first use in each process (a cached_property writes the instance's __dict__,
        # which a frozen dataclass allows): `/signal` and `/readyz` look symbols up by name in
        # snapshots of thousands of symbols.
        return {state.symbol: state for state in self.symbols}

    def state(self, symbol: str) -> SymbolState:
        """`symbol`'s state; UnknownSymbolError when the feed does not serve it."""
        try:
            return self._by_symbol[symbol]
        except KeyError:
            raise UnknownSymbolError(symbol) from None

    def restated(self, taken_at: float) -> EngineSnapshot:
        """The same state as known at `taken_at` (epoch seconds, not before this `taken_at`):
        every symbol's staleness grown by the time between."""
        if taken_at == self.taken_at:
            return self
        grown = taken_at - self.taken_at
        return replace(
            self,
            taken_at=taken_at,
            symbols=tuple(
                SymbolState(s.symbol, s.staleness_s + grown, s.signal, s.feed_error)
                for s in self.symbols
            ),
        )

    def staleness(self, symbol: str, now: float) -> tuple[float, bool]:
        """Seconds since `symbol`'s newest bar as of `now` (epoch seconds) and whether that is
        stale. The snapshot's own age counts, so a stalled engine reads as stale too."""
        staleness = self.state(symbol).staleness_s + max(0.0, now - self.taken_at)
        return staleness, staleness > self.stale_after_s

    def require_model(self) -> ModelInfo:
        """The serving model; NoModelError when none is loaded."""
        return require_loaded(self.model, self.load_error)

    def signal(self, symbol: str, now: float) -> Signal:
        """The signal to serve for `symbol` at `now` (epoch seconds): the current one, or NEUTRAL
        with the reason when its features are stale. Raises UnknownSymbolError, NoModelError, or
        SignalPendingError before the symbol's first signal."""
        state = self.state(symbol)
        self.require_model()
        if state.signal is None:
            raise SignalPendingError(f"no signal for {symbol} yet: waiting for bars")
        staleness, stale = self.staleness(symbol, now)
        if stale:
            return state.signal.with_reason(
                "NEUTRAL", 0.0, f"stale features: no new bar for {staleness:.0f} s"
            )
        return state.signal


def unavailable_symbols(symbols: Sequence[str], reason: str) -> tuple[SymbolState, ...]:
    """States for symbols whose engine shard has not reported a snapshot: no signal yet
    (`/signal` answers 503 not_ready), never fresh (infinite staleness), `reason` as the error."""
    return tuple(SymbolState(symbol, math.inf, None, reason) for symbol in symbols)


def merge_snapshots(
    parts: Sequence[EngineSnapshot],
    *,
    symbol_order: Sequence[str] = (),
    unavailable: Sequence[SymbolState] = (),
) -> EngineSnapshot:
    """One snapshot of several engine shards, each owning its own symbols.

    The merged snapshot is taken at the newest part's `taken_at`; every symbol's staleness is
    restated to that instant (a part taken 3 s earlier adds 3 s to its symbols' staleness), so a
    shard that stopped reporting turns only its own symbols stale. The serving model is the most
    recently loaded one across parts (during a promotion shards swap within a registry poll of
    each other; each signal names the version that computed it), and None, with the first load
    error, while any part has none. `reloads` is the largest part's; `sequence` the sum of the
    parts' (it grows whenever any shard advances); counts, histograms and outcomes are summed or
    concatenated (shards own disjoint symbols). Symbols, counts and outcomes follow
    `symbol_order`, then the rest by name. `unavailable` adds the states of symbols whose shard
    has reported nothing. Raises ValueError without parts.
    """
    if not parts:
        raise ValueError("merging needs at least one snapshot")
    if len(parts) == 1 and not unavailable and not symbol_order:
        return parts[0]
    taken_at = max(part.taken_at for part in parts)
    rank = {symbol: index for index, symbol in enumerate(symbol_order)}

    def order(symbol: str) -> tuple[int, str]:
        return rank.get(symbol, len(rank)), symbol

    states = [state for part in parts for state in part.restated(taken_at).symbols]
    states.extend(unavailable)
    models = [part.model for part in parts]
    model = (
        None
        if any(m is None for m in models)
        else max((m for m in models if m is not None), key=lambda m: m.loaded_at_ms)
    )
    load_errors = [part.load_error for part in parts if part.load_error is not None]
    buckets = parts[0].confidence.buckets
    if any(part.confidence.buckets != buckets for part in parts):
        raise ValueError("snapshots with different confidence buckets cannot be merged")
    counts = [sum(c) for c in zip(*(part.confidence.counts for part in parts), strict=True)]
    return EngineSnapshot(
        sequence=sum(part.sequence for part in parts),
        taken_at=taken_at,
        stale_after_s=parts[0].stale_after_s,
        symbols=tuple(sorted(states, key=lambda s: order(s.symbol))),
        model=model,
        load_error=load_errors[0] if load_errors else None,
        reloads=max(part.reloads for part in parts),
        signal_counts=tuple(
            sorted(
                (count for part in parts for count in part.signal_counts),
                key=lambda c: (order(c.symbol), c.signal),
            )
        ),
        confidence=ConfidenceHistogram(
            buckets=buckets,
            counts=tuple(counts),
            sum=sum(part.confidence.sum for part in parts),
        ),
        outcomes=tuple(
            sorted(
                (outcome for part in parts for outcome in part.outcomes),
                key=lambda o: order(o.symbol),
            )
        ),
    )
