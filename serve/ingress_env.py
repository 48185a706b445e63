"""The Ray Serve settings of the fast ingress path, as environment for Serve's processes.

Serve's default path sends every request through a Python HTTP proxy actor and then to the
replica: ~5.7 ms of CPU per request here, 0.07x plain uvicorn at 16 connections. With
`RAY_SERVE_THROUGHPUT_OPTIMIZED` the ingress replicas serve HTTP themselves (direct ingress, user
code on the replica's event loop, buffered request logs) and Serve's bundled HAProxy listens on
the configured port and routes to them: ~0.5 ms of CPU per request, ~0.6x plain uvicorn (see
BENCHMARKS.md). HAProxy also keeps one fixed port while replicas come and go.

Serve reads these flags when each of its processes starts, so they go into the Serve
controller's runtime environment (`serve.start(controller_options=...)`), which the proxies,
HAProxy manager and replicas inherit. HAProxy's files and admin ports are private to the
deployment, so two deployments on one machine do not collide.

A local deployment (this process started the Ray that Serve runs on) also starts HAProxy through
`serve.haproxy_launch`, so HAProxy ends with Serve's HAProxy manager and its stats and metrics
listeners bind to `admin_host` only; orphaned HAProxies of dead deployments are ended first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from cluster.ray_runtime import free_port, started_local_ray
from serve.haproxy import make_state_dir, reap_orphans, supervise

IngressMode = Literal["haproxy", "proxy"]


def ingress_env(
    mode: IngressMode, state_dir: str | None = None, admin_host: str = "127.0.0.1"
) -> dict[str, str]:
    """Environment variables for Serve's processes in `mode`.

    `admin_host` is the address of HAProxy's stats and metrics listeners (local deployments).
    """
    # Serve's HTTP servers (the proxy's, a direct-ingress replica's) are uvicorn with its
    # defaults, which replace the client address with X-Forwarded-For from loopback peers.
    # HAProxy connects from loopback and passes a client's own header through, so any caller
    # could pick its address. Trusting no one keeps the real peer; the API applies its own
    # `auth.trusted_proxies` rule.
    no_forwarded = {"FORWARDED_ALLOW_IPS": ""}
    if mode == "proxy":
        return no_forwarded
    directory = state_dir or str(make_state_dir())
    local = started_local_ray()
    if local:
        # They may hold the port this deployment is about to bind.
        reap_orphans()
    env = {
        **no_forwarded,
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        # One HAProxy thread saturates 2 cores' worth of Python replicas.
        "RAY_SERVE_HAPROXY_NBTHREAD": "1",
        # With metrics on, a Python actor parses one HAProxy log line per request (~10% of a
        # core at 2k req/s); our own /metrics already counts every request.
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{directory}/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{directory}/admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": directory,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{directory}/server-state",
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{directory}/metrics.sock",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        # Direct-ingress replicas drain >= 30 s on shutdown by default; a signal request takes
        # milliseconds.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }
    if local:
        env.update(supervise(Path(directory), admin_host))
    return env
