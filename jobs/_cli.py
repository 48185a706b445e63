"""What every job's command line shares: logging, the Ray address flag, the summary line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any


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
