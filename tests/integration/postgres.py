"""A real, throwaway PostgreSQL server for integration tests.

`start_postgres` installs PostgreSQL when its binaries are missing (Debian: apt-get, as root),
creates a cluster under the given directory, starts it on a free TCP port of 127.0.0.1 with
password (SCRAM) authentication, creates the database ``gold_test`` and returns its SQLAlchemy
URL with a function that stops the server. Nothing runs at import time.

PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
``postgres`` system user (created when missing), which must be able to traverse every ancestor
of the directory. Missing search (x) bits are added for the server's lifetime and restored by the
stop function, but prefer a directory of its own directly in the system temp dir (as conftest.py
does): pytest resets ``/tmp/pytest-of-<user>`` to mode 0700 whenever another pytest session
starts, which would lock the server's user out of its own data directory before the stop.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import URL

DATABASE = "gold_test"
SUPERUSER = "gold_test"
SERVER_USER = "postgres"  # the system account the server runs as when the tests run as root
PG_LIB = Path("/usr/lib/postgresql")
START_ATTEMPTS = 3  # a free port can be taken by someone else between probing and binding
START_TIMEOUT_S = 60
INSTALL_TIMEOUT_S = 900

# Durability is worthless for a cluster deleted after the session; these make tests faster.
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
}


class PostgresUnavailableError(RuntimeError):
    """PostgreSQL could not be installed or started here; the message says precisely why."""


@dataclass
class _Server:
    """What the stop function needs: how to run pg_ctl, and what to put back."""

    pg_ctl: Path
    data_dir: Path
    run_as: Sequence[str]
    cwd: Path
    restore_modes: list[tuple[Path, int]] = field(default_factory=list)
    stopped: bool = False

    def pg_ctl_command(self, *args: str) -> list[str]:
        """``pg_ctl -D <data> ARGS``, run as the server's user."""
        return [*self.run_as, str(self.pg_ctl), "-D", str(self.data_dir), *args]

    def stop(self) -> None:
        """Stop the server (fast shutdown, immediate as a fallback); idempotent."""
        if self.stopped:
            return
        self.stopped = True
        try:
            if self.data_dir.joinpath("postmaster.pid").exists():
                wait = ["-w", "-t", str(START_TIMEOUT_S)]
                timeout = START_TIMEOUT_S + 30
                fast = self.pg_ctl_command("-m", "fast", *wait, "stop")
                if _run(fast, self.cwd, timeout, check=False).returncode != 0:
                    immediate = self.pg_ctl_command("-m", "immediate", *wait, "stop")
                    _run(immediate, self.cwd, timeout, check=False)
            # The cluster is ~40 MB; the server log next to it is kept for post-mortems.
            shutil.rmtree(self.data_dir, ignore_errors=True)
        finally:
            for path, mode in reversed(self.restore_modes):
                with contextlib.suppress(OSError):
                    path.chmod(mode)


def start_postgres(base_dir: Path) -> tuple[str, Callable[[], None]]:
    """Start a PostgreSQL server with its files under ``base_dir``.

    Returns ``(url, stop)``: a ``postgresql+psycopg://gold_test:<password>@127.0.0.1:<port>/
    gold_test`` URL and a function that stops the server (call it once, in teardown). Raises
    PostgresUnavailableError, with the reason, when PostgreSQL cannot be installed or started.
    """
    bin_dir = find_pg_bin()
    if bin_dir is None:
        install_postgres()
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise PostgresUnavailableError(
                f"'apt-get install postgresql' succeeded but no initdb/pg_ctl/postgres was found "
                f"on PATH or under {PG_LIB}/*/bin"
            )
    root = base_dir.resolve() / "pg"
    root.mkdir(parents=True, exist_ok=True)
    as_root = os.geteuid() == 0
    if as_root:
        ensure_system_user(SERVER_USER)
        account = pwd.getpwnam(SERVER_USER)
        run_as: list[str] = ["runuser", "-u", SERVER_USER, "--"]
    else:
        account = pwd.getpwuid(os.geteuid())
        run_as = []
    server = _Server(bin_dir / "pg_ctl", root / "data", run_as, root)
    try:
        if as_root:
            server.restore_modes = _grant_search(root.parent, account)
        for path in (root, root / "data", root / "socket"):
            path.mkdir(exist_ok=True)
            os.chown(path, account.pw_uid, account.pw_gid)
            path.chmod(0o700)
        password = secrets.token_urlsafe(24)
        _init_cluster(bin_dir, server, account, password)
        port = _start(server, root / "server.log")
        url = URL.create(
            "postgresql+psycopg",
            username=SUPERUSER,
            password=password,
            host="127.0.0.1",
            port=port,
            database=DATABASE,
        )
        _create_database(url)
    except BaseException:
        server.stop()
        raise
    return url.render_as_string(hide_password=False), server.stop


