"""Prometheus metrics of the signal API, in base units (seconds, ratios) with `_total` counters.

Request, latency and auth-failure metrics are observed by the ingress itself. Everything about
signals (counts by class, confidence, model version, staleness, realised hit rate and P&L,
registry reloads) comes from the engine's latest snapshot through a custom collector, so the
figures survive an ingress restart and are the engine's own counts, not a replica's guess.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from serve.api.auth import AUTH_ERROR_CODES
from serve.engine.snapshot import EngineSnapshot

PREFIX = "quant_ai"
# The text exposition format 0.0.4, which every Prometheus scrapes.
MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The methods a client can use on this API; any other a server parses (WebDAV's PROPFIND,
# PURGE, ...) is counted as "other" so clients cannot create new time series.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
OTHER_METHOD = "other"
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# Every metric name the service exports; the monitoring assets are checked against this list.
METRIC_NAMES = (
    f"{PREFIX}_http_requests_total",
    f"{PREFIX}_http_request_duration_seconds",
    f"{PREFIX}_auth_failures_total",
    f"{PREFIX}_signals_total",
    f"{PREFIX}_signal_confidence_ratio",
    f"{PREFIX}_model_info",
    f"{PREFIX}_model_loaded",
    f"{PREFIX}_feature_staleness_seconds",
    f"{PREFIX}_realised_hit_ratio",
    f"{PREFIX}_realised_signals_total",
    f"{PREFIX}_realised_pnl_ratio",
    f"{PREFIX}_registry_reloads_total",
    f"{PREFIX}_snapshot_age_seconds",
)


class SnapshotCollector(Collector):
    """Renders the engine snapshot held by the ingress as Prometheus metric families."""

    def __init__(
        self, snapshot: Callable[[], EngineSnapshot | None], clock: Callable[[], float]
    ) -> None:
        self._snapshot = snapshot
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        loaded = GaugeMetricFamily(
            f"{PREFIX}_model_loaded", "1 when a production model is being served, else 0"
        )
        if snap is None:
            loaded.add_metric([], 0.0)
            yield loaded
            return
        model = snap.model
        loaded.add_metric([], 1.0 if model else 0.0)
        yield loaded

        info = InfoMetricFamily(
            f"{PREFIX}_model", "the serving model", labels=["version", "family", "spec_hash"]
        )
        if model:
            info.add_metric([model.version, model.family, model.feature_spec_hash or ""], {})
        yield info

        signals = CounterMetricFamily(
            f"{PREFIX}_signals",
            "signals computed, by symbol and class",
            labels=["symbol", "signal"],
        )
        for counted in snap.signal_counts:
            signals.add_metric([counted.symbol, counted.signal], float(counted.count))
        yield signals

        confidence = snap.confidence
        cumulative, buckets = 0, []
        for bound, count in zip(confidence.buckets, confidence.counts, strict=True):
            cumulative += count
            buckets.append((repr(float(bound)), float(cumulative)))
        buckets.append(("+Inf", float(cumulative)))
        histogram = HistogramMetricFamily(
            f"{PREFIX}_signal_confidence_ratio",
            "confidence of computed signals: max(p_up, 1 - p_up)",
        )
        histogram.add_metric([], buckets, sum_value=confidence.sum)
        yield histogram

        staleness = GaugeMetricFamily(
            f"{PREFIX}_feature_staleness_seconds",
            "seconds since the newest bar of the symbol arrived (replays) or closed (live)",
            labels=["symbol"],
        )
        now = self._clock()
        for state in snap.symbols:
            # As of the scrape: the snapshot's own age counts (a snapshot is rebuilt only when
            # the engine's state changes).
            staleness.add_metric([state.symbol], snap.staleness(state.symbol, now)[0])
        yield staleness

        hit = GaugeMetricFamily(
            f"{PREFIX}_realised_hit_ratio",
            "share of BUY/SELL signals whose 10-minute outcome went their way",
            labels=["symbol"],
        )
        realised = CounterMetricFamily(
            f"{PREFIX}_realised_signals",
            "BUY/SELL signals whose 10-minute outcome is known",
            labels=["symbol"],
        )
        pnl = GaugeMetricFamily(
            f"{PREFIX}_realised_pnl_ratio",
            "cumulative gross P&L of served signals, a sum of simple returns (0.01 = 1%)",
            labels=["symbol"],
        )
        for outcome in snap.outcomes:
            if outcome.hit_rate is not None:
                hit.add_metric([outcome.symbol], outcome.hit_rate)
            realised.add_metric([outcome.symbol], float(outcome.directional))
            pnl.add_metric([outcome.symbol], outcome.pnl_bps / 1e4)
        yield hit
        yield realised
        yield pnl

        reloads = CounterMetricFamily(
            f"{PREFIX}_registry_reloads", "production models loaded from the registry"
        )
        reloads.add_metric([], float(snap.reloads))
        yield reloads

        age = GaugeMetricFamily(
            f"{PREFIX}_snapshot_age_seconds", "age of the engine snapshot the ingress serves"
        )
        age.add_metric([], max(0.0, self._clock() - snap.taken_at))
        yield age


class ApiMetrics:
    """The ingress' registry: its own request metrics plus the snapshot collector."""

    def __init__(
        self, snapshot: Callable[[], EngineSnapshot | None], clock: Callable[[], float]
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "time from request to response, by route template and method",
            ["route", "method"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.auth_failures = Counter(
            f"{PREFIX}_auth_failures",
            "rejected credentials or tokens, by reason",
            ["reason"],
            registry=self.registry,
        )
        # Every reason exported from the start: a rate() over a series that appears only with
        # its first failure misses that failure.
        for reason in AUTH_ERROR_CODES:
            self.auth_failures.labels(reason)
        self.registry.register(SnapshotCollector(snapshot, clock))

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one request of `route` that took `seconds`; methods outside `HTTP_METHODS`
        are labelled "other"."""
        method = method if method in HTTP_METHODS else OTHER_METHOD
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
