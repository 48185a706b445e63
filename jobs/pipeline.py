"""`python -m jobs.pipeline`: what `make run` runs. Ingest -> Silver (Spark on Ray) -> sweep and
promotion gate -> the signal API on Ray Serve, then one `/signal` call per symbol.

With a local Ray the service keeps running until Ctrl-C (it lives in this process's Ray); with
`retrain_interval_minutes` set, ingest -> features -> tune -> gate re-run on that schedule and
the service picks up a newly promoted model by itself (it follows the registry's alias).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from cluster.etl import run_feature_etl
from cluster.processes import exit_status, stop_on_sigterm
from cluster.ray_runtime import connect
from configs.schema import (
    FeedConfig,
    IngestConfig,
    PipelineConfig,
    ServeConfig,
    TuneJobConfig,
    load_config,
)
from jobs._cli import base_parser, print_summary, setup_logging
from market.ingest import run_ingest
from market.lake import Lake

DEFAULT_CONFIG = "configs/pipeline/local.yaml"


def say(line: str) -> None:
    print(f"[pipeline] {line}", file=sys.stderr, flush=True)


class Stages:
    """The stages in order, each timed and announced as `[pipeline] k/n name: ...`."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str, what: str) -> Any:
        say(f"{self.names.index(name) + 1}/{len(self.names)} {name}: {what}")
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 2)


def train_cycle(config: PipelineConfig, lake: str, registry: str, stages: Stages) -> dict[str, Any]:
    """Ingest -> features -> (tune -> gate): the part the retraining schedule repeats."""
    ingest_cfg = config.ingest
    results: dict[str, Any] = {}
    with stages.stage("ingest", f"{ingest_cfg.source} {','.join(ingest_cfg.symbols)}"):
        results["ingest"] = run_ingest(ingest_cfg, lake)
    with stages.stage("features", f"Spark on Ray -> {Lake.at(lake).silver_location}"):
        features = run_feature_etl(config.spark, lake)
    results["features"] = features
    say(
        f"Silver at {features['silver']} ({features['rows_out']} rows in, "
        f"{features['rows_written']} written; quarantined {features['quarantined']}; "
        f"gaps {features['gaps']})"
    )
    if config.tune:
        job = load_config(config.tune, TuneJobConfig)
        out = Path(config.runs) / f"tune-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        with stages.stage("tune", f"{config.tune} ({job.num_samples} trials) -> {out}"):
            from models.selection import run_selection

            selection = run_selection(
                lake, registry, job, out, progress=lambda line: say(f"  tune: {line}")
            )
        decision = selection.summary.get("gate", {})
        verdict = (
            f"PROMOTED {decision.get('version')} (DSR {decision.get('dsr', float('nan')):.3f})"
            if decision.get("promoted")
            else "not promoted: " + "; ".join(decision.get("reasons") or [])
        )
        say(f"gate: {verdict}; report {out / 'report.html'}")
        results["tune"] = selection.summary
    return results


def feed_for(ingest: IngestConfig, feed: FeedConfig) -> FeedConfig:
    """The live feed of the symbols the pipeline trained on, from the same kind of source.

    The simulator replay keeps the serve config's own seed and dates, so served signals are out
    of sample; a dump replays the ingested file; Binance polls the same base URL.
    """
    updates: dict[str, Any] = {"source": ingest.source, "symbols": list(ingest.symbols)}
    if ingest.source == "dump":
        updates["dump_path"] = ingest.path
    return feed.model_copy(update=updates)


