"""Connecting to a Ray cluster, or starting a local one."""

from __future__ import annotations

import os
from typing import Any

import ray

from configs.schema import RayConfig


def connect(config: RayConfig | None = None, address: str | None = None) -> dict[str, Any]:
    """Attach to the Ray cluster at `address`, `RAY_ADDRESS`, or the configured address.

    With none of them set a local Ray is started with the configured CPU count. Returns the
    cluster's resources. Calling it again in the same process reuses the connection.
    """
    config = config or RayConfig()
    target = address or os.environ.get("RAY_ADDRESS") or config.address
    if not ray.is_initialized():
        if target:
            ray.init(address=target, namespace=config.namespace, log_to_driver=True)
        else:
            ray.init(
                num_cpus=config.num_cpus,
                namespace=config.namespace,
                include_dashboard=config.include_dashboard,
                log_to_driver=True,
                object_store_memory=config.object_store_memory_mb * 1024 * 1024
                if config.object_store_memory_mb
                else None,
            )
    return dict(ray.cluster_resources())


def shutdown() -> None:
    """Disconnect from Ray (stops a local Ray this process started)."""
    if ray.is_initialized():
        ray.shutdown()
