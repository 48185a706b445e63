"""What Serve's HAProxy manager runs as its "haproxy binary" in a local deployment.

It ties HAProxy's life to the manager's and keeps HAProxy's admin listeners off the network,
then becomes the real HAProxy (same pid, same arguments):

- The kernel sends HAProxy SIGTERM when the process that started it (the manager actor)
  ends, however it ends. The manager stops HAProxy only on an orderly Serve shutdown; when
  the Ray node dies under it (Ctrl-C or SIGTERM to the driver's process group, a killed
  driver) HAProxy would otherwise live on in its own process group, holding the API port.
- Serve's config template binds the stats page to `*:<stats port>` and the Prometheus
  exporter to `:<metrics port>` (all interfaces) and has no setting for their address; the
  config file is rewritten to bind both to QUANT_AI_HAPROXY_ADMIN_HOST before HAProxy reads it.
  The manager writes the file before each start or reload, and each one comes through here.

Standard library only: it runs as a script, outside the project's import path.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import signal
import sys

BINARY_ENV = "QUANT_AI_HAPROXY_BINARY"
ADMIN_HOST_ENV = "QUANT_AI_HAPROXY_ADMIN_HOST"
# The ports Serve renders into the config; the launcher inherits the manager's environment.
ADMIN_PORT_ENVS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
_PR_SET_PDEATHSIG = 1


def bind_admin_ports(config: str, host: str, ports: list[int]) -> str:
    """`config` with every wildcard `bind` on one of `ports` bound to `host` instead."""
    if not ports:
        return config
    wildcard = r"(?:\*|0\.0\.0\.0|::|\[::\])?"
    pattern = re.compile(
        rf"^(\s*bind\s+){wildcard}:({'|'.join(str(p) for p in ports)})\b", re.MULTILINE
    )
    address = f"[{host}]" if ":" in host else host
    return pattern.sub(lambda m: f"{m.group(1)}{address}:{m.group(2)}", config)


def config_path(argv: list[str]) -> str | None:
    """The file after `-f` in HAProxy's arguments."""
    for flag, value in itertools.pairwise(argv):
        if flag == "-f":
            return value
    return None


def die_with_parent() -> None:
    """Have the kernel SIGTERM this process when its parent ends; exit if it already has."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # The parent may have ended between fork and prctl: then nobody would signal us.
    if os.getppid() != parent:
        sys.exit(f"haproxy launcher: parent {parent} ended before HAProxy started")


def main(argv: list[str]) -> None:
    binary = os.environ[BINARY_ENV]
    die_with_parent()
    path = config_path(argv)
    if path is not None:
        ports = [int(os.environ[name]) for name in ADMIN_PORT_ENVS if os.environ.get(name)]
        with open(path) as file:
            text = file.read()
        rewritten = bind_admin_ports(text, os.environ.get(ADMIN_HOST_ENV, "127.0.0.1"), ports)
        if rewritten != text:
            # Atomic: HAProxy (and the manager) never see half a file.
            with open(f"{path}.tmp", "w") as file:
                file.write(rewritten)
            os.replace(f"{path}.tmp", path)
    os.execv(binary, [binary, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
