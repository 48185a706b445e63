"""The interface every kline source implements, and the runner that stores its batches."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from market.bronze import Batch, BatchMeta, Bronze

log = logging.getLogger(__name__)


class KlineSource(Protocol):
    """A source of raw 1-minute klines for one symbol at a time.

    `batches` yields one Batch per UTC date (or part of one) that the store does not hold yet;
    it consults the store to resume where an earlier run stopped.
    """

    name: str

    def batches(self, symbol: str, store: Bronze) -> Iterator[Batch]: ...


@dataclass
class IngestReport:
    """What one symbol's ingestion did."""

    source: str
    symbol: str
    days_written: int = 0
    rows_written: int = 0
    rows_already_stored: int = 0
    temporaries_removed: int = 0
    seconds: float = 0.0
    parts: list[str] = field(default_factory=list)


def now_iso() -> str:
    """The current UTC time in ISO-8601 with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def ingest_symbol(
    source: KlineSource,
    symbol: str,
    store: Bronze,
    on_part: Callable[[int], None] | None = None,
) -> IngestReport:
    """Store every batch `source` yields for `symbol`, skipping minutes its tag already holds.

    Holds the symbol's writer lock throughout, so another ingest of the symbol waits and what
    is read as stored stays true while this writes; first removes the temporaries a killed
    writer left. A row counts as stored when its position (its open time, or an unparseable
    line's anchor) lies in a part of the same tag and day, so a rerun stores nothing twice.
    `on_part(rows)` is called after each part is written (a progress bar's update); each part is
    logged at DEBUG and the symbol's totals once at INFO, so a year of one symbol is one line.
    """
    report = IngestReport(source=source.name, symbol=symbol)
    started = time.perf_counter()
    with store.symbol_lock(source.name, symbol):
        report.temporaries_removed = store.remove_own_temporaries(source.name, symbol)
        _store_batches(source, symbol, store, report, on_part)
    report.seconds = time.perf_counter() - started
    log.info(
        "ingest %s %s: %d rows in %d parts (%d already stored), %.1f s, %.0f rows/s",
        source.name,
        symbol,
        report.rows_written,
        report.days_written,
        report.rows_already_stored,
        report.seconds,
        report.rows_written / max(report.seconds, 1e-9),
    )
    return report


def _store_batches(
    source: KlineSource,
    symbol: str,
    store: Bronze,
    report: IngestReport,
    on_part: Callable[[int], None] | None,
) -> None:
    # (tag, day) -> open-time ranges stored: read once, then kept current as parts are written.
    covered_by: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for part in store.parts(source.name, symbol):
        covered_by.setdefault((part.tag, part.day), []).append((part.first_ms, part.last_ms))
    for batch in source.batches(symbol, store):
        covered = covered_by.setdefault((batch.tag, str(batch.day)), [])
        metas = (
            [batch.meta] * len(batch.rows)
            if isinstance(batch.meta, BatchMeta)
            else list(batch.meta)
        )
        kept = [
            (row, meta)
            for row, meta in zip(batch.rows, metas, strict=True)
            if row.position_ms is None or not any(a <= row.position_ms <= b for a, b in covered)
        ]
        report.rows_already_stored += len(batch.rows) - len(kept)
        if not kept:
            continue
        rows = [row for row, _ in kept]
        written = store.write(
            Batch(batch.source, batch.symbol, batch.day, batch.tag, rows, [m for _, m in kept])
        )
        if written is not None:
            known = [r.position_ms for r in rows if r.position_ms is not None]
            covered.append((min(known, default=0), max(known, default=0)))
            report.days_written += 1
            report.rows_written += len(rows)
            report.parts.append(str(written))
            log.debug("ingest %s %s %s: %d rows", source.name, symbol, batch.day, len(rows))
            if on_part is not None:
                on_part(len(rows))
