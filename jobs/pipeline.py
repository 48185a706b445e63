"""`python -m jobs.pipeline`: what `make run` runs. Ingest -> Silver (Spark on Ray) -> sweep and
promotion gate -> the signal API on Ray Serve, then one `/signal` call per symbol.

With a local Ray the service keeps running until Ctrl-C (it lives in this process's Ray); with
`retrain_interval_minutes` set, ingest -> features -> tune -> gate re-run on that schedule and
the service picks up a newly promoted model by itself (it follows the registry's alias).
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

import httpx

from cluster.etl import run_feature_etl
from cluster.ray_runtime import cluster_address, connect, dashboard_url
from configs.schema import (
    DEFAULT_PIPELINE_CONFIG,
    SOURCES,
    PipelineConfig,
    ServeConfig,
    TuneJobConfig,
    load_config,
)
from jobs._cli import base_parser, print_summary, run, setup_logging, summary_stays_last
from market.ingest import run_ingest
from market.lake import Lake
from market.storage import object_store_settings, resolve
from serve.deploy import (
    deploy,
    feed_for,
    resolve_config,
    serve_until_stopped,
    universe_feed,
    wait_until_ok,
)
from serve.haproxy import PortBusyError, check_serve_ports


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
    """Ingest -> features -> (tune -> gate): the part the retraining schedule repeats.
    `config.object_store` is complete here (`main` filled it from the environment)."""
    ingest_cfg = config.ingest
    store = config.object_store
    results: dict[str, Any] = {}
    with stages.stage("ingest", f"{ingest_cfg.source} {','.join(ingest_cfg.symbols)}"):
        results["ingest"] = run_ingest(ingest_cfg, lake, store)
    with stages.stage("features", f"Spark on Ray -> {Lake.at(lake).silver_location}"):
        features = run_feature_etl(config.spark, lake, store)
    results["features"] = features
    say(
        f"Silver at {features['silver']} ({features['rows_out']} rows in, "
        f"{features['rows_written']} written; quarantined {features['quarantined']}; "
        f"gaps {features['gaps']})"
    )
    if config.tune:
        job = load_config(config.tune, TuneJobConfig)
        runs = resolve(config.runs, store, probe=False)
        out = runs / f"tune-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        with stages.stage("tune", f"{config.tune} ({job.num_samples} trials) -> {out}"):
            from models.selection import run_selection

            selection = run_selection(
                lake,
                registry,
                job,
                out,
                object_store=store,
                progress=lambda line: say(f"  tune: {line}"),
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


def serve_stage(
    config: PipelineConfig,
    registry: str,
    lake: str,
    address: str | None,
    universe: int | None = None,
) -> dict[str, Any]:
    """Deploy the API, mint an operator token, call /signal for each symbol (with `universe`,
    the live feed also serves that many simulated symbols, and only the trained symbols and the
    first of the universe are called)."""
    from serve.api.auth import TokenService
    from serve.api.clients import ClientStore
    from serve.api.tokens import ensure_dev_secrets, token_subject

    assert config.serve is not None
    serve_config = load_config(config.serve, ServeConfig)
    serve_config = resolve_config(
        serve_config,
        registry=registry,
        lake=lake,
        feed=feed_for(config.ingest, serve_config.feed),
        object_store=config.object_store,
    )
    if universe:
        serve_config = serve_config.model_copy(
            update={"feed": universe_feed(serve_config.feed, universe)}
        )
        say(f"serving {len(serve_config.feed.symbols)} simulated symbols live")
    created = ensure_dev_secrets(serve_config.auth)
    deployed = deploy(serve_config, address)
    tokens = TokenService.from_config(serve_config.auth.jwt)
    # The API accepts only tokens of registered, enabled clients: mint for one of them.
    subject = token_subject(ClientStore.load(serve_config.auth.clients_file), "signals:read")
    if subject is None:
        say(f"no enabled client with signals:read in {serve_config.auth.clients_file}")
        subject = "none"
    token, _ = tokens.mint(subject, ["signals:read"])
    headers = {"Authorization": f"Bearer {token}"}
    answers: dict[str, Any] = {}
    # Not ready within a minute (features still warming up): the calls below then show why.
    with contextlib.suppress(TimeoutError):
        wait_until_ok(f"{deployed['url']}/readyz", timeout_s=60)
    with httpx.Client(base_url=deployed["url"], timeout=30.0) as client:
        symbols = serve_config.feed.symbols
        # With a universe: the trained symbols (when still served) and the first new one.
        for symbol in symbols[: len(symbols) - universe + 1] if universe else symbols:
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
    parser.add_argument("--config", default=DEFAULT_PIPELINE_CONFIG, help="pipeline YAML")
    parser.add_argument("--lake", help="lake: a path or URI (overrides the config)")
    parser.add_argument("--registry", help="model registry: a path or URI (overrides the config)")
    parser.add_argument("--source", choices=SOURCES, help="kline source")
    parser.add_argument("--symbols", help="comma-separated symbols (overrides the config)")
    parser.add_argument("--path", help="dump file or glob (--source dump)")
    parser.add_argument("--skip-tune", action="store_true", help="stop after Silver")
    parser.add_argument("--skip-serve", action="store_true", help="do not deploy the API")
    parser.add_argument(
        "--exit", action="store_true", help="stop the service and exit after the summary"
    )
    parser.add_argument(
        "--universe",
        type=int,
        metavar="N",
        help="train as configured, then serve N more simulated symbols live (SIM0001..)",
    )
    parser.add_argument(
        "--ray-jobs",
        metavar="DASHBOARD_URL",
        help="submit each stage as a Ray job to the cluster whose dashboard is at this URL "
        "(e.g. http://ray-head:8265) instead of running the stages in this driver; the jobs get "
        "the object store's endpoint and region, never its credentials: the cluster's nodes hold "
        "their own (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)",
    )
    args = parser.parse_args(argv)
    if args.universe is not None and args.universe < 1:
        parser.error("--universe needs at least one symbol")
    if args.universe and args.ray_jobs:
        parser.error("--universe is not supported with --ray-jobs")
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
    # The object store's unset fields come from this driver's environment, once: every stage
    # and every task on any node then reaches the same store. Locations this run cannot use
    # fail here, before Ray starts (one line, exit status 2).
    config = config.model_copy(update={"object_store": object_store_settings(config.object_store)})
    for location in (lake, registry, config.runs):
        resolve(location, config.object_store)
    if args.ray_jobs:
        return submit_as_ray_jobs(args.ray_jobs, args.config, config, lake, registry)
    if config.serve and cluster_address(config.ray, args.address) is None:
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
            served = serve_stage(config, registry, lake, args.address, args.universe)
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
            summary_stays_last()
            keep_serving(config, lake, registry, local=not args.address)
    return 0


def submit_as_ray_jobs(
    dashboard: str, config_path: str, config: PipelineConfig, lake: str, registry: str
) -> int:
    """The same stages as Ray jobs (Ray Jobs SDK), one after the other; the working directory
    is uploaded, so the job code needs nothing outside it. Storage must be shared (URIs)."""
    from cluster.ray_jobs import PipelineParams, connect_client, run_stages

    params = PipelineParams.from_pipeline_config(config, config_path, lake, registry, dashboard)
    stages = ["ingest", "features"] + (["tune"] if config.tune else [])
    stages += ["deploy"] if config.serve else []
    started = time.perf_counter()
    statuses = run_stages(
        connect_client(dashboard),
        params,
        stages,
        run_id=time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        log_sink=lambda line: say(f"  job: {line}"),
    )
    print_summary(
        {
            "job": "pipeline",
            "mode": "ray-jobs",
            "address": dashboard,
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
        # The operator endpoints the ingress replicas registered (serve.operator).
        "  metrics:         "
        + (
            ", ".join(served.get("metrics") or [])
            or f"operator port {serve_config.operator.bind_address}:{serve_config.operator.port}"
        )
        + "   (operator port)",
        f"  Ray dashboard:   {dashboard_url()}",
        "  stages (s):      " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()),
        "  a token:         TOKEN=$(.venv/bin/python -m serve.api.tokens mint --sub dev "
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


def keep_serving(config: PipelineConfig, lake: str, registry: str, local: bool) -> None:
    """Serve until Ctrl-C/SIGTERM; re-train on the configured schedule meanwhile."""
    interval = config.retrain_interval_minutes

    def retrain() -> None:
        say(f"retraining (every {interval:g} min)")
        train_cycle(config, lake, registry, Stages(["ingest", "features", "tune"]))

    serve_until_stopped(
        shutdown=local, repeat=retrain, every_s=None if interval is None else interval * 60
    )


if __name__ == "__main__":
    run(main, "pipeline")
