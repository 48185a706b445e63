"""Binance public dump files (daily or monthly; CSV, CSV.gz or zip) as a kline source.

Each line is stored as received. Timestamps may be milliseconds or, from 2025 on, microseconds;
both are accepted. A header line is recognised and skipped; any other line that does not parse is
still stored (under the date of the line before it) so that the Silver ETL quarantines it with a
reason instead of it vanishing here.
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

from market.bronze import Batch, BatchMeta, BronzeStore, RawKline
from market.klines import to_millis, utc_date
from market.sources.base import now_iso

_HEADER_FIRST_FIELDS = {"open_time", "open time", "opentime"}


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

    def _in_range(self, open_time_ms: int | None) -> bool:
        if open_time_ms is None:
            return True
        if self.start_ms is not None and open_time_ms < self.start_ms:
            return False
        return self.end_ms is None or open_time_ms <= self.end_ms

    def batches(self, symbol: str, store: BronzeStore) -> Iterator[Batch]:
        for path in self.files_for(symbol):
            sha = file_sha256(path)
            marker = f"{symbol}-{sha}"
            if store.is_done("dump", marker):
                continue
            meta = BatchMeta(now_iso(), f"file {path.name} sha256={sha}")
            rows: list[tuple[str, RawKline]] = []
            current_day = None
            for line in read_lines(path):
                open_time = parse_open_time(line)
                if open_time is None and line.split(",", 1)[0].strip().lower() in (
                    _HEADER_FIRST_FIELDS
                ):
                    continue
                if open_time is not None:
                    current_day = utc_date(open_time)
                if current_day is None or not self._in_range(open_time):
                    continue
                rows.append((current_day.isoformat(), RawKline(open_time, line)))
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
            store.mark_done("dump", marker, {"file": str(path), "rows": len(rows)})
