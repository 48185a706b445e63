"""Dump files with malformed lines, Bronze contents as a multiset, and a killable ingest process.

`python -m tests.ingest_child --lake L --path GLOB --symbols A,B [--start ISO] [--end ISO]` does
the Bronze writes of `python -m jobs.ingest --source dump` without Ray (which would cost seconds
per start): it removes the lake's temporaries, then ingests each symbol with `ingest_symbol`, and
prints one JSON line of totals, with `write_events`, the count of the events below. Test-only
options make it die or stall at chosen points:

- `--kill-at N`: SIGKILL itself at the N-th write event (counting every `os.fsync`, the moment
  before it, and every `os.replace`, the moment after it), so the kill lands with a part's
  temporary written but not renamed, renamed but its directory not synced, or a marker half done.
- `--kill-at-part N`: SIGKILL itself right after writing the N-th part's temporary.
- `--pause-at-rename S --ready FILE`: before its first rename of a part, create FILE and sleep S
  seconds, holding a finished temporary, so that another process can run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from configs.schema import ObjectStoreConfig
from market.bronze import BronzeStore, open_bronze
from market.klines import ONE_DAY_MS, ONE_MINUTE_MS, date_start_ms, parse_iso_ms
from market.sources.base import ingest_symbol
from market.sources.dump import DumpSource

MALFORMED_EVERY = 997
"""`write_dump_file` puts a malformed line after every 997th bar: 4 in 3 days."""


def dump_lines(symbol_index: int, first_day: date, days: int, malformed_every: int) -> list[str]:
    """CSV kline lines for `days` days, with a distinct malformed line after every n-th bar."""
    start = date_start_ms(first_day)
    lines: list[str] = []
    for i in range(days * 1440):
        t = start + i * ONE_MINUTE_MS
        price = 100 + symbol_index + i / 1000
        lines.append(f"{t},{price},{price},{price},{price},1.5,{t + 59_999},150,3,0.7,70,0")
        if i % malformed_every == malformed_every // 2:
            lines.append(f"broken-{symbol_index}-{i},,")
    return lines


def write_dump_file(
    directory: Path, symbol: str, symbol_index: int, first_day: date, days: int
) -> Path:
    """A header and `days` days of bars for `symbol`, with malformed lines, as a CSV dump."""
    path = directory / f"{symbol}-1m-{first_day}.csv"
    lines = dump_lines(symbol_index, first_day, days, MALFORMED_EVERY)
    path.write_text("open_time,open,high,low,close\n" + "\n".join(lines) + "\n")
    return path


def stored_rows(
    lake: Path | str, object_store: ObjectStoreConfig | None = None
) -> Counter[tuple[str, str, str, str, str]]:
    """Every stored Bronze line as (source, symbol, date, batch tag, raw), with multiplicity;
    `lake` is a path or URI."""
    rows: Counter[tuple[str, str, str, str, str]] = Counter()
    store = open_bronze(lake, object_store)
    for part in store.parts():
        for record in store.records(part):
            rows[(part.source, part.symbol, part.day, part.tag, str(record["raw"]))] += 1
    return rows


class WriteEvents:
    """Counts os.fsync and os.replace calls; SIGKILLs this process at the `kill_at`-th one, or
    at the `kill_at_part`-th fsync of a part's temporary (written, neither synced nor renamed)."""

    def __init__(self, kill_at: int | None, kill_at_part: int | None) -> None:
        self.kill_at = kill_at
        self.count = 0
        part_temporaries = 0
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            nonlocal part_temporaries
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if path.name.startswith(".tmp-") and path.parent.name.startswith("date="):
                part_temporaries += 1
                if part_temporaries == kill_at_part:
                    os.kill(os.getpid(), signal.SIGKILL)
            self.tick()
            real_fsync(fd)

        def replace(src: Any, dst: Any) -> None:
            real_replace(src, dst)
            self.tick()

        setattr(os, "fsync", fsync)  # noqa: B010 (mypy rejects assigning to a module function)
        setattr(os, "replace", replace)  # noqa: B010

    def tick(self) -> None:
        self.count += 1
        if self.count == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def _pause_at_first_part_rename(seconds: float, ready: Path) -> None:
    real_replace: Callable[[Any, Any], None] = os.replace
    paused = False

    def replace(src: Any, dst: Any) -> None:
        nonlocal paused
        if not paused and Path(dst).name.startswith("part-"):
            paused = True
            ready.touch()
            time.sleep(seconds)
        real_replace(src, dst)

    setattr(os, "replace", replace)  # noqa: B010


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lake", required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--symbols", required=True)
    parser.add_argument("--start")
    parser.add_argument("--end")
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--kill-at-part", type=int)
    parser.add_argument("--pause-at-rename", type=float)
    parser.add_argument("--ready")
    args = parser.parse_args(argv)
    events = WriteEvents(args.kill_at, args.kill_at_part)
    if args.pause_at_rename:
        _pause_at_first_part_rename(args.pause_at_rename, Path(args.ready))
    start = parse_iso_ms(args.start) if args.start else None
    end = parse_iso_ms(args.end) if args.end else None
    store = BronzeStore(args.lake)
    removed = store.remove_temporaries()
    written = already = 0
    for symbol in args.symbols.split(","):
        report = ingest_symbol(DumpSource(args.path, start, end), symbol, store)
        written += report.rows_written
        already += report.rows_already_stored
    summary = {
        "rows_written": written,
        "rows_already_stored": already,
        "removed": removed,
        "write_events": events.count,
    }
    print(json.dumps(summary), flush=True)
    return 0


def day_range_iso(first_day: date, days: int) -> tuple[str, str]:
    """ISO start and inclusive end of `days` whole days from `first_day`."""
    start = date_start_ms(first_day)
    end = start + days * ONE_DAY_MS - ONE_MINUTE_MS
    return _iso(start), _iso(end)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


if __name__ == "__main__":
    sys.exit(main())
