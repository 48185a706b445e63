"""Benchmark: thousands of live symbols through the real Serve application, on an accelerated
bar clock.

For each size N (`--symbols`, default 100,1000,2000) the Ray Serve application
(`serve.app.build_app` deployed by `serve.deploy.deploy`, HAProxy ingress, real HTTP, JWT) serves
N simulated symbols SIM0001.. from the simulator replay feed, one bar every `--bar-interval-s`
seconds (`replay_bars_per_s = 1 / bar_interval_s`), with an untrained GRU model registered as
production. The replay's start is fixed in the config (`FeedConfig.replay_start_s`), so the
benchmark knows when every bar closes on the accelerated clock:
`close(j) = replay_start_s + (j - history_bars + 1) * bar_interval_s` for source bar j.
Measured over `--bars` bars that close after the service is ready:

- close -> servable at /signal (`p50/p99_close_to_signal_ms`): a sampler thread polls
  `GET /signal` for `--sample` symbols (spread over the universe) round-robin, and records the
  first moment each bar's signal (`as_of`) is answered; latency = that moment - the bar's close.
  Resolution: one sampler round (a few tens of ms, reported as `sampler_round_ms`).
- close -> published by the engine, for every symbol-bar (`p50/p99_close_to_publish_ms`): the
  Gold store's `served_at_ms` of each signal minus its bar's close. The ingress serves it at most
  `snapshot_poll_s` (0.25 s) plus one snapshot transfer later.
- `late_bars`: symbol-bars whose signal was published after the next bar closed (Gold, all
  symbols) plus sampled ones first served after it; `dropped_bars`: symbol-bars with no signal.
- `cpu_ms_per_symbol_bar`: CPU time (user + system, psutil) of the engine replicas' processes
  (every shard) over the measured bars divided by N x bars: features, model, Gold writes and
  the snapshots they hand the ingress, i.e. everything the engine processes do per bar.
- `errors`: `/signal` answers other than 200, and failed requests.

    .venv/bin/python -m bench.live [--symbols 100,1000,2000] [--bars 20] [--bar-interval-s 2]

Last line: one JSON object, the largest N's figures at the top level plus `sizes`, one entry
per N. No peer: the per-bar engine cost is compared with the features benchmark's figures.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.serve import token
from cluster.ray_runtime import free_port
from configs.schema import (
    AuthConfig,
    EngineShardsConfig,
    FeedConfig,
    GoldConfig,
    JwtConfig,
    RayConfig,
    ServeConfig,
    SimConfig,
)
from market.klines import ONE_MINUTE_MS, date_start_ms
from market.sources.sim import universe_symbols
from serve.deploy import deploy, wait_until_ok

SECRET = "bench-live-secret-" + "l" * 40
HISTORY_BARS = 300
SIM = SimConfig(seed=17, anchor_date=date(2024, 6, 3), signal_strength=0.3)


def live_config(
    tmp: Path, symbols: list[str], bar_interval_s: float, start_s: float, symbols_per_shard: int
) -> ServeConfig:
    (tmp / "jwt_secret").write_text(SECRET)
    (tmp / "jwt_secret").chmod(0o600)
    return ServeConfig(
        ray=RayConfig(num_cpus=2, include_dashboard=False),
        registry=str(tmp / "registry"),
        port=free_port(),
        engine=EngineShardsConfig(symbols_per_shard=symbols_per_shard),
        auth=AuthConfig(
            jwt=JwtConfig(secret_env="QUANT_AI_BENCH_UNSET", secret_file=str(tmp / "jwt_secret")),
            clients_file=str(tmp / "clients.yaml"),
            rate_limit_per_minute=1e9,
            rate_limit_burst=1_000_000,
        ),
        feed=FeedConfig(
            source="sim",
            symbols=symbols,
            history_bars=HISTORY_BARS,
            replay_bars_per_s=1.0 / bar_interval_s,
            replay_start_s=start_s,
            stale_after_s=3600,
            sim_days=1,
            sim=SIM,
        ),
        gold=GoldConfig(url=f"sqlite:///{tmp / 'gold.sqlite'}"),
    )


@dataclass
class Sampler:
    """Polls /signal for a few symbols; the first moment each (symbol, bar) was served."""

    base_url: str
    headers: dict[str, str]
    symbols: list[str]
    first_seen: dict[tuple[str, int], float] = field(default_factory=dict)
    errors: int = 0
    rounds: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, headers=self.headers, timeout=10.0) as client:
            while not self._stop.is_set():
                for symbol in self.symbols:
                    try:
                        response = client.get("/signal", params={"symbol": symbol})
                    except httpx.HTTPError:
                        self.errors += 1
                        continue
                    now = time.time()
                    if response.status_code != 200:
                        self.errors += 1
                        continue
                    as_of = datetime.fromisoformat(response.json()["as_of"])
                    # as_of is the bar's close: its open time + 1 minute.
                    key = (symbol, round(as_of.timestamp() * 1000) - ONE_MINUTE_MS)
                    self.first_seen.setdefault(key, now)
                self.rounds += 1
                time.sleep(0.02)


def engine_pids() -> list[int]:
    """The process ids of the Serve engine replicas (one per engine shard), found by the
    process title Ray gives an actor's worker (`ray::ServeReplica:<app>:<deployment>...`)."""
    import psutil

    from serve.app import ENGINE_DEPLOYMENT

    pids = []
    for process in psutil.process_iter(["cmdline"]):
        title = " ".join(process.info["cmdline"] or [])
        if "ServeReplica" in title and f":{ENGINE_DEPLOYMENT}" in title:
            pids.append(process.pid)
    if not pids:
        raise RuntimeError("no engine replica found")
    return pids


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_size(
    n: int, bars: int, bar_interval_s: float, sample: int, setup_s: float, symbols_per_shard: int
) -> dict[str, Any]:
    import psutil
    from ray import serve

    from cluster.ray_runtime import shutdown
    from models.untrained import register_model

    symbols = universe_symbols(n)
    with tempfile.TemporaryDirectory(prefix="bench-live-") as scratch:
        tmp = Path(scratch)
        register_model(tmp / "registry", seed=1)
        start_s = time.time() + setup_s
        config = live_config(tmp, symbols, bar_interval_s, start_s, symbols_per_shard)
        try:
            deployed = deploy(config, address=None, timeout_s=600)
            base = str(deployed["url"])
            headers = {"Authorization": f"Bearer {token(config)}"}
            wait_until_ok(f"{base}/signal?symbol={symbols[-1]}", timeout_s=600, headers=headers)
            ready_s = time.time()
            processes = [psutil.Process(pid) for pid in engine_pids()]

            def engine_cpu_s() -> float:
                return sum(sum(process.cpu_times()[:2]) for process in processes)

            step = max(1, n // sample)
            sampler = Sampler(base, headers, symbols[::step][:sample])
            sampler.start()
            # The measured bars: the first `bars` that close at least one interval after ready.
            first_day_ms = date_start_ms(SIM.anchor_date)

            def close_s(j: int) -> float:
                return start_s + (j - HISTORY_BARS + 1) * bar_interval_s

            first = HISTORY_BARS
            while close_s(first) < max(ready_s, start_s) + bar_interval_s:
                first += 1
            measured = range(first, first + bars)
            # CPU of the engine process from the close of the bar before the first measured one.
            time.sleep(max(0.0, close_s(first - 1) - time.time()))
            cpu_before = engine_cpu_s()
            wall_before = time.time()
            time.sleep(max(0.0, close_s(measured[-1] + 1) + 0.5 - time.time()))
            cpu_used_s = engine_cpu_s() - cpu_before
            wall_s = time.time() - wall_before
            sampler.stop()
            gold = sqlite3.connect(str(tmp / "gold.sqlite"))
            opens = [first_day_ms + j * ONE_MINUTE_MS for j in measured]
            rows = gold.execute(
                "SELECT symbol, bar_open_time_ms, MIN(served_at_ms) FROM gold_signals "
                "WHERE bar_open_time_ms BETWEEN ? AND ? GROUP BY symbol, bar_open_time_ms",
                (opens[0], opens[-1]),
            ).fetchall()
            gold.close()
        finally:
            serve.shutdown()
            shutdown()
    publish_ms, late = [], 0
    for _, open_ms, served_ms in rows:
        j = (open_ms - first_day_ms) // ONE_MINUTE_MS
        publish_ms.append(served_ms - close_s(j) * 1000)
        late += served_ms / 1000 > close_s(j + 1)
    signal_ms, late_sampled = [], 0
    for (_, open_ms), seen in sampler.first_seen.items():
        j = (open_ms - first_day_ms) // ONE_MINUTE_MS
        if j in measured:
            signal_ms.append((seen - close_s(j)) * 1000)
            late_sampled += seen > close_s(j + 1)
    return {
        "symbols": n,
        "engine_shards": config.engine.count(n),
        "bars": bars,
        "bar_interval_s": bar_interval_s,
        "p50_close_to_signal_ms": round(percentile(signal_ms, 0.5), 1),
        "p99_close_to_signal_ms": round(percentile(signal_ms, 0.99), 1),
        "max_close_to_signal_ms": round(max(signal_ms, default=float("nan")), 1),
        "sampled_symbol_bars": len(signal_ms),
        "sampler_round_ms": round(wall_s * 1000 / max(1, sampler.rounds), 1),
        "p50_close_to_publish_ms": round(percentile(publish_ms, 0.5), 1),
        "p99_close_to_publish_ms": round(percentile(publish_ms, 0.99), 1),
        "cpu_ms_per_symbol_bar": round(cpu_used_s * 1000 / (n * bars), 4),
        "engine_cpu_share": round(cpu_used_s / wall_s, 3),
        "late_bars": int(late) + late_sampled,
        "dropped_bars": n * bars - len(rows),
        "errors": sampler.errors,
        "ready_after_s": round(ready_s - (start_s - setup_s), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--symbols", default="100,1000,2000", help="comma-separated sizes N")
    parser.add_argument("--bars", type=int, default=20, help="measured bars per size")
    parser.add_argument("--bar-interval-s", type=float, default=2.0, help="seconds per bar")
    parser.add_argument("--sample", type=int, default=4, help="symbols polled over HTTP")
    parser.add_argument(
        "--setup-s", type=float, default=40.0, help="seconds from deploy to the first live bar"
    )
    parser.add_argument(
        "--symbols-per-shard",
        type=int,
        default=1000,
        help="engine shards: one Serve deployment per this many symbols (engine.symbols_per_shard)",
    )
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.symbols.split(",") if n.strip()]
    results = []
    for n in sizes:
        result = run_size(
            n, args.bars, args.bar_interval_s, args.sample, args.setup_s, args.symbols_per_shard
        )
        print(f"N={n}: {result}", file=sys.stderr, flush=True)
        results.append(result)
    largest = max(results, key=lambda r: int(r["symbols"]))
    print(json.dumps({**largest, "sizes": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
