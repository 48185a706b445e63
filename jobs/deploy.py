"""`python -m jobs.deploy`: deploy the signal API (Ray Serve, FastAPI ingress) and wait until it
answers `/healthz`. On a cluster it returns once deployed; with a local Ray it keeps serving until
interrupted (the local Ray ends with this process)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from cluster.ray_runtime import connect
from configs.schema import ServeConfig, load_config
from jobs._cli import base_parser, print_summary, setup_logging
from market.lake import Lake

DEFAULT_CONFIG = "configs/serve/local.yaml"
APP_NAME = "quant-ai"


def resolve_config(args: Any) -> ServeConfig:
    config = load_config(args.config, ServeConfig)
    updates: dict[str, Any] = {}
    if args.registry:
        updates["registry"] = args.registry
    if args.port:
        updates["port"] = args.port
    if args.host:
        updates["host"] = args.host
    if args.lake and config.gold.url == "sqlite:///var/gold.sqlite":
        # Next to the lake's other zones, unless the config names a store of its own.
        gold_url = Lake.at(args.lake).gold_sqlite_url
        updates["gold"] = config.gold.model_copy(update={"url": gold_url})
    return absolute_paths(config.model_copy(update=updates))


def _absolute(path: str) -> str:
    return path if "://" in path or Path(path).is_absolute() else str(Path(path).resolve())


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
    return config.model_copy(
        update={"registry": _absolute(config.registry), "auth": auth, "gold": gold, "feed": feed}
    )


def deploy(config: ServeConfig, address: str | None, timeout_s: float = 180.0) -> dict[str, Any]:
    """Start Serve's HTTP proxy on the configured host/port, run the app, wait for /healthz."""
    from ray import serve
    from ray.serve.schema import LoggingConfig

    from serve.app import build_app
    from serve.ingress_env import ingress_env

    connect(config.ray, address)
    serve.start(
        http_options={"host": config.host, "port": config.port},
        controller_options={"runtime_env": {"env_vars": ingress_env(config.ingress_mode)}},
    )
    started = time.perf_counter()
    serve.run(
        build_app(config),
        name=APP_NAME,
        route_prefix="/",
        blocking=False,
        # Access logs cost CPU on every request; /metrics counts requests by route and status.
        logging_config=LoggingConfig(enable_access_log=False, log_level="WARNING"),
    )
    # A wildcard bind is reached through loopback from here.
    local_host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    url = f"http://{local_host}:{config.port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the signal API did not answer {url}/healthz in {timeout_s:.0f} s")
        time.sleep(0.5)
    return {
        "url": url,
        "app": APP_NAME,
        "seconds_to_healthy": round(time.perf_counter() - started, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="serve YAML (ServeConfig)")
    parser.add_argument("--registry", help="model registry directory or URI (overrides config)")
    parser.add_argument("--lake", help="lake directory: the Gold store goes to <lake>/gold/")
    parser.add_argument("--port", type=int, help="HTTP port (overrides the config)")
    parser.add_argument(
        "--host", help="address to bind, e.g. 0.0.0.0 in a container (overrides the config)"
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="return once deployed even with a local Ray (which then stops with this process)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    config = resolve_config(args)
    on_cluster = bool(args.address or os.environ.get("RAY_ADDRESS") or config.ray.address)
    summary = deploy(config, args.address)
    print_summary({"job": "deploy", "registry": config.registry, **summary})
    if on_cluster or args.detach:
        return 0
    print(
        f"[deploy] serving {summary['url']} on a local Ray; Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    from ray import serve

    serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
