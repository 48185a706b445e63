"""A multi-node Ray cluster on one machine: a head and worker nodes as separate `ray start`
processes, for rehearsing cluster behaviour (where work is placed, what a lost node does) without
a second machine.

Each node is `ray start --block` in a process group of its own, so that everything the node runs
(its raylet, agents, object store and the workers executing tasks and actors) can be ended
together, as when the machine behind a node dies: `LocalCluster.kill_node` SIGKILLs that group.
Every node gets its own temporary directory (which keeps the machine's default "current cluster"
file, /tmp/ray/ray_current_cluster, untouched, so a bare `ray.init()` elsewhere never joins this
cluster), its own free ports, its logical CPUs, a custom resource named after it and a label
`quant-ai/node=<name>`. The cluster requires a token of its own (`RAY_AUTH_MODE=token`); the
user's ~/.ray/auth_token is neither read nor written. `client_env` holds what a client process
needs (address, token); `state_client` reads Ray's State API with the token.

Usage (also `python -m cluster.local_cluster --workers 2`, which serves until Ctrl-C)::

    with LocalCluster([NodeSpec("worker-1"), NodeSpec("worker-2")]) as c:
        client = connect_client(c.dashboard_url, c.token)  # cluster.ray_jobs
        ...
        c.kill_node("worker-1")
        c.add_node(NodeSpec("worker-3"))
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import psutil

from cluster.processes import gone, terminate
from cluster.ray_runtime import free_port

if TYPE_CHECKING:
    from ray.util.state.api import StateApiClient

NODE_LABEL: Final = "quant-ai/node"
"""The label every node carries, its value the node's name."""

START_TIMEOUT_S: Final = 120.0
"""How long a node may take to register with the cluster, in seconds (minutes of CPU contention
on a small machine are possible while other nodes start)."""

STOP_GRACE_S: Final = 15.0
"""How long a node has to stop after SIGTERM before its process group is SIGKILLed, in seconds."""

FAST_FAILURE_DETECTION: Final[Mapping[str, int]] = {
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 5,
}
"""The head's failure detection: a node whose raylet does not answer 5 health checks 1 s apart
is marked dead (Ray's defaults, 3 s x 5, take 15 s; a rehearsal of node loss need not wait)."""


class ClusterError(RuntimeError):
    """A node did not start, register or stop as expected; the message names its log."""


@dataclass(frozen=True)
class NodeSpec:
    """One node's shape: its name (also its custom resource and label value), logical CPUs, extra
    custom resources and labels, and its object store size in MiB."""

    name: str
    num_cpus: int = 1
    resources: Mapping[str, float] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    object_store_mb: int = 128

    def all_resources(self) -> dict[str, float]:
        return {self.name: 1.0, **self.resources}

    def all_labels(self) -> dict[str, str]:
        return {NODE_LABEL: self.name, **self.labels}


