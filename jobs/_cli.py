"""What every job's command line shares: logging, the Ray address flag, the summary line, and
stopping on Ctrl-C or SIGTERM with a one-line message and the shell's exit status."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from cluster.processes import exit_status, stop_on_sigterm
from cluster.ray_runtime import shutdown
from market.storage import StorageError

RAY_SHUTDOWN_WAIT_S = 20.0
"""How long a stopped job waits for its local Ray to shut down before it exits anyway."""


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray)",
    )
    return parser


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    for noisy in ("py4j", "httpx", "raydp", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def print_summary(summary: dict[str, Any]) -> None:
    """The job's last line on stdout: one JSON object."""
    print(json.dumps(summary, default=str, sort_keys=True), flush=True)


def summary_stays_last() -> None:
    """Send everything this process writes to stdout from now on to stderr, so the JSON summary
    already printed stays stdout's last line while the job goes on serving: Ray forwards its
    workers' and raylet's messages (a Serve shutdown's among them) to the driver's stdout."""
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


def run(main: Callable[[], int], job: str) -> NoReturn:
    """Exit with `main()`'s status, or 2 with a one-line message when a storage location cannot
    be used (`market.storage.StorageError`). SIGTERM (a container or systemd stop) is raised
    like Ctrl-C, so the job's cleanup (`finally` blocks: stopping Serve) runs either way; the
    job then says what stopped it, without a traceback, and exits 128 + the signal number.

    After an interrupt the local Ray is shut down here, within `RAY_SHUTDOWN_WAIT_S` seconds,
    and the process ends without the interpreter's exit hooks: a terminal's Ctrl-C or a group
    SIGTERM has already stopped the Ray and Spark processes, and the hooks of their clients
    (py4j, Ray's own) then print connection tracebacks or wait on the dead processes.
    """
    stop_on_sigterm()
    try:
        status = main()
    except StorageError as error:
        # A location that cannot be used is the caller's to fix: one line, no traceback.
        print(f"[{job}] error: {error}", file=sys.stderr, flush=True)
        status = 2
    except KeyboardInterrupt as interrupt:
        print(f"[{job}] stopped by {str(interrupt) or 'SIGINT'}", file=sys.stderr, flush=True)
        # The line above is the job's last word: clients of processes the signal has already
        # stopped (py4j's JVM gateway) log connection tracebacks while they are torn down.
        logging.disable(logging.CRITICAL)
        stopper = threading.Thread(target=shutdown, daemon=True)
        stopper.start()
        stopper.join(RAY_SHUTDOWN_WAIT_S)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_status(interrupt))
    sys.exit(status)
