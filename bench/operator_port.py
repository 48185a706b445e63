"""Benchmark: what the operator port costs an ingress replica.

`serve.operator.OperatorServer` over the operator app of `serve.api.operator`, with an
`ApiMetrics` holding a full engine snapshot (`--symbols` symbols with signals, outcomes and P&L,
18 request series): the time to start the listener (bind, uvicorn on its thread, target file)
and to stop it, the bytes of one scrape, the latency of `--scrapes` scrapes over one keep-alive
loopback connection, and the time `ApiMetrics.render` takes alone. Last line: one JSON object.

    .venv/bin/python -m bench.operator_port [--starts 20] [--scrapes 300] [--symbols 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from cluster.ray_runtime import free_port
from configs.schema import BacktestConfig, OperatorConfig
from serve.api.metrics import ApiMetrics
from serve.api.operator import make_operator_api
from serve.engine.snapshot import (
    ConfidenceHistogram,
    EngineSnapshot,
    ModelInfo,
    OutcomeSummary,
    SignalCount,
    SymbolState,
)
from serve.operator import OperatorServer

ROUTES = ("/signal", "/predict", "/token", "/healthz", "/readyz", "/models/current")


def full_snapshot(symbols: int) -> EngineSnapshot:
    names = [f"SIM{i:03d}" for i in range(symbols)]
    return EngineSnapshot(
        sequence=1,
        taken_at=time.time(),
        stale_after_s=150.0,
        symbols=tuple(
            SymbolState(s, staleness_s=12.0, signal=None, feed_error=None) for s in names
        ),
        model=ModelInfo(
            version="v0001",
            family="gru",
            window_bars=64,
            horizon_minutes=10,
            feature_spec_hash="abc",
            metrics={},
            training_data_range=None,
            evaluated_range=None,
            gate=None,
            thresholds=BacktestConfig(),
            loaded_at_ms=0,
        ),
        load_error=None,
        reloads=1,
        signal_counts=tuple(
            SignalCount(s, kind, 3) for s in names for kind in ("BUY", "SELL", "NEUTRAL")
        ),
        confidence=ConfidenceHistogram(
            buckets=(0.5, 0.6, 0.7, 0.8, 0.9, 1.0), counts=(1,) * 6, sum=4.1
        ),
        outcomes=tuple(OutcomeSummary(s, 8, 6, 5, 3, hit_rate=0.6, pnl_bps=12.0) for s in names),
    )


def milliseconds(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--starts", type=int, default=20, help="listener starts and stops")
    parser.add_argument("--scrapes", type=int, default=300, help="scrapes timed")
    parser.add_argument("--symbols", type=int, default=20, help="symbols in the snapshot")
    args = parser.parse_args()

    snapshot = full_snapshot(args.symbols)
    metrics = ApiMetrics(lambda: snapshot, time.time)
    for route in ROUTES:
        for status in (200, 401, 429):
            metrics.observe(route, "GET", status, 0.003)
    app = make_operator_api(lambda: snapshot, metrics)
    config = OperatorConfig(port=free_port(), ports_per_node=1, targets_dir=tempfile.mkdtemp())

    starts, stops, scrapes = [], [], []
    size = 0
    for attempt in range(args.starts):
        server = OperatorServer(app, config)
        began = time.perf_counter()
        endpoint = server.start()
        starts.append(time.perf_counter() - began)
        if attempt == 0:
            with httpx.Client() as client:
                size = len(client.get(endpoint.metrics_url).content)
                for _ in range(args.scrapes):
                    began = time.perf_counter()
                    client.get(endpoint.metrics_url).raise_for_status()
                    scrapes.append(time.perf_counter() - began)
        began = time.perf_counter()
        server.stop()
        stops.append(time.perf_counter() - began)
    assert not list(Path(str(config.targets_dir)).glob("*.json"))
    renders = []
    for _ in range(args.scrapes):
        began = time.perf_counter()
        metrics.render()
        renders.append(time.perf_counter() - began)
    scrapes.sort()
    print(
        json.dumps(
            {
                "bench": "operator_port",
                "symbols": args.symbols,
                "start_median_ms": milliseconds(statistics.median(starts)),
                "start_max_ms": milliseconds(max(starts)),
                "stop_median_ms": milliseconds(statistics.median(stops)),
                "scrape_bytes": size,
                "scrape_p50_ms": milliseconds(scrapes[len(scrapes) // 2]),
                "scrape_p99_ms": milliseconds(scrapes[int(len(scrapes) * 0.99) - 1]),
                "render_p50_ms": milliseconds(statistics.median(renders)),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
