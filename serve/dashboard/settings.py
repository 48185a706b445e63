"""The dashboard's start-up settings: command line first, then environment, then defaults."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

DEFAULT_API_URL: Final = "http://127.0.0.1:8000"
DEFAULT_LAKE: Final = "lake"
DEFAULT_RUNS: Final = "runs"
DEFAULT_HOURS: Final = 6.0


@dataclass(frozen=True)
class DashboardSettings:
    """Where the API, the lake and the tune runs are, and the credentials.

    `hours` is the width of the market chart's window in hours of 1-minute bars.
    """

    api_url: str = DEFAULT_API_URL
    lake: str = DEFAULT_LAKE
    runs: str = DEFAULT_RUNS
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    symbol: str | None = None
    hours: float = DEFAULT_HOURS


def parse_settings(argv: Sequence[str], env: Mapping[str, str]) -> DashboardSettings:
    """Settings from `argv` (the arguments after `streamlit run serve/dashboard/app.py --`) and
    `env` (QUANT_AI_API_URL, QUANT_AI_CLIENT_ID, QUANT_AI_CLIENT_SECRET, QUANT_AI_TOKEN,
    QUANT_AI_LAKE, QUANT_AI_RUNS). Secrets are read from the environment only, never from the
    command line (where `ps` would show them). Unknown arguments are ignored.
    """
    parser = argparse.ArgumentParser(prog="dashboard", add_help=False)
    parser.add_argument("--api", default=None)
    parser.add_argument("--lake", default=None)
    parser.add_argument("--runs", default=None)
    parser.add_argument("--symbol", default=None)
    parser.add_argument("--hours", type=float, default=None)
    args, _ = parser.parse_known_args(list(argv))
    hours = args.hours if args.hours is not None and args.hours > 0 else DEFAULT_HOURS
    return DashboardSettings(
        api_url=(args.api or env.get("QUANT_AI_API_URL") or DEFAULT_API_URL).rstrip("/"),
        lake=args.lake or env.get("QUANT_AI_LAKE") or DEFAULT_LAKE,
        runs=args.runs or env.get("QUANT_AI_RUNS") or DEFAULT_RUNS,
        client_id=env.get("QUANT_AI_CLIENT_ID", ""),
        client_secret=env.get("QUANT_AI_CLIENT_SECRET", ""),
        token=env.get("QUANT_AI_TOKEN", ""),
        symbol=args.symbol,
        hours=hours,
    )
