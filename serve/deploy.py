"""Deploying the signal API on Ray Serve: the configuration it runs with, the deployment itself,
waiting until it answers, and serving until the process is stopped.

`python -m jobs.deploy` and `python -m jobs.pipeline` deploy through here; so does the serve
benchmark, so that what it measures is what the jobs deploy.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import httpx

from cluster.ray_runtime import connect, local_ray_lost_processes
from configs.schema import (
    DEFAULT_GOLD_URL,
    FeedConfig,
    GoldConfig,
    IngestConfig,
    ObjectStoreConfig,
    ServeConfig,
)
from market.lake import Lake
from market.sources.sim import universe_symbols
from market.storage import is_uri, local_path, object_store_settings
from serve.operator import read_targets

APP_NAME = "quant-ai"


def gold_for_lake(gold: GoldConfig, lake: str | None) -> GoldConfig:
    """The Gold store to use beside `lake`.

    The default URL (`DEFAULT_GOLD_URL`) stands for "no store of its own": with a local lake it
    becomes the lake's SQLite store, next to the lake's other zones (an object-store lake has
    no place for a SQLite file: the default stays). Any other URL (a PostgreSQL
    server, a SQLite file chosen on purpose) was configured deliberately and is kept.
    """
    if lake is None or gold.url != DEFAULT_GOLD_URL or local_path(lake) is None:
        # A SQLite file cannot live on an object store: such a lake keeps the configured URL.
        return gold
    return gold.model_copy(update={"url": Lake.at(lake).gold_sqlite_url})


def feed_for(ingest: IngestConfig, feed: FeedConfig) -> FeedConfig:
    """The live feed of the symbols a pipeline trained on, from the same kind of source.

    The simulator replay keeps the serve config's own seed and dates, so served signals are out
    of sample; a dump replays the ingested file; Binance polls the same base URL.
    """
    updates: dict[str, Any] = {"source": ingest.source, "symbols": list(ingest.symbols)}
    if ingest.source == "dump":
        updates["dump_path"] = ingest.path
    return feed.model_copy(update=updates)


def universe_feed(feed: FeedConfig, count: int) -> FeedConfig:
    """`feed` serving `count` more simulated symbols, SIM0001.. (`universe_symbols`), besides its
    own: the live feed becomes the simulator replay (the serve config's seed, dates and clock),
    so a model trained on a few symbols serves a whole universe it never saw."""
    extra = [symbol for symbol in universe_symbols(count) if symbol not in feed.symbols]
    symbols = list(feed.symbols) if feed.source == "sim" else []
    return feed.model_copy(update={"source": "sim", "symbols": symbols + extra})


def resolve_config(
    config: ServeConfig,
    *,
    registry: str | None = None,
    lake: str | None = None,
    port: int | None = None,
    host: str | None = None,
    feed: FeedConfig | None = None,
    object_store: ObjectStoreConfig | None = None,
) -> ServeConfig:
    """`config` with the given overrides (None or empty keeps the config's value), the Gold
    store placed by `gold_for_lake`, the object store's unset fields taken from this process's
    AWS environment (`object_store` replaces the config's section first), and local paths made
    absolute (`absolute_paths`)."""
    overrides = {"registry": registry, "port": port, "host": host, "feed": feed}
    updates: dict[str, Any] = {key: value for key, value in overrides.items() if value}
    updates["gold"] = gold_for_lake(config.gold, lake)
    updates["object_store"] = object_store_settings(object_store or config.object_store)
    return absolute_paths(config.model_copy(update=updates))


def _absolute(path: str) -> str:
    return path if is_uri(path) or Path(path).is_absolute() else str(Path(path).resolve())


def absolute_paths(config: ServeConfig) -> ServeConfig:
    """Local paths made absolute: Serve's replica processes need not share our working dir."""
    jwt = config.auth.jwt
    auth = config.auth.model_copy(
        update={
            "clients_file": _absolute(config.auth.clients_file),
            "jwt": jwt.model_copy(
                update={
                    name: _absolute(value)
                    for name in ("secret_file", "public_key_file", "private_key_file")
                    if (value := getattr(jwt, name)) is not None
                }
            ),
        }
    )
    gold = config.gold
    if gold.url.startswith("sqlite:///") and not gold.url.startswith("sqlite:////"):
        gold = gold.model_copy(update={"url": "sqlite:///" + _absolute(gold.url[10:])})
    feed = config.feed
    if feed.dump_path is not None:
        feed = feed.model_copy(update={"dump_path": _absolute(feed.dump_path)})
    operator = config.operator
    if operator.targets_dir is not None:
        operator = operator.model_copy(update={"targets_dir": _absolute(operator.targets_dir)})
    return config.model_copy(
        update={
            "registry": _absolute(config.registry),
            "auth": auth,
            "gold": gold,
            "feed": feed,
            "operator": operator,
        }
    )


class DeployFailedError(RuntimeError):
    """Serve gave up on the application (e.g. a replica constructor kept failing)."""


def wait_until_ok(
    url: str,
    timeout_s: float,
    headers: Mapping[str, str] | None = None,
    poll_s: float = 0.5,
) -> None:
    """GET `url` every `poll_s` seconds until it answers 200; TimeoutError after `timeout_s`
    seconds. Connection errors count as "not yet": the server may still be starting."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, headers=headers, timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 in {timeout_s:.0f} s")
        time.sleep(poll_s)


def deploy_failure(app_name: str = APP_NAME) -> str | None:
    """Why Serve gave up on `app_name` (its status DEPLOY_FAILED): each failed deployment with
    the last line of its status message, which is the exception its replica constructor raised
    (`serve status` shows the whole traceback). None while Serve has not given up."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus, DeploymentStatus

    application = serve.status().applications.get(app_name)
    if application is None or application.status != ApplicationStatus.DEPLOY_FAILED:
        return None
    failed = []
    for name, deployment in application.deployments.items():
        if deployment.status in (DeploymentStatus.DEPLOY_FAILED, DeploymentStatus.UNHEALTHY):
            lines = [line.strip() for line in deployment.message.splitlines() if line.strip()]
            failed.append(f"{name}: {lines[-1] if lines else deployment.status.value}")
    summary = f"Serve application {app_name} failed to deploy (`serve status` has the traceback)"
    return "; ".join([summary, *failed])


def deploy(config: ServeConfig, address: str | None, timeout_s: float = 180.0) -> dict[str, Any]:
    """Start Serve's HTTP proxies on the configured host/port (on every node with a replica, or
    on the head alone: `proxy_location`), run the app, wait for /healthz.

    Returns the API's base URL, the application name, the seconds from `serve.run` to the
    first healthy answer and `metrics`: the operator endpoints' metrics URLs that the ingress
    replicas registered in `operator.targets_dir` (empty without one). TimeoutError when
    /healthz does not answer within `timeout_s` seconds; DeployFailedError with the replicas'
    exception when Serve gives up on the application (after three failed starts per replica;
    an ingress replica that finds no free operator port, say).
    """
    from ray import serve
    from ray.serve.schema import LoggingConfig

    from serve.app import build_app
    from serve.ingress_env import ingress_env

    connect(config.ray, address)
    serve.start(
        proxy_location=config.proxy_location,
        http_options={"host": config.host, "port": config.port},
        controller_options={"runtime_env": {"env_vars": ingress_env(config.ingress_mode)}},
    )
    started = time.perf_counter()
    started_wall = time.time()
    try:
        serve.run(
            build_app(config),
            name=APP_NAME,
            route_prefix="/",
            blocking=False,
            # Access logs cost CPU on every request; /metrics counts requests by route and status.
            logging_config=LoggingConfig(enable_access_log=False, log_level="WARNING"),
        )
    except RuntimeError as error:
        # serve.run waits for the application and, when Serve gives up on it, names only the
        # deployment; the reason is in that deployment's status.
        reason = deploy_failure()
        if reason is None:
            raise
        raise DeployFailedError(reason) from error
    # A wildcard bind is reached through loopback from here.
    local_host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    url = f"http://{local_host}:{config.port}"
    wait_until_ok(f"{url}/healthz", timeout_s)
    targets_dir = config.operator.targets_dir
    # Replicas write their target file in their constructor, before they serve /healthz.
    targets = read_targets(Path(targets_dir), since=started_wall - 1.0) if targets_dir else []
    return {
        "url": url,
        "app": APP_NAME,
        "seconds_to_healthy": round(time.perf_counter() - started, 2),
        "metrics": [f"http://{target}/metrics" for target in targets],
    }


def serve_until_stopped(
    shutdown: bool,
    repeat: Callable[[], None] | None = None,
    every_s: float | None = None,
) -> NoReturn:
    """Block until interrupted, calling `repeat` every `every_s` seconds meanwhile.

    Ctrl-C (and SIGTERM, which the job CLIs raise as KeyboardInterrupt through
    `cluster.processes.stop_on_sigterm`) propagates to the caller after the cleanup: with
    `shutdown`, Serve is shut down on the way out, since a local Ray's service ends with the
    process that started it while one deployed to a cluster keeps running.
    """
    if threading.current_thread() is threading.main_thread():
        # Ray Tune and PySpark leave their own SIGINT handlers installed after a sweep or a
        # Spark session (Tune's swallows Ctrl-C; PySpark's fails once its context is gone):
        # while serving, Ctrl-C is a plain KeyboardInterrupt again.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    idle = threading.Event()  # never set: only an interrupt ends the wait
    try:
        while True:
            idle.wait(every_s if repeat is not None else None)
            if repeat is not None:
                repeat()
    finally:
        # Serve waits 30 s for a controller that a group-wide signal has already stopped.
        if shutdown and not local_ray_lost_processes():
            from ray import serve

            serve.shutdown()
