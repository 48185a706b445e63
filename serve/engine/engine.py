"""The signal engine: live bars + the production model + the Gold store, kept current.

Plain Python (the Serve model deployment drives it from a background loop; the plain-uvicorn
benchmark drives it from a thread), so it is testable without Ray. One signal is computed per
new closed bar per symbol and kept in memory until the next bar; every new signal goes to the
Gold store, and realised outcomes are filled in once bar t+10 is held.

When the registry's `production` alias moves (a promotion or a rollback), `refresh_model` loads
the new version beside the old one and swaps a single reference, so a request in flight sees
either the old model or the new one, never a half-loaded one; the latest bar's signal is then
recomputed with the new model.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl

from configs.schema import BacktestConfig, ServeConfig
from market.features.spec import spec_hash
from models.artifact import LoadedModel, load_registered
from models.registry import PRODUCTION, ModelRegistry
from serve.engine.feed import BarFeed
from serve.engine.gold import GoldStore, SignalRecord
from serve.engine.online_features import min_history_bars
from serve.engine.signals import compute_signal
from serve.engine.snapshot import (
    ConfidenceHistogram,
    EngineSnapshot,
    InvalidBarsError,
    ModelInfo,
    OutcomeSummary,
    Signal,
    SignalCount,
    SymbolState,
    UnknownSymbolError,
    require_loaded,
)

log = logging.getLogger(__name__)

# Upper bounds of the served-confidence histogram (confidence lies in [0.5, 1]).
CONFIDENCE_BUCKETS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


@dataclass(frozen=True)
class ServingModel:
    """The model being served, with the registry facts `/models/current` shows."""

    version: str
    model: LoadedModel
    metadata: dict[str, Any]
    thresholds: BacktestConfig
    loaded_at_ms: int

    def info(self) -> ModelInfo:
        meta = self.metadata
        return ModelInfo(
            version=self.version,
            family=self.model.spec.family,
            window_bars=self.model.spec.window_bars,
            feature_spec_hash=meta.get("feature_spec_hash"),
            metrics=meta.get("metrics", {}),
            training_data_range=meta.get("training_data_range"),
            evaluated_range=meta.get("evaluated_range"),
            gate=meta.get("gate"),
            thresholds=self.thresholds,
            loaded_at_ms=self.loaded_at_ms,
        )


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
        self.registry = ModelRegistry(config.registry)
        self.gold = GoldStore(config.gold.url)
        self.spec_hash = spec_hash()
        self.serving: ServingModel | None = None
        self.load_error: str | None = None
        self.reloads = 0
        self.signals: dict[str, Signal] = {}
        self.signal_counts: Counter[tuple[str, str]] = Counter(self.gold.counts_by_signal())
        self.confidence_counts = [0] * len(CONFIDENCE_BUCKETS)
        self.confidence_sum = 0.0
        self.outcomes: tuple[OutcomeSummary, ...] = self.gold.outcome_summary()
        self.sequence = 0
        self._lock = threading.RLock()

    # -- model ---------------------------------------------------------------------------

    def refresh_model(self) -> bool:
        """Follow the production alias; True when a new version was swapped in."""
        name = self.config.model_name
        try:
            version = self.registry.get_alias(name, PRODUCTION)
        except Exception as error:  # a registry on shared storage can blip; keep serving
            log.warning("registry %s unreadable: %s", self.config.registry, error)
            return False
        current = self.serving.version if self.serving else None
        if version is None or version == current:
            return False
        try:
            metadata = self.registry.metadata(name, version)
            model = load_registered(self.registry, name, version)
            thresholds = self.config.backtest or BacktestConfig.model_validate(
                metadata.get("backtest", {})
            )
        except Exception as error:
            self.load_error = f"loading {name} {version} failed: {type(error).__name__}: {error}"
            log.error("%s; still serving %s", self.load_error, current)
            return False
        if metadata.get("feature_spec_hash") not in (None, self.spec_hash):
            self.load_error = (
                f"{name} {version} was trained on feature spec {metadata['feature_spec_hash']}, "
                f"this service computes {self.spec_hash}: refusing it (training/serving skew)"
            )
            log.error(self.load_error)
            return False
        serving = ServingModel(version, model, metadata, thresholds, int(self.clock() * 1000))
        with self._lock:
            self.serving = serving
            self.load_error = None
            self.reloads += 1
            for symbol in self.feed.symbols:
                self._update_signal(symbol)
            self.sequence += 1
        log.info("serving %s %s (was %s)", name, version, current)
        return True

    # -- bars ----------------------------------------------------------------------------

    def tick(self) -> dict[str, int]:
        """Poll the feed; compute, record and score signals of new bars. New bars per symbol."""
        new_bars = self.feed.poll()
        with self._lock:
            for symbol, count in new_bars.items():
                if count > 0:
                    self._update_signal(symbol)
                    self._fill_outcomes(symbol)
            if any(new_bars.values()):
                self.outcomes = self.gold.outcome_summary()
            self.sequence += 1
        return new_bars

    def _update_signal(self, symbol: str) -> None:
        serving = self.serving
        bars = self.feed.bars(symbol)
        if serving is None or bars.height == 0:
            return
        if bars.height < min_history_bars(serving.model.spec.window_bars):
            return
        signal = compute_signal(
            symbol, bars, serving.model, serving.thresholds, serving.version, self.spec_hash
        )
        previous = self.signals.get(symbol)
        self.signals[symbol] = signal
        if (
            previous is not None
            and previous.bar_open_time_ms == signal.bar_open_time_ms
            and previous.model_version == signal.model_version
        ):
            return
        record = SignalRecord(
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
        if self.gold.record(record):
            self.signal_counts[(symbol, signal.signal)] += 1
            if signal.confidence > 0:
                bucket = bisect_left(CONFIDENCE_BUCKETS, signal.confidence)
                self.confidence_counts[min(bucket, len(CONFIDENCE_BUCKETS) - 1)] += 1
                self.confidence_sum += signal.confidence

    def _fill_outcomes(self, symbol: str) -> None:
        bars = self.feed.bars(symbol)
        if bars.height == 0:
            return
        closes = self.feed.closes_since(symbol, int(bars["open_time"][0]))
        self.gold.fill_outcomes(symbol, closes, int(self.clock() * 1000))

    # -- reads ---------------------------------------------------------------------------

    def signal(self, symbol: str) -> Signal:
        """The current signal of `symbol`, exactly as `/signal` serves it (NEUTRAL with a reason
        when its bars are stale); the errors of `EngineSnapshot.signal`."""
        return self.snapshot().signal(symbol, self.clock())

    def snapshot(self) -> EngineSnapshot:
        """Everything the ingress serves from memory, frozen (it crosses a Serve handle)."""
        with self._lock:
            serving = self.serving
            return EngineSnapshot(
                sequence=self.sequence,
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

    def predict(self, symbol: str, bars: pl.DataFrame) -> Signal:
        """The signal the serving model gives a window of bars supplied by a client.

        Raises NoModelError, or InvalidBarsError when there are too few bars for the model."""
        serving = require_loaded(self.serving, self.load_error)
        needed = min_history_bars(serving.model.spec.window_bars)
        if bars.height < needed:
            raise InvalidBarsError(
                f"{bars.height} bars supplied; the model needs at least {needed} consecutive "
                f"1-minute bars ({serving.model.spec.window_bars} in its window plus warm-up)"
            )
        return compute_signal(
            symbol, bars, serving.model, serving.thresholds, serving.version, self.spec_hash
        )

    def history(self, symbol: str | None, limit: int) -> list[dict[str, Any]]:
        if symbol is not None and symbol not in self.feed.symbols:
            raise UnknownSymbolError(symbol)
        return self.gold.history(symbol, limit)

    def close(self) -> None:
        self.gold.close()
