"""Binance public dump files (daily or monthly; CSV, CSV.gz or zip) as a kline source.

Each line is stored as received. Timestamps may be milliseconds or, from 2025 on, microseconds;
both are accepted. A header line is recognised and skipped; any other line that does not parse is
still stored (with the line before it, its anchor: same date, same part, in range when that line
is) so that the Silver ETL quarantines it with a reason instead of it vanishing here.

Once a file's rows in the requested range are stored, a done-marker keyed by symbol and file hash
records the ranges stored so far; a later run whose range they cover skips the file unread, and
one with a wider range reads it again and stores exactly the rows missing (the parts' ranges say
which are stored).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import zipfile
from collections.abc import Iterator
from datetime import date
from itertools import groupby
from pathlib import Path

from market.bronze import Batch, BatchMeta, Bronze, RawKline
from market.klines import to_millis, utc_date
from market.sources.base import now_iso

_HEADER_FIRST_FIELDS = {"open_time", "open time", "opentime"}

Range = tuple[int | None, int | None]
"""An inclusive epoch-ms range; None is unbounded on that side."""

_LOWEST, _HIGHEST = -(2**63), 2**63 - 1


def merge_ranges(ranges: list[Range]) -> list[Range]:
    """The union of `ranges` as sorted, disjoint ranges (touching ones joined)."""
    bounded = sorted(
        (_LOWEST if low is None else low, _HIGHEST if high is None else high)
        for low, high in ranges
    )
    merged: list[tuple[int, int]] = []
    for low, high in bounded:
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return [
        (None if low == _LOWEST else low, None if high == _HIGHEST else high)
        for low, high in merged
    ]


def covers(ranges: list[Range], wanted: Range) -> bool:
    """Whether the union of `ranges` contains all of `wanted`."""
    return merge_ranges([*ranges, wanted]) == merge_ranges(ranges)


def _contains(span: Range, position_ms: int) -> bool:
    low, high = span
    return (low is None or low <= position_ms) and (high is None or position_ms <= high)


def marker_ranges(info: dict[str, object] | None) -> list[Range]:
    """The ranges a dump marker records as stored; none for a marker that records none."""
    ranges = info.get("ranges") if info else None
    if not isinstance(ranges, list):
        return []
    return [(low, high) for low, high in ranges]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_lines(path: Path) -> list[str]:
    """The text lines of a dump file, whatever its compression."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.namelist() if not m.endswith("/")]
            if len(members) != 1:
                raise ValueError(f"{path}: expected one CSV inside the zip, found {members}")
            text = io.TextIOWrapper(archive.open(members[0]), encoding="utf-8").read()
    elif path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            text = handle.read()
    else:
        text = path.read_text(encoding="utf-8")
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def parse_open_time(line: str) -> int | None:
    """The open time (epoch ms) of a dump line, or None when it does not parse."""
    head = line.split(",", 1)[0].strip()
    return to_millis(int(head)) if head.isdigit() else None


class DumpSource:
    """Dump files matching `pattern` (a path or glob). Optional inclusive epoch-ms range."""

    name = "dump"

    def __init__(
        self, pattern: str, start_ms: int | None = None, end_ms: int | None = None
    ) -> None:
        self.pattern = pattern
        self.start_ms = start_ms
        self.end_ms = end_ms

    def files_for(self, symbol: str) -> list[Path]:
        """Files named for `symbol` (BTCUSDT-1m-...), or every match when none is."""
        files = sorted(Path(p) for p in glob.glob(self.pattern))
        if not files:
            raise FileNotFoundError(f"no dump files match {self.pattern!r}")
        named = [f for f in files if f.name.upper().startswith(f"{symbol.upper()}-")]
        return named or files

    def batches(self, symbol: str, store: Bronze) -> Iterator[Batch]:
        wanted: Range = (self.start_ms, self.end_ms)
        for path in self.files_for(symbol):
            sha = file_sha256(path)
            marker = f"{symbol}-{sha}"
            stored = marker_ranges(store.read_marker("dump", marker))
            if covers(stored, wanted):
                continue
            meta = BatchMeta(now_iso(), f"file {path.name} sha256={sha}")
            rows: list[tuple[str, RawKline]] = []
            positions: list[int] = []
            current_day = None
            anchor: int | None = None
            for line in read_lines(path):
                open_time = parse_open_time(line)
                if open_time is None and line.split(",", 1)[0].strip().lower() in (
                    _HEADER_FIRST_FIELDS
                ):
                    continue
                if open_time is not None:
                    anchor = open_time
                    current_day = utc_date(open_time)
                if current_day is None or anchor is None:
                    continue  # nothing before it to go with: no date to store it under
                positions.append(anchor)
                if not _contains(wanted, anchor):
                    continue
                raw = RawKline(open_time, line, None if open_time is not None else anchor)
                rows.append((current_day.isoformat(), raw))
            for day_text, group in groupby(rows, key=lambda item: item[0]):
                day_rows = [row for _, row in group]
                yield Batch(
                    "dump",
                    symbol,
                    date.fromisoformat(day_text),
                    f"dump-{sha[:12]}",
                    day_rows,
                    meta,
                )
            # Only now, with every part of the range written (and synced), is it stored.
            ranges = merge_ranges([*stored, wanted])
            rows_stored = sum(any(_contains(r, p) for r in ranges) for p in positions)
            info: dict[str, object] = {
                "file": str(path),
                "rows": rows_stored,
                "ranges": [list(r) for r in ranges],
            }
            store.mark_done("dump", marker, info)
