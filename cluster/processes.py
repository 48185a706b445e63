"""Local processes a service leaves behind: who holds a port, whether an owner is still alive,
ending processes, and SIGTERM delivered like Ctrl-C."""

from __future__ import annotations

import contextlib
import errno
import json
import signal
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import psutil


class Stopped(KeyboardInterrupt):
    """SIGTERM raised in the main thread, so that every Ctrl-C path (cleanup, exit) runs too."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, _frame: FrameType | None) -> None:
    raise Stopped(signum)


def stop_on_sigterm() -> None:
    """Make SIGTERM raise `Stopped` (a KeyboardInterrupt) in the main thread."""
    signal.signal(signal.SIGTERM, _raise_stopped)


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """The shell's status for a process ended by this interrupt: 128 + signal number."""
    return 128 + (interrupt.signum if isinstance(interrupt, Stopped) else signal.SIGINT)


@dataclass(frozen=True)
class Owner:
    """A process identified by pid and start time (seconds since the epoch), so that a reused
    pid is not mistaken for the owner."""

    pid: int
    create_time: float

    @classmethod
    def current(cls) -> Owner:
        return cls(psutil.Process().pid, psutil.Process().create_time())

    def alive(self) -> bool:
        try:
            process = psutil.Process(self.pid)
            # create_time is rounded differently across reads; 10 ms tells processes apart.
            same = abs(process.create_time() - self.create_time) < 0.01
            return same and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def write(self, path: Path) -> None:
        path.write_text(json.dumps({"pid": self.pid, "create_time": self.create_time}))

    @classmethod
    def read(cls, path: Path) -> Owner | None:
        """The owner recorded at `path`; None when there is no readable record."""
        try:
            data = json.loads(path.read_text())
            return cls(int(data["pid"]), float(data["create_time"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def port_is_free(host: str, port: int) -> bool:
    """Whether a TCP listener could bind `host:port` now."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            raise
        return True


def listeners(port: int) -> list[psutil.Process]:
    """The processes with a TCP socket listening on `port` (any address) that this user may
    inspect; sockets of other users' processes are not attributed."""
    pids = {
        conn.pid
        for conn in psutil.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid
    }
    found = []
    for pid in sorted(pids):
        try:
            found.append(psutil.Process(pid))
        except psutil.Error:
            continue
    return found


def describe(process: psutil.Process) -> str:
    """`pid N: command line` (the command line cut at 200 characters)."""
    try:
        command = " ".join(process.cmdline()) or process.name()
    except psutil.Error:
        command = "(gone or not inspectable)"
    if len(command) > 200:
        command = command[:197] + "..."
    return f"pid {process.pid}: {command}"


def gone(process: psutil.Process) -> bool:
    """Whether the process has ended (a zombie awaiting its reaper has: it holds no sockets)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def terminate(processes: Iterable[psutil.Process], grace_s: float = 5.0) -> None:
    """SIGTERM the processes, then SIGKILL those still running after `grace_s` seconds.

    Returns once all have ended (zombies count as ended: their reaper may be elsewhere).
    """
    targets = list(processes)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in targets:
            with contextlib.suppress(psutil.Error):
                process.send_signal(sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and not all(gone(p) for p in targets):
            time.sleep(0.05)
        targets = [p for p in targets if not gone(p)]
        if not targets:
            return
