"""`python -m jobs.deploy`: deploy the signal API (Ray Serve, FastAPI ingress) and wait until it
answers `/healthz`. On a cluster it returns once deployed; with a local Ray it keeps serving until
interrupted (the local Ray ends with this process)."""

from __future__ import annotations

import sys

from cluster.ray_runtime import cluster_address
from configs.schema import DEFAULT_SERVE_CONFIG, ServeConfig, load_config
from jobs._cli import base_parser, print_summary, run, setup_logging, summary_stays_last
from market.storage import resolve
from serve.deploy import deploy, resolve_config, serve_until_stopped


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--config", default=DEFAULT_SERVE_CONFIG, help="serve YAML (ServeConfig)")
    parser.add_argument("--registry", help="model registry directory or URI (overrides config)")
    parser.add_argument(
        "--lake", help="lake: the default Gold store goes to <lake>/gold/ on a local lake"
    )
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
    config = resolve_config(
        load_config(args.config, ServeConfig),
        registry=args.registry,
        lake=args.lake,
        port=args.port,
        host=args.host,
    )
    # An unusable registry (unreachable store, missing bucket) fails here, before Ray starts.
    resolve(config.registry, config.object_store)
    on_cluster = cluster_address(config.ray, args.address) is not None
    summary = deploy(config, args.address)
    print_summary({"job": "deploy", "registry": config.registry, **summary})
    if on_cluster or args.detach:
        return 0
    print(
        f"[deploy] serving {summary['url']} on a local Ray; Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    summary_stays_last()
    serve_until_stopped(shutdown=True)


if __name__ == "__main__":
    run(main, "deploy")
