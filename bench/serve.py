"""Benchmark: the same `/signal` handler behind (a) the Ray Serve application and (b) plain
FastAPI on uvicorn, in one run.

Both sides run `serve.api.routes.make_api` with real JWT checks, rate limiting and metrics, over an
engine holding a registered model and a simulator feed (slowed so that no new bar arrives while
load runs: the handler is measured, not the feature engine). (a) is deployed by
`serve.deploy.deploy`, exactly as `jobs.deploy` does it (HAProxy ingress, direct-ingress
replicas); (b) serves `serve.local.make_local_api` with uvicorn in a child process. A closed-loop
load generator (`bench.loadgen`: wrk when installed, else raw asyncio sockets, in its own
process) runs at 1 and 16 keep-alive connections for a fixed time. Then `/predict` with a
400-bar window (JSON body of client bars) is timed on one keep-alive connection, one request
after another (`predict_p50_ms_c1`, served by the `/predict` deployment on Serve). Last line: one
JSON object.

    .venv/bin/python -m bench.serve [--duration 8] [--mode haproxy|proxy]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import httpx

from bench.loadgen import LoadResult, run_load
from cluster.ray_runtime import free_port
from configs.schema import (
    AuthConfig,
    FeedConfig,
    GoldConfig,
    JwtConfig,
    RayConfig,
    ServeConfig,
    SimConfig,
)
from market.sim_silver import simulated_bars
from serve.app import POLARS_THREADS_ENV
from serve.deploy import deploy, wait_until_ok

SYMBOL = "SIMBENCH"
SECRET = "bench-secret-" + "b" * 40
PREDICT_BARS = 400
PREDICT_REQUESTS = 60
PREDICT_WARMUP_REQUESTS = 5
SCOPES = ["signals:read", "signals:predict"]


def bench_config(tmp: Path, port: int, mode: str) -> ServeConfig:
    (tmp / "jwt_secret").write_text(SECRET)
    (tmp / "jwt_secret").chmod(0o600)
    return ServeConfig(
        ray=RayConfig(num_cpus=2, include_dashboard=False),
        registry=str(tmp / "registry"),
        port=port,
        ingress_mode=mode,  # type: ignore[arg-type]
        auth=AuthConfig(
            jwt=JwtConfig(secret_env="QUANT_AI_BENCH_UNSET", secret_file=str(tmp / "jwt_secret")),
            clients_file=str(tmp / "clients.yaml"),
            # The benchmark client must not be throttled: a limit far above what 2 cores serve.
            rate_limit_per_minute=1e9,
            rate_limit_burst=1_000_000,
        ),
        feed=FeedConfig(
            source="sim",
            symbols=[SYMBOL],
            history_bars=400,
            replay_bars_per_s=0.001,
            stale_after_s=3600,
            sim_days=1,
            sim=SimConfig(seed=11, anchor_date=date(2024, 4, 1)),
        ),
        gold=GoldConfig(url=f"sqlite:///{tmp / 'gold.sqlite'}"),
    )


def token(config: ServeConfig) -> str:
    """A token of the benchmark client, registered first if needed: the API refuses the
    tokens of clients its clients file does not list."""
    from serve.api.auth import TokenService
    from serve.api.clients import ClientStore

    store = ClientStore.load(config.auth.clients_file)
    if "bench" not in store:
        store.add("bench", SCOPES)
    value, _ = TokenService.from_config(config.auth.jwt).mint("bench", SCOPES, 3600)
    return value


def predict_body() -> dict[str, Any]:
    """A `/predict` request of PREDICT_BARS consecutive simulated 1-minute bars."""
    frame = simulated_bars(SimConfig(seed=5, anchor_date=date(2024, 5, 1)), [SYMBOL], 1)
    bars = [
        {k: v for k, v in row.items() if k != "symbol"}
        for row in frame.head(PREDICT_BARS).iter_rows(named=True)
    ]
    return {"symbol": SYMBOL, "bars": bars}


def predict_p50_ms(base_url: str, headers: dict[str, str]) -> float:
    """Median ms of a 400-bar `/predict` on one keep-alive connection, requests back to back
    (after PREDICT_WARMUP_REQUESTS unmeasured ones). Raises on any answer but 200."""
    body = json.dumps(predict_body()).encode()
    post_headers = {**headers, "Content-Type": "application/json"}
    times: list[float] = []
    with httpx.Client(base_url=base_url, timeout=30.0) as client:
        for k in range(PREDICT_WARMUP_REQUESTS + PREDICT_REQUESTS):
            started = time.perf_counter()
            response = client.post("/predict", content=body, headers=post_headers)
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            if k >= PREDICT_WARMUP_REQUESTS:
                times.append(elapsed * 1000)
    return statistics.median(times)


def measure(base_url: str, headers: dict[str, str], duration_s: float) -> dict[str, Any]:
    """`/signal` under load at 1 and 16 connections, then the `/predict` median."""
    url = f"{base_url}/signal?symbol={SYMBOL}"
    wait_until_ok(url, timeout_s=180, headers=headers)
    results: dict[str, Any] = {
        f"c{c}": run_load(url, headers, concurrency=c, duration_s=duration_s, warmup_s=2.0)
        for c in (1, 16)
    }
    results["predict_p50_ms_c1"] = predict_p50_ms(base_url, headers)
    return results


def run_serve_side(config: ServeConfig, duration_s: float) -> dict[str, Any]:
    from ray import serve

    from cluster.ray_runtime import shutdown

    try:
        deployed = deploy(config, address=None)
        headers = {"Authorization": f"Bearer {token(config)}"}
        return measure(str(deployed["url"]), headers, duration_s)
    finally:
        serve.shutdown()
        shutdown()


def run_plain_side(config_path: Path, config: ServeConfig, duration_s: float) -> dict[str, Any]:
    port = config.port
    # As on Serve's /predict replica (serve.app.build_app): polars' pool sized by the config.
    env = {**os.environ, POLARS_THREADS_ENV: str(config.predict.threads)}
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.serve", "--plain-server", str(config_path)],
        stdout=subprocess.DEVNULL,
        env=env,
    )
    try:
        headers = {"Authorization": f"Bearer {token(config)}"}
        return measure(f"http://127.0.0.1:{port}", headers, duration_s)
    finally:
        server.terminate()
        server.wait(timeout=30)


def plain_server(config_path: str) -> None:
    """Child process: the same API on uvicorn, one worker, the engine in a thread."""
    import uvicorn

    from serve.local import make_local_api

    config = ServeConfig.model_validate_json(Path(config_path).read_text())
    uvicorn.run(
        make_local_api(config),
        host="127.0.0.1",
        port=config.port,
        log_level="warning",
        access_log=False,
    )


def summary(serve_side: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    def ms(value: float) -> float:
        return round(value, 3)

    serve_loads: list[LoadResult] = [serve_side["c1"], serve_side["c16"]]
    plain_loads: list[LoadResult] = [plain["c1"], plain["c16"]]

    return {
        "serve_rps_c1": round(serve_side["c1"].rps, 1),
        "serve_rps_c16": round(serve_side["c16"].rps, 1),
        "plain_rps_c1": round(plain["c1"].rps, 1),
        "plain_rps_c16": round(plain["c16"].rps, 1),
        "ratio_c1": round(serve_side["c1"].rps / plain["c1"].rps, 3),
        "ratio_c16": round(serve_side["c16"].rps / plain["c16"].rps, 3),
        "serve_p50_ms_c1": ms(serve_side["c1"].p50_ms),
        "serve_p99_ms_c1": ms(serve_side["c1"].p99_ms),
        "serve_p50_ms_c16": ms(serve_side["c16"].p50_ms),
        "serve_p99_ms_c16": ms(serve_side["c16"].p99_ms),
        "plain_p50_ms_c1": ms(plain["c1"].p50_ms),
        "plain_p99_ms_c1": ms(plain["c1"].p99_ms),
        "plain_p50_ms_c16": ms(plain["c16"].p50_ms),
        "plain_p99_ms_c16": ms(plain["c16"].p99_ms),
        "predict_p50_ms_c1": ms(serve_side["predict_p50_ms_c1"]),
        "plain_predict_p50_ms_c1": ms(plain["predict_p50_ms_c1"]),
        "predict_ratio_c1": round(serve_side["predict_p50_ms_c1"] / plain["predict_p50_ms_c1"], 3),
        "errors": sum(r.errors for r in (*serve_loads, *plain_loads)),
        "serve_errors": sum(r.errors for r in serve_loads),
        "plain_errors": sum(r.errors for r in plain_loads),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per load level")
    parser.add_argument("--mode", choices=["haproxy", "proxy"], default="haproxy")
    parser.add_argument("--plain-server", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_server:
        plain_server(args.plain_server)
        return 0

    from models.untrained import register_model

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as scratch:
        tmp = Path(scratch)
        register_model(tmp / "registry", seed=1)
        serve_config = bench_config(tmp, free_port(), args.mode)
        plain_config = serve_config.model_copy(
            update={
                "port": free_port(),
                "gold": GoldConfig(url=f"sqlite:///{tmp / 'gold-plain.sqlite'}"),
            }
        )
        config_path = tmp / "plain.json"
        config_path.write_text(plain_config.model_dump_json())
        plain = run_plain_side(config_path, plain_config, args.duration)
        print(f"plain uvicorn: {plain}", file=sys.stderr, flush=True)
        serve_side = run_serve_side(serve_config, args.duration)
        print(f"Ray Serve ({args.mode}): {serve_side}", file=sys.stderr, flush=True)
    print(
        json.dumps({"mode": args.mode, "duration_s": args.duration, **summary(serve_side, plain)})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
