"""Connecting to a Ray cluster, or starting a local one."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from typing import Any

import ray

from configs.schema import RayConfig


def cluster_address(config: RayConfig | None = None, address: str | None = None) -> str | None:
    """The Ray cluster to attach to: `address`, else `RAY_ADDRESS`, else the configured one;
    None when a local Ray is to be started."""
    return address or os.environ.get("RAY_ADDRESS") or (config or RayConfig()).address or None


def connect(config: RayConfig | None = None, address: str | None = None) -> dict[str, Any]:
    """Attach to the Ray cluster at `address`, `RAY_ADDRESS`, or the configured address.

    With none of them set a local Ray is started with the configured CPU count. Returns the
    cluster's resources. Calling it again in the same process reuses the connection.
    """
    global _started_local
    config = config or RayConfig()
    target = cluster_address(config, address)
    if not ray.is_initialized():
        if target:
            ray.init(address=target, namespace=config.namespace, log_to_driver=True)
        else:
            dashboard_port = _pin_state_api_address(config.include_dashboard)
            handler = signal.getsignal(signal.SIGTERM)
            ray.init(
                num_cpus=config.num_cpus,
                namespace=config.namespace,
                include_dashboard=config.include_dashboard,
                dashboard_host="127.0.0.1",
                dashboard_port=dashboard_port,
                log_to_driver=True,
                object_store_memory=config.object_store_memory_mb * 1024 * 1024
                if config.object_store_memory_mb
                else None,
            )
            _started_local = True
            # ray.init replaces a SIGTERM handler of ours with a plain exit, which would skip
            # the caller's shutdown path (stopping Serve); the default action it may replace.
            if handler not in (signal.SIG_DFL, None) and threading.current_thread() is (
                threading.main_thread()
            ):
                signal.signal(signal.SIGTERM, handler)
    return dict(ray.cluster_resources())


def dashboard_url() -> str:
    """The connected Ray's dashboard URL, or a hint where to find it when Ray does not say."""
    context = ray.get_runtime_context()
    # The address is only exposed by Ray's private worker state; its absence is not an error.
    with contextlib.suppress(Exception):
        from ray._private.worker import global_worker

        address = global_worker.node.address_info.get("webui_url")
        if address:
            return f"http://{address}"
    return f"(see `ray status`; GCS {context.gcs_address})"


# Environment variables `connect` set for the local Ray it started, with the values they had
# before (None: unset); `shutdown` restores them.
_SAVED: dict[str, str | None] = {}
# True while this process runs a local Ray that `connect` started.
_started_local = False


def started_local_ray() -> bool:
    """Whether this process started the Ray it is connected to (which ends with it)."""
    return ray.is_initialized() and _started_local


def local_ray_lost_processes(wait_s: float = 1.0) -> bool:
    """Whether the local Ray this process started has lost any of its processes, watched for up
    to `wait_s` seconds: a signal to the whole process group (a terminal's Ctrl-C, a container
    stop) ends them together with us, and then there is no controller left to shut down."""
    node = getattr(ray._private.worker, "_global_node", None)
    if not started_local_ray() or node is None:
        return False
    deadline = time.monotonic() + wait_s
    while not node.dead_processes():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def free_port() -> int:
    """A TCP port free on loopback now (for local services started next)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pin_state_api_address(include_dashboard: bool) -> int | None:
    """Point RAY_API_SERVER_ADDRESS at the local Ray about to start: its dashboard's port,
    chosen here and returned, or no address at all without a dashboard.

    Ray's State API finds the dashboard by auto-detecting "the" local Ray instance, which fails
    with "Found multiple active Ray instances" when another Ray runs on the same machine (a
    deployed service beside a sweep, parallel test sessions). Ray Train's placement-group
    cleaner uses that API to free the workers of trials ASHA stops; when it fails, or reaches
    another instance and finds no such controller there, the freed CPUs leak and the next trial
    waits forever. A value inherited from a parent process names the parent's Ray, never the
    one started here, so it is replaced (and restored by `shutdown`). The variable is set
    before `ray.init`, so the raylet and every worker it starts inherit it.
    """
    _SAVED["RAY_API_SERVER_ADDRESS"] = os.environ.get("RAY_API_SERVER_ADDRESS")
    if not include_dashboard:
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        return None
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    return port


def shutdown() -> None:
    """Disconnect from Ray (stops a local Ray this process started)."""
    global _started_local
    if ray.is_initialized():
        ray.shutdown()
    for name, value in _SAVED.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _SAVED.clear()
    _started_local = False