@dataclass
class LocalNode:
    """A started node: its spec, its `ray start --block` process (the leader of the node's
    process group), its temporary directory and log, and its Ray node id once registered."""

    spec: NodeSpec
    process: subprocess.Popen[bytes]
    temp_dir: Path
    log: Path
    node_id: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    def processes(self) -> list[psutil.Process]:
        """Every live process of the node: its process group and everything the node's leader
        started (Ray may move workers to process groups of their own)."""
        found: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            for process in psutil.Process(self.process.pid).children(recursive=True):
                found[process.pid] = process
        for process in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(process.pid) == self.process.pid:
                    found.setdefault(process.pid, process)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return list(found.values())

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class LocalCluster:
    """A Ray head and worker nodes on this machine, each a `ray start --block` process.

    `head` defaults to a node with 0 CPUs, so that tasks and actors that ask for a CPU (every
    `@ray.remote` default) run on the worker nodes; job drivers and the job supervisors, which
    ask for none, run on the head. `env` is added to every node's environment (and so to every
    worker process); the interpreter's directory is put first on PATH, so that `python` in a job's
    entrypoint is this interpreter. `base_dir` holds the nodes' temporary directories and logs and
    is removed by `stop` when the cluster created it (Ray's socket paths must stay short: leave it
    None for a fresh directory under the system's temp dir).
    """

    def __init__(
        self,
        workers: Sequence[NodeSpec] = (NodeSpec("worker-1"), NodeSpec("worker-2")),
        head: NodeSpec = NodeSpec("head", num_cpus=0),
        base_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        system_config: Mapping[str, Any] = FAST_FAILURE_DETECTION,
    ) -> None:
        self.head_spec = head
        self.worker_specs = list(workers)
        self._own_dir = base_dir is None
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="qa-rc-"))
        self.token = secrets.token_hex(32)
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.system_config = dict(system_config)
        self.nodes: dict[str, LocalNode] = {}
        self.killed: dict[str, LocalNode] = {}
        bin_dir = str(Path(sys.executable).parent)
        self._env = {
            **{k: v for k, v in os.environ.items() if k not in _CLIENT_VARIABLES},
            **(env or {}),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    # Addresses and clients -----------------------------------------------------------------

    @property
    def gcs_address(self) -> str:
        """The address nodes and drivers join (`ray.init(address=...)`, `--address`)."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard: Ray Jobs API (`cluster.ray_jobs.connect_client`) and State API."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def client_env(self) -> dict[str, str]:
        """The environment variables a client process needs to use this cluster: its address,
        its State API address and its token."""
        return {
            "RAY_ADDRESS": self.gcs_address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
        }

    def state_client(self) -> StateApiClient:
        """A client of Ray's State API (`ray.util.state`) that presents the cluster's token."""
        from ray.util.state.api import StateApiClient

        return StateApiClient(self.dashboard_url, headers={"Authorization": f"Bearer {self.token}"})

    def list_state(
        self, resource: str, filters: Sequence[tuple[str, str, Any]] = (), limit: int = 10_000
    ) -> list[Any]:
        """`ray.util.state` listing of `resource` ("nodes", "tasks", "actors", ...) with
        `filters` as (key, "=" or "!=", value), read through `state_client`."""
        from ray.util.state.common import ListApiOptions, StateResource

        options = ListApiOptions(filters=list(filters), limit=limit, detail=True)
        return list(
            self.state_client().list(
                StateResource(resource), options, raise_on_missing_output=False
            )
        )

    def node_names_by_id(self) -> dict[str, str]:
        """Every node the cluster has known (alive or dead), Ray node id -> node name."""
        return {
            node.node_id: node.labels.get(NODE_LABEL, "")
            for node in self.list_state("nodes")
            if node.labels
        }

    def node_state(self, name: str) -> str | None:
        """The newest state ("ALIVE", "DEAD") Ray records for the node called `name`."""
        node = self.nodes.get(name) or self.killed.get(name)
        node_id = node.node_id if node else ""
        for state in self.list_state("nodes"):
            if state.node_id == node_id or (not node_id and state.labels.get(NODE_LABEL) == name):
                return str(state.state)
        return None

    # Lifecycle -------------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        """Start the head, then every worker node; returns once all are registered."""
        try:
            self._start_node(self.head_spec, head=True)
            for spec in self.worker_specs:
                self._start_node(spec, head=False)
            for spec in [self.head_spec, *self.worker_specs]:
                self._await_registered(self.nodes[spec.name])
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(self, spec: NodeSpec) -> LocalNode:
        """Start one more worker node (a replacement for a killed one, say) and wait until Ray
        lists it alive."""
        if spec.name in self.nodes or spec.name in self.killed:
            raise ValueError(f"a node named {spec.name!r} was already started")
        node = self._start_node(spec, head=False)
        self._await_registered(node)
        return node

    def kill_node(self, name: str, timeout_s: float = 60.0) -> LocalNode:
        """SIGKILL every process of the worker node `name` (its raylet, object store, agents and
        workers: the node's process group), as a machine's sudden death does; returns once they
        are gone and Ray has marked the node dead."""
        if name == self.head_spec.name:
            raise ValueError("the head is not killed: the cluster ends with it")
        node = self.nodes.pop(name)
        self.killed[name] = node
        members = node.processes()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGKILL)
        for member in members:
            with contextlib.suppress(psutil.Error):
                member.kill()
        node.process.wait(timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while not all(gone(p) for p in members):
            if time.monotonic() > deadline:
                raise ClusterError(f"processes of node {name} outlived SIGKILL: {members}")
            time.sleep(0.1)
        while self.node_state(name) != "DEAD":
            if time.monotonic() > deadline:
                raise ClusterError(f"Ray did not mark node {name} dead within {timeout_s:.0f} s")
            time.sleep(0.5)
        return node

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL after `STOP_GRACE_S`) and remove the cluster's
        directory when the cluster created it."""
        # All nodes at once: each may take the whole grace period, and they end together.
        _stop_nodes([*self.nodes.values(), *self.killed.values()])
        self.nodes.clear()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # Internals -------------------------------------------------------------------------------

    def _start_node(self, spec: NodeSpec, head: bool) -> LocalNode:
        temp_dir = self.base_dir / spec.name
        temp_dir.mkdir(parents=True, exist_ok=True)
        command = [
            _ray_executable(),
            "start",
            "--block",
            f"--temp-dir={temp_dir}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={spec.num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(spec.all_resources())}",
            f"--labels={','.join(f'{k}={v}' for k, v in spec.all_labels().items())}",
            f"--object-store-memory={spec.object_store_mb * 1024 * 1024}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--disable-usage-stats",
        ]
        if head:
            command += [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
                f"--system-config={json.dumps(self.system_config)}",
            ]
        else:
            command.append(f"--address={self.gcs_address}")
        log = temp_dir / "ray-start.log"
        with open(log, "ab") as output:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,
            )
        node = LocalNode(spec, process, temp_dir, log)
        self.nodes[spec.name] = node
        return node

    def _await_registered(self, node: LocalNode, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until Ray's State API lists the node alive; record its node id."""
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                raise ClusterError(
                    f"node {node.name} exited with {node.process.returncode}; its log "
                    f"{node.log} ends:\n{node.log_tail()}"
                )
            try:
                for state in self.list_state("nodes", [("state", "=", "ALIVE")]):
                    if (state.labels or {}).get(NODE_LABEL) == node.name:
                        node.node_id = state.node_id
                        return
            except Exception as error:  # the dashboard is still starting
                last_error = error
            time.sleep(0.5)
        raise ClusterError(
            f"node {node.name} not registered after {timeout_s:.0f} s ({last_error}); its log "
            f"{node.log} ends:\n{node.log_tail()}"
        )


_CLIENT_VARIABLES: Final = frozenset(
    {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
)
"""Variables of the starting process that would point a node at another cluster."""


def _ray_executable() -> str:
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise ClusterError("the `ray` command is not installed beside this interpreter")
    return found


def _stop_nodes(nodes: Sequence[LocalNode]) -> None:
    """SIGTERM every process of the nodes (`ray start --block` then stops what it started),
    SIGKILL what is left after `STOP_GRACE_S` seconds, and reap the `ray start` processes."""
    terminate([p for node in nodes for p in node.processes()], grace_s=STOP_GRACE_S)
    for node in nodes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.process.wait(timeout=STOP_GRACE_S)


def main(argv: list[str] | None = None) -> int:
    """Start a head and `--workers` worker nodes, print how to reach them, serve until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    parser.add_argument("--cpus", type=int, default=1, help="logical CPUs per worker node")
    parser.add_argument("--head-cpus", type=int, default=0, help="logical CPUs of the head")
    args = parser.parse_args(argv)
    workers = [NodeSpec(f"worker-{i + 1}", num_cpus=args.cpus) for i in range(args.workers)]
    with LocalCluster(workers, NodeSpec("head", num_cpus=args.head_cpus)) as cluster:
        print(json.dumps({"dashboard": cluster.dashboard_url, **cluster.client_env}), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while all(node.process.poll() is None for node in cluster.nodes.values()):
                time.sleep(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