def find_pg_bin() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: PATH first, then the newest
    ``/usr/lib/postgresql/<major>/bin`` (Debian keeps the server binaries off PATH)."""
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path is not None:
        # /usr/local/bin/initdb may be a link; pg_ctl finds `postgres` next to the real file.
        candidates.append(Path(on_path).resolve().parent)
    versioned = [p for p in PG_LIB.glob("*/bin") if p.parent.name.isdigit()]
    candidates += sorted(versioned, key=lambda p: int(p.parent.name), reverse=True)
    for candidate in candidates:
        if all(os.access(candidate / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return candidate
    return None


def install_postgres() -> None:
    """`apt-get update && apt-get install -y postgresql`; PostgresUnavailableError if impossible."""
    if os.geteuid() != 0:
        raise PostgresUnavailableError(
            "PostgreSQL is not installed (no initdb/pg_ctl on PATH or under "
            f"{PG_LIB}/*/bin) and the tests do not run as root, so it cannot be installed"
        )
    if shutil.which("apt-get") is None:
        raise PostgresUnavailableError(
            "PostgreSQL is not installed and there is no apt-get to install it with"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "postgresql"]):
        try:
            done = subprocess.run(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise PostgresUnavailableError(
                f"'{' '.join(command)}' did not finish in {INSTALL_TIMEOUT_S} s"
            ) from None
        if done.returncode != 0:
            raise PostgresUnavailableError(
                f"'{' '.join(command)}' failed with exit code {done.returncode}: "
                f"{_tail(done.stdout + done.stderr)}"
            )


def ensure_system_user(name: str) -> None:
    """Create the system account ``name`` (and its group) unless it exists."""
    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise PostgresUnavailableError(f"system user {name!r} is missing and there is no useradd")
    command = [useradd, "--system", "--user-group", "--no-create-home"]
    command += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    if done.returncode != 0:
        raise PostgresUnavailableError(f"useradd {name} failed: {_tail(done.stderr)}")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _can_search(path: Path, account: pwd.struct_passwd) -> bool:
    """Whether ``account`` may traverse directory ``path`` (the x bit that applies to it)."""
    info = path.stat()
    if info.st_uid == account.pw_uid:
        return bool(info.st_mode & stat.S_IXUSR)
    groups = os.getgrouplist(account.pw_name, account.pw_gid)
    if info.st_gid in groups:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def _grant_search(directory: Path, account: pwd.struct_passwd) -> list[tuple[Path, int]]:
    """Add the others-search bit (traverse, not list) where ``account`` cannot reach
    ``directory``; returns (path, old mode) pairs to restore."""
    changed: list[tuple[Path, int]] = []
    for path in [*reversed(directory.parents), directory]:
        if not _can_search(path, account):
            mode = stat.S_IMODE(path.stat().st_mode)
            path.chmod(mode | stat.S_IXOTH)
            changed.append((path, mode))
    return changed


def _init_cluster(
    bin_dir: Path, server: _Server, account: pwd.struct_passwd, password: str
) -> None:
    pwfile = server.cwd / "pwfile"
    pwfile.write_text(password + "\n")
    os.chown(pwfile, account.pw_uid, account.pw_gid)
    pwfile.chmod(0o600)
    try:
        initdb = [*server.run_as, str(bin_dir / "initdb"), "-D", str(server.data_dir)]
        initdb += ["--username", SUPERUSER, "--pwfile", str(pwfile)]
        initdb += ["--auth-local=trust", "--auth-host=scram-sha-256"]
        # --no-sync: a throwaway cluster needs no fsync of its fresh files.
        initdb += ["--encoding=UTF8", "--locale=C", "--no-sync"]
        _run(initdb, server.cwd, 300)
    finally:
        pwfile.unlink()
    # Only password logins over IPv4 loopback; the unix socket lives in a 0700 directory.
    (server.data_dir / "pg_hba.conf").write_text(
        "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
    )
    settings = {**SERVER_SETTINGS, "unix_socket_directories": str(server.cwd / "socket")}
    with (server.data_dir / "postgresql.conf").open("a") as conf:
        conf.write("\n# tests/integration/postgres.py\n")
        for key, value in settings.items():
            conf.write(f"{key} = '{value.replace(chr(39), chr(39) * 2)}'\n")


def _start(server: _Server, log: Path) -> int:
    """Start the server on a free port (retrying if the port is taken meanwhile)."""
    for attempt in range(1, START_ATTEMPTS + 1):
        port = free_port()
        offset = log.stat().st_size if log.exists() else 0
        command = server.pg_ctl_command("-l", str(log), "-o", f"-p {port}")
        command += ["-w", "-t", str(START_TIMEOUT_S), "start"]
        done = _run(command, server.cwd, START_TIMEOUT_S + 30, check=False)
        if done.returncode == 0:
            return port
        server_log = log.read_text(errors="replace")[offset:] if log.exists() else ""
        port_taken = re.search(r"could not bind|Address already in use", server_log)
        if not port_taken or attempt == START_ATTEMPTS:
            raise PostgresUnavailableError(
                f"pg_ctl start failed (exit {done.returncode}): "
                f"{_tail(done.stdout + done.stderr)}; server log: {_tail(server_log)}"
            )
        time.sleep(0.2)
    raise AssertionError("unreachable")


def _create_database(url: URL) -> None:
    import psycopg

    with psycopg.connect(
        host=url.host,
        port=url.port,
        user=url.username,
        password=url.password,
        dbname="postgres",
        autocommit=True,  # CREATE DATABASE cannot run inside a transaction
        connect_timeout=30,
    ) as conn:
        conn.execute(f'CREATE DATABASE "{DATABASE}"')


def _run(
    command: Sequence[str], cwd: Path, timeout: float, *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    # cwd: the server user may not be allowed into the caller's working directory; stdin: the
    # postmaster that pg_ctl forks must not hold on to the test runner's terminal or pipes.
    try:
        done = subprocess.run(
            list(command),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise PostgresUnavailableError(
            f"{' '.join(command)} did not finish in {timeout} s"
        ) from None
    if check and done.returncode != 0:
        raise PostgresUnavailableError(
            f"{' '.join(command)} failed with exit code {done.returncode}: "
            f"{_tail(done.stdout + done.stderr)}"
        )
    return done


def _tail(text: str, limit: int = 1500) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


__all__ = [
    "DATABASE",
    "PostgresUnavailableError",
    "ensure_system_user",
    "find_pg_bin",
    "free_port",
    "install_postgres",
    "start_postgres",
]