def serve_stage(
    config: PipelineConfig, registry: str, lake: str, address: str | None
) -> dict[str, Any]:
    """Deploy the API, mint an operator token, call /signal for each symbol."""
    from jobs.deploy import absolute_paths, deploy
    from serve.api.auth import TokenService
    from serve.api.tokens import ensure_dev_secrets

    assert config.serve is not None
    serve_config = load_config(config.serve, ServeConfig)
    serve_config = absolute_paths(
        serve_config.model_copy(
            update={
                "registry": registry,
                "feed": feed_for(config.ingest, serve_config.feed),
                "gold": serve_config.gold.model_copy(update={"url": Lake.at(lake).gold_sqlite_url}),
            }
        )
    )
    created = ensure_dev_secrets(serve_config.auth)
    deployed = deploy(serve_config, address)
    tokens = TokenService.from_config(serve_config.auth.jwt)
    token, _ = tokens.mint("make-run", ["signals:read"])
    headers = {"Authorization": f"Bearer {token}"}
    answers: dict[str, Any] = {}
    with httpx.Client(base_url=deployed["url"], timeout=30.0) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and client.get("/readyz").status_code != 200:
            time.sleep(1.0)
        for symbol in serve_config.feed.symbols:
            response = client.get("/signal", params={"symbol": symbol}, headers=headers)
            answers[symbol] = response.json()
            say(f"GET /signal?symbol={symbol} -> {response.status_code} {response.json()}")
    return {
        **deployed,
        "dev_client": created.get("client_id"),
        "dev_client_secret": created.get("client_secret"),
        "signals": answers,
        "config": serve_config,
    }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="pipeline YAML")
    parser.add_argument("--lake", help="lake directory (overrides the config)")
    parser.add_argument("--registry", help="model registry directory (overrides the config)")
    parser.add_argument("--source", choices=["sim", "dump", "binance"], help="kline source")
    parser.add_argument("--symbols", help="comma-separated symbols (overrides the config)")
    parser.add_argument("--path", help="dump file or glob (--source dump)")
    parser.add_argument("--skip-tune", action="store_true", help="stop after Silver")
    parser.add_argument("--skip-serve", action="store_true", help="do not deploy the API")
    parser.add_argument(
        "--exit", action="store_true", help="stop the service and exit after the summary"
    )
    parser.add_argument(
        "--ray-jobs",
        metavar="DASHBOARD_URL",
        help="submit each stage as a Ray job to the cluster whose dashboard is at this URL "
        "(e.g. http://ray-head:8265) instead of running the stages in this driver",
    )
    args = parser.parse_args(argv)
    setup_logging()
    config = load_config(args.config, PipelineConfig)
    ingest_updates: dict[str, Any] = {}
    if args.source:
        ingest_updates["source"] = args.source
    if args.symbols:
        ingest_updates["symbols"] = [s.strip() for s in args.symbols.split(",") if s.strip()]
    if args.path:
        ingest_updates["path"] = args.path
    config = config.model_copy(
        update={
            "ingest": config.ingest.model_copy(update=ingest_updates),
            "tune": None if args.skip_tune else config.tune,
            "serve": None if (args.skip_serve or args.skip_tune) else config.serve,
        }
    )
    lake = args.lake or config.lake
    registry = args.registry or config.registry
    if args.ray_jobs:
        return submit_as_ray_jobs(args.ray_jobs, args.config, config, lake, registry)
    if config.serve and not (args.address or os.environ.get("RAY_ADDRESS") or config.ray.address):
        from serve.haproxy import PortBusyError, check_serve_ports

        try:
            check_serve_ports(load_config(config.serve, ServeConfig), say)
        except PortBusyError as busy:
            say(str(busy))
            return 1
    names = ["ingest", "features"] + (["tune"] if config.tune else [])
    names += ["serve"] if config.serve else []
    stages = Stages(names)
    started = time.perf_counter()
    cluster = connect(config.ray, args.address)
    results = train_cycle(config, lake, registry, stages)
    served: dict[str, Any] | None = None
    if config.serve:
        with stages.stage("serve", f"Ray Serve application from {config.serve}"):
            served = serve_stage(config, registry, lake, args.address)
        # The dev client's secret is shown once, in the guide below, never in the JSON line.
        results["serve"] = {
            k: v for k, v in served.items() if k not in ("config", "dev_client_secret")
        }
    print_summary(
        {
            "job": "pipeline",
            "lake": lake,
            "registry": registry,
            "stages": results,
            "stage_seconds": stages.seconds,
            "cluster_cpus": cluster.get("CPU"),
            "seconds": round(time.perf_counter() - started, 2),
        }
    )
    if served is not None:
        print_guide(served, stages.seconds)
        if not args.exit:
            keep_serving(config, lake, registry, local=not args.address)
    return 0


