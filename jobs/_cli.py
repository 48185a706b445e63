"""What every job's command line shares: logging, the Ray address flag, the summary line, and
stopping on Ctrl-C or SIGTERM with a one-line message and the shell's exit status."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from cluster.processes import exit_status, stop_on_sigterm


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


def run(main: Callable[[], int], job: str) -> NoReturn:
    """Exit with `main()`'s status. SIGTERM (a container or systemd stop) is raised like Ctrl-C,
    so the job's cleanup (`finally` blocks: stopping Serve, the local Ray) runs either way; the
    job then says what stopped it, without a traceback, and exits 128 + the signal number."""
    stop_on_sigterm()
    try:
        sys.exit(main())
    except KeyboardInterrupt as interrupt:
        print(f"[{job}] stopped by {str(interrupt) or 'SIGINT'}", file=sys.stderr, flush=True)
        sys.exit(exit_status(interrupt))
