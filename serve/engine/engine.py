"""The signal engine: live bars + the production model + the Gold store, kept current.

Plain Python (the Serve model deployment drives it from a background loop; the plain-uvicorn
benchmark drives it from a thread), so it is testable without Ray. One signal is computed per
new closed bar per symbol and kept in memory until the next bar; every new signal goes to the
Gold store, and realised outcomes are filled in once bar t+10 is held.

Features are kept by the incremental engine (market.features.incremental): one state for the
feed's symbols, with a ring of the serving model's window, advanced by each new closed bar. A
tick advances it with every symbol's new bars (several per symbol after a backfill, one
bar-step across symbols at a time) and then runs the model once, over the windows of every
symbol that got a bar (serve.engine.signals.compute_signals). The state is built from the
feed's held bars when a model is first loaded and rebuilt when a new model reads a window of
another length, or when the feed reports a bar the state cannot take in order (a late minute
filling a hole, or a burst longer than the feed holds): rare events that cost one pass over
the held bars of every symbol.

When the registry's `production` alias moves (a promotion or a rollback), `refresh_model` loads
the new version beside the old one and swaps a single reference (`serve.engine.production`), so
a request in flight sees either the old model or the new one, never a half-loaded one; the
latest bar's signal is then recomputed with the new model.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

from configs.schema import ServeConfig
from market.bar_columns import BarColumns
from market.features.incremental import IncrementalFeatures
from serve.engine.feed import BarFeed
from serve.engine.gold import GoldStore, SignalRecord
from serve.engine.online_features import min_history_bars
from serve.engine.production import ProductionModel, ServingModel
from serve.engine.signals import compute_signals
from serve.engine.snapshot import (
    ConfidenceHistogram,
    EngineSnapshot,
    OutcomeSummary,
    Signal,
    SignalCount,
    SymbolState,
    UnknownSymbolError,
)

log = logging.getLogger(__name__)

# Upper bounds of the served-confidence histogram (confidence lies in [0.5, 1]).
CONFIDENCE_BUCKETS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
# The open time of the newest bar taken by a symbol that has taken none.
_NOTHING_TAKEN = np.iinfo(np.int64).min


class SignalEngine:
    """Keeps one signal per symbol current. Thread-safe: one lock around every mutation."""

    def __init__(
        self,
        config: ServeConfig,
        *,
        feed: BarFeed | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        self.feed = feed or BarFeed(config.feed, clock=clock)
        self.model = ProductionModel(config, clock)
        self.gold = GoldStore(config.gold.url)
        self.signals: dict[str, Signal] = {}
        self.signal_counts: Counter[tuple[str, str]] = Counter(
            self.gold.counts_by_signal(self.feed.symbols)
        )
        self.confidence_counts = [0] * len(CONFIDENCE_BUCKETS)
        self.confidence_sum = 0.0
        self.outcomes: tuple[OutcomeSummary, ...] = self.gold.outcome_summary(self.feed.symbols)
        # Rounds that changed bars, signals or the model; a snapshot is rebuilt only when this,
        # the load error, the reload count or a feed error changed since the last one built.
        self.sequence = 0
        self._snapshot_cache: tuple[tuple[object, ...], EngineSnapshot] | None = None
        # The built snapshots' own serial numbers start at the engine's start time in
        # microseconds, so that a restarted engine never repeats one of its predecessor's.
        self._snapshot_serial = time.time_ns() // 1000
        # The incremental feature state of the feed's symbols, with the serving model's window
        # (None before a model is served), and the open time (epoch ms) and close of the
        # newest bar each symbol has taken, by the state's symbol index.
        self._features: IncrementalFeatures | None = None
        self._taken_open_ms = np.full(len(self.feed.symbols), _NOTHING_TAKEN, dtype=np.int64)
        self._taken_close = np.full(len(self.feed.symbols), np.nan)
        self._lock = threading.RLock()

    # -- model ---------------------------------------------------------------------------

    @property
    def serving(self) -> ServingModel | None:
        return self.model.serving

    @property
    def load_error(self) -> str | None:
        return self.model.load_error

    @property
    def reloads(self) -> int:
        return self.model.reloads

    def refresh_model(self) -> bool:
        """Follow the production alias; True when a new version was swapped in (and every
        symbol's latest signal recomputed with it, under the same lock as the swap)."""
        serving = self.model.fetch()
        if serving is None:
            return False
        with self._lock:
            self.model.install(serving)
            window = serving.model.spec.window_bars
            if self._features is None or self._features.window_rows != window:
                self._rebuild_features(window)
            self._update_signals(self.feed.symbols)
            self.sequence += 1
        return True

    # -- bars ----------------------------------------------------------------------------

    def tick(self) -> dict[str, int]:
        """Poll the feed; compute, record and score signals of new bars. New bars per symbol."""
        new_bars = self.feed.poll()
        with self._lock:
            ticked = [symbol for symbol, count in new_bars.items() if count > 0]
            if ticked:
                # Every symbol's new bars in one read: O(new bars), not a window per symbol.
                newest = self.feed.newest_bars(ticked, [new_bars[s] for s in ticked])
                self._take_new_bars(ticked, new_bars, newest)
                self._update_signals(ticked)
                self._fill_outcomes(newest)
                self.outcomes = self.gold.outcome_summary(self.feed.symbols)
                self.sequence += 1
        return new_bars

    def _rebuild_features(self, window_bars: int) -> None:
        """A fresh incremental state reading `window_bars` rows, advanced over every held bar."""
        symbols = self.feed.symbols
        self._features = IncrementalFeatures(symbols, window_bars)
        self._taken_open_ms[:] = _NOTHING_TAKEN
        self._taken_close[:] = np.nan
        self._advance([self.feed.bars(symbol) for symbol in symbols])

    def _take_new_bars(
        self, symbols: list[str], counts: dict[str, int], newest: pl.DataFrame
    ) -> None:
        """Advance the state with the `counts[symbol]` newest held bars of each of `symbols`
        (`newest`: those bars, as `BarFeed.newest_bars` gives them).

        The feed counts a late minute (older than the newest bar held) and bars a burst pushed
        out of its window as new too: the state cannot take those in order, so when a symbol's
        newest `count` bars are not all newer than the last it took, the state is rebuilt from
        the held bars (the same features the batch engine would compute over them)."""
        features = self._features
        if features is None:
            return
        wanted = np.array([counts[symbol] for symbol in symbols], dtype=np.int64)
        got = np.minimum(wanted, self.feed.held_counts(symbols))
        in_order = bool((got == wanted).all()) and newest.height == int(got.sum())
        if in_order:
            taken = self._taken_open_ms[features.symbol_indices(symbols)]
            first_new = newest["open_time"].to_numpy()[np.cumsum(got) - got]
            in_order = bool((first_new > taken).all())
        if not in_order:
            log.info("a bar arrived out of order; rebuilding the feature state")
            self._rebuild_features(features.window_rows)
            return
        self._advance([newest])

    def _advance(self, frames: list[pl.DataFrame]) -> None:
        """Advance the state by `frames` (each the new bars of one symbol, in open-time order):
        one advance per bar-step, taking the k-th new bar of every symbol that has one."""
        features = self._features
        frames = [frame for frame in frames if frame.height]
        if features is None or not frames:
            return
        bars = pl.concat(frames)
        arrays = features.bar_arrays(bars)
        step = bars.select(pl.int_range(pl.len()).over("symbol")).to_series().to_numpy()
        for k in range(int(step.max()) + 1):
            features.advance(arrays.rows(step == k))
        newest = arrays.rows(np.append(step[1:] == 0, True))  # each symbol's last row
        self._taken_open_ms[newest.symbol] = newest.open_time_ms
        self._taken_close[newest.symbol] = newest.close

    def _update_signals(self, symbols: tuple[str, ...] | list[str]) -> None:
        """Compute and record the signals of `symbols`' newest bars: one model forward pass
        over their ready windows. Symbols holding fewer bars than the model needs (after
        warm-up) keep their previous signal, if any."""
        serving = self.serving
        features = self._features
        if serving is None or features is None:
            return
        needed = min_history_bars(serving.model.spec.window_bars)
        held = self.feed.held_counts(symbols).tolist()
        eligible = [s for s, count in zip(symbols, held, strict=True) if count >= needed]
        if not eligible:
            return
        idx = features.symbol_indices(eligible)
        signals = compute_signals(
            eligible,
            features.windows(idx),
            features.segment_bars[idx],
            self._taken_close[idx],
            serving.model,
            serving.thresholds,
            serving.version,
            self.model.spec_hash,
        )
        published = [
            self._publish(symbol, signal) for symbol, signal in zip(eligible, signals, strict=True)
        ]
        records = [record for record in published if record is not None]
        # One Gold transaction for the batch; the metrics count each (symbol, bar) once.
        for record, accounted in zip(records, self.gold.record_many(records), strict=True):
            if accounted:
                self._count(record)

    def _publish(self, symbol: str, signal: Signal) -> SignalRecord | None:
        """Serve `signal` for `symbol`; its Gold record, None when it repeats the current one."""
        previous = self.signals.get(symbol)
        self.signals[symbol] = signal
        if (
            previous is not None
            and previous.bar_open_time_ms == signal.bar_open_time_ms
            and previous.model_version == signal.model_version
        ):
            return None
        return SignalRecord(
            symbol=symbol,
            bar_open_time_ms=signal.bar_open_time_ms,
            signal=signal.signal,
            confidence=signal.confidence,
            p_up=signal.p_up,
            predicted_return=signal.predicted_return,
            predicted_close=signal.predicted_close,
            close=signal.close,
            horizon_minutes=signal.horizon_minutes,
            model_version=signal.model_version,
            feature_spec_hash=signal.feature_spec_hash,
            reason=signal.reason,
            served_at_ms=int(self.clock() * 1000),
        )

    def _count(self, record: SignalRecord) -> None:
        """Count a served signal in the metrics: once per (symbol, bar), its accounted record."""
        self.signal_counts[(record.symbol, record.signal)] += 1
        if record.confidence > 0:
            bucket = bisect_left(CONFIDENCE_BUCKETS, record.confidence)
            self.confidence_counts[min(bucket, len(CONFIDENCE_BUCKETS) - 1)] += 1
            self.confidence_sum += record.confidence

    def _fill_outcomes(self, newest: pl.DataFrame) -> None:
        """Fill the Gold outcomes that the new bars `newest` realise, in one transaction.

        Only new bars can realise an outcome: a signal is computed for a symbol's newest bar,
        so its horizon bar arrives later, as a new bar (after a restart, the first poll counts
        every held bar as new, which covers the signals recorded before it)."""
        closes_by_symbol: dict[str, dict[int, float]] = {}
        for symbol, open_ms, close in zip(
            newest["symbol"].to_list(),
            newest["open_time"].to_list(),
            newest["close"].to_list(),
            strict=True,
        ):
            closes_by_symbol.setdefault(symbol, {})[open_ms] = close
        self.gold.fill_outcomes_many(closes_by_symbol, int(self.clock() * 1000))

    # -- reads ---------------------------------------------------------------------------

    def signal(self, symbol: str) -> Signal:
        """The current signal of `symbol`, exactly as `/signal` serves it (NEUTRAL with a reason
        when its bars are stale); the errors of `EngineSnapshot.signal`."""
        return self.snapshot().signal(symbol, self.clock())

    def snapshot(self) -> EngineSnapshot:
        """Everything the ingress serves from memory, frozen (it crosses a Serve handle).

        Built anew only when something in it changed since the last one (new bars, a model
        swap or load error, a feed error); otherwise that one is returned as it is: its
        staleness figures, read with its `taken_at`, are still exact. Each snapshot built has a
        new `sequence`, so a reader holding one can ask whether it is still current."""
        with self._lock:
            key = (self.sequence, self.load_error, self.reloads, self.feed.errors())
            if self._snapshot_cache is not None and self._snapshot_cache[0] == key:
                return self._snapshot_cache[1]
            self._snapshot_serial += 1
            snapshot = self._build_snapshot(self._snapshot_serial)
            self._snapshot_cache = (key, snapshot)
            return snapshot

    def _build_snapshot(self, sequence: int) -> EngineSnapshot:
        """A new snapshot numbered `sequence` (the caller holds the lock)."""
        serving = self.serving
        return EngineSnapshot(
            sequence=sequence,
            taken_at=self.clock(),
            stale_after_s=self.feed.config.stale_after_s,
            symbols=tuple(
                SymbolState(
                    symbol=symbol,
                    staleness_s=self.feed.staleness_s(symbol),
                    signal=self.signals.get(symbol),
                    feed_error=self.feed.last_error(symbol),
                )
                for symbol in self.feed.symbols
            ),
            model=serving.info() if serving else None,
            load_error=self.load_error,
            reloads=self.reloads,
            signal_counts=tuple(
                SignalCount(symbol, signal, count)
                for (symbol, signal), count in sorted(self.signal_counts.items())
            ),
            confidence=ConfidenceHistogram(
                buckets=CONFIDENCE_BUCKETS,
                counts=tuple(self.confidence_counts),
                sum=self.confidence_sum,
            ),
            outcomes=self.outcomes,
        )

    def predict(self, symbol: str, bars: BarColumns) -> Signal:
        """The signal the serving model gives client bars (`ProductionModel.predict`)."""
        return self.model.predict(symbol, bars)

    def history(self, symbol: str | None, limit: int) -> list[dict[str, Any]]:
        """Served signals of `symbol`, or of every symbol this engine serves when None (only its
        own: engine shards may share one Gold store), newest first (`GoldStore.history`)."""
        if symbol is not None and symbol not in self.feed.symbols:
            raise UnknownSymbolError(symbol)
        return self.gold.history(symbol, limit, among=self.feed.symbols)

    def close(self) -> None:
        self.gold.close()
