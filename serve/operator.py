"""The operator port of an ingress replica: the operator app on its own listener.

Ray Serve may place several ingress replicas on one node, each with its own metrics registry.
Each replica therefore binds the first free port of `operator.port` ..
`operator.port + operator.ports_per_node - 1` on `operator.bind_address` (127.0.0.1 unless
configured), serves `serve.api.operator`'s app there with uvicorn on a thread of its own, logs
the address, and writes a Prometheus `file_sd` target file
`<targets_dir>/<host>-<port>.json`: `[{"targets": ["host:port"], "labels": {...}}]`. Prometheus
(cluster/monitoring/prometheus/prometheus.yml) reads `*.json` of that folder, so every replica is
scraped on its own and counters are never mixed between replicas.

When the replica stops, `OperatorServer.stop` ends the listener, joins the thread and removes
the target file. A replica that dies without stopping leaves its file; the next replica started
on the node removes the files of its own host whose port no longer accepts connections.
A range with no free port is an `OperatorPortError` naming the range and what to change; in a
Serve replica's constructor that fails the replica, and Serve marks the deployment failed after
a few tries (three per replica) instead of restarting it for ever.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from configs.schema import OperatorConfig
from market.files import write_durably

log = logging.getLogger(__name__)

# Seconds to wait for the listener thread to start serving, and for it to end on stop.
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


class OperatorPortError(RuntimeError):
    """No port of the operator range could be bound."""


@dataclass(frozen=True)
class OperatorEndpoint:
    """Where one replica's operator app listens (`bind_address`, `port`) and the `host` that
    Prometheus is told to scrape (the node's IP address for a wildcard bind)."""

    bind_address: str
    port: int
    host: str

    @property
    def target(self) -> str:
        """`host:port` as a Prometheus target (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.target}/metrics"


def bind_first_free(address: str, first: int, count: int) -> socket.socket:
    """A listening TCP socket on the first free port of `first` .. `first + count - 1` at
    `address`; OperatorPortError when every port is taken or the address cannot be bound."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    last = first + count - 1
    for port in range(first, last + 1):
        sock = socket.socket(family, socket.SOCK_STREAM)
        # Lets a restarted replica rebind a port whose old connections linger in TIME_WAIT; a
        # port another socket listens on still fails with EADDRINUSE.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
            # Listening from here on: a target file is only ever written for a port that
            # accepts connections, which is what tells a live replica's file from a stale one.
            sock.listen(128)
        except OSError as error:
            sock.close()
            if error.errno == errno.EADDRINUSE:
                continue
            raise OperatorPortError(
                f"cannot bind the operator port {address}:{port}: {error.strerror}; check "
                "serve.operator.bind_address"
            ) from error
        return sock
    raise OperatorPortError(
        f"no free operator port on {address} in {first}-{last}: every port of the range is in "
        f"use (other ingress replicas on this node, or other programs). Raise "
        f"serve.operator.ports_per_node ({count}) above the number of ingress replicas per "
        "node, or move serve.operator.port to a free range"
    )


def advertised_host(bind_address: str, node_ip: str | None) -> str:
    """The host Prometheus should scrape: the bind address, or for a wildcard bind the node's
    IP address (`node_ip`, loopback when unknown)."""
    if ipaddress.ip_address(bind_address).is_unspecified:
        return node_ip or ("::1" if ":" in bind_address else "127.0.0.1")
    return bind_address


def target_file(directory: Path, endpoint: OperatorEndpoint) -> Path:
    """The file_sd file of `endpoint`: one per host and port, so a replica that takes over a
    dead one's port replaces its file."""
    return directory / f"{endpoint.host.replace(':', '_')}-{endpoint.port}.json"


def write_target_file(directory: Path, endpoint: OperatorEndpoint, labels: dict[str, str]) -> Path:
    """Write `endpoint`'s Prometheus file_sd target file atomically (Prometheus may read the
    folder at any moment) and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = target_file(directory, endpoint)
    groups = [{"targets": [endpoint.target], "labels": labels}]
    write_durably(path, json.dumps(groups, indent=1) + "\n")
    return path


def read_targets(directory: Path, since: float = 0.0) -> list[str]:
    """The targets of the file_sd files in `directory` modified at or after `since` (epoch
    seconds), sorted; unreadable files are skipped (one may be mid-replacement)."""
    targets: set[str] = set()
    for path in directory.glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            if path.stat().st_mtime < since:
                continue
            for group in json.loads(path.read_text(encoding="utf-8")):
                targets.update(group.get("targets", []))
    return sorted(targets)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def prune_stale_targets(directory: Path, host: str) -> list[Path]:
    """Remove the target files of `host` whose port accepts no connection (replicas that died
    without stopping); files of other hosts are left to their own nodes. Returns those removed."""
    removed = []
    for path in sorted(directory.glob("*.json")):
        try:
            groups: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
            targets = [t for g in groups for t in g.get("targets", [])]
        except (OSError, ValueError):
            continue
        ours = [t for t in targets if t.rsplit(":", 1)[0].strip("[]") == host]
        if not ours or len(ours) != len(targets):
            continue
        if not any(_accepts(host, int(t.rsplit(":", 1)[1])) for t in ours):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


class OperatorServer:
    """The operator app of one replica on the first free port of the configured range."""

    def __init__(
        self,
        app: Any,
        config: OperatorConfig,
        *,
        labels: dict[str, str] | None = None,
        node_ip: str | None = None,
    ) -> None:
        self.app = app
        self.config = config
        self.labels = labels or {}
        self.node_ip = node_ip
        self.endpoint: OperatorEndpoint | None = None
        self.target_path: Path | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> OperatorEndpoint:
        """Bind, serve on a daemon thread, write the target file; the endpoint once serving.
        OperatorPortError when no port of the range is free."""
        config = self.config
        sock = bind_first_free(config.bind_address, config.port, config.ports_per_node)
        port = sock.getsockname()[1]
        host = advertised_host(config.bind_address, self.node_ip)
        endpoint = OperatorEndpoint(config.bind_address, port, host)
        server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=1,
            )
        )
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="operator-http", daemon=True
        )
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                sock.close()
                raise OperatorPortError(f"the operator app did not start on {endpoint.target}")
            time.sleep(0.005)
        # The socket now belongs to uvicorn's server, which closes it on shutdown.
        self.endpoint = endpoint
        if config.targets_dir is not None:
            directory = Path(config.targets_dir)
            directory.mkdir(parents=True, exist_ok=True)
            for stale in prune_stale_targets(directory, host):
                log.info("removed the stale Prometheus target file %s", stale)
            self.target_path = write_target_file(directory, endpoint, self.labels)
        # At warning level: Serve's replicas log at WARNING (serve.deploy), and where the
        # operator port landed is what an operator looks for in the replica's log.
        log.warning(
            "operator endpoint (metrics, detailed readiness) on %s, bound to %s:%d%s",
            endpoint.metrics_url,
            config.bind_address,
            port,
            f"; Prometheus target file {self.target_path}" if self.target_path else "",
        )
        return endpoint

    def stop(self) -> None:
        """End the listener, join its thread and remove the target file (idempotent)."""
        if self.target_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.target_path.unlink()
            self.target_path = None
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("the operator listener thread did not end in %.0f s", STOP_TIMEOUT_S)
        self._server = self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