def submit_as_ray_jobs(
    dashboard_url: str, config_path: str, config: PipelineConfig, lake: str, registry: str
) -> int:
    """The same stages as Ray jobs (Ray Jobs SDK), one after the other; the working directory
    is uploaded, so the job code needs nothing outside it. Storage must be shared (URIs)."""
    from cluster.ray_jobs import PipelineParams, connect_client, run_stages

    ingest = config.ingest
    params = PipelineParams(
        lake=lake,
        registry=registry,
        source=ingest.source,
        symbols=tuple(ingest.symbols),
        path=ingest.path,
        start=ingest.start,
        end=ingest.end,
        pipeline_config=config_path,
        tune_config=config.tune,
        deploy=config.serve is not None,
        serve_config=config.serve,
        address=dashboard_url,
    )
    stages = ["ingest", "features"] + (["tune"] if config.tune else [])
    stages += ["deploy"] if config.serve else []
    started = time.perf_counter()
    statuses = run_stages(
        connect_client(dashboard_url),
        params,
        stages,
        run_id=time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        log_sink=lambda line: say(f"  job: {line}"),
    )
    print_summary(
        {
            "job": "pipeline",
            "mode": "ray-jobs",
            "address": dashboard_url,
            "stages": statuses,
            "seconds": round(time.perf_counter() - started, 2),
        }
    )
    return 0


def print_guide(served: dict[str, Any], seconds: dict[str, float]) -> None:
    serve_config: ServeConfig = served["config"]
    url = served["url"]
    lines = [
        "",
        "Quant-AI is up.",
        f"  API:             {url}   (GET /signal?symbol=..., POST /token, /models/current)",
        f"  metrics:         {url}/metrics",
        f"  Ray dashboard:   {dashboard_url()}",
        "  stages (s):      " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()),
        "  a token:         TOKEN=$(.venv/bin/python -m serve.api.tokens mint --sub me "
        "--config configs/serve/local.yaml)",
        f'  try:             curl -H "Authorization: Bearer $TOKEN" '
        f"'{url}/signal?symbol={serve_config.feed.symbols[0]}'",
    ]
    if served.get("dev_client"):
        lines.append(
            f"  dev client:      id {served['dev_client']}, secret {served['dev_client_secret']}"
            " (shown once; stored hashed)"
        )
    lines.append("  stop:            Ctrl-C (the local Ray and the service stop with it)")
    print("\n".join(lines), file=sys.stderr, flush=True)


def dashboard_url() -> str:
    import ray

    context = ray.get_runtime_context()
    with contextlib.suppress(Exception):
        from ray._private.worker import global_worker

        address = global_worker.node.address_info.get("webui_url")
        if address:
            return f"http://{address}"
    return f"(see `ray status`; GCS {context.gcs_address})"


def keep_serving(config: PipelineConfig, lake: str, registry: str, local: bool) -> None:
    """Serve until Ctrl-C/SIGTERM (both raise KeyboardInterrupt); re-train on the configured
    schedule meanwhile."""
    interval = config.retrain_interval_minutes
    idle = threading.Event()  # never set: only Ctrl-C/SIGTERM end the wait
    try:
        while True:
            idle.wait(None if interval is None else interval * 60)
            say(f"retraining (every {interval:g} min)")
            train_cycle(config, lake, registry, Stages(["ingest", "features", "tune"]))
    finally:
        if local:
            from ray import serve

            serve.shutdown()


if __name__ == "__main__":
    stop_on_sigterm()
    try:
        sys.exit(main())
    except KeyboardInterrupt as interrupt:
        say(f"stopped by {interrupt or 'SIGINT'}; the service and the local Ray stop with it")
        sys.exit(exit_status(interrupt))
