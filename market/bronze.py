"""The Bronze zone: raw kline payloads as received, append-only, partitioned by source/symbol/date.

Layout: `<lake>/bronze/source=S/symbol=X/date=YYYY-MM-DD/part-<first>-<last>-<tag>.jsonl`, where
first/last are the smallest and largest open times (epoch ms) in the part and `tag` names the
batch (a simulator config, a dump file's hash, a REST fetch). Each line is one kline exactly as
the source delivered it (`raw`: a CSV line or a JSON array) with its ingestion metadata.

Every part is written to a temporary file and renamed into place, so a reader never sees half a
part and a killed job leaves nothing but temporaries, which the next run removes. A part that
already exists is never rewritten: reruns are no-ops, and resumption reads the covered ranges
from the file names without opening the files.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from market.lake import Lake

_PART = re.compile(r"^part-(?P<first>\d+)-(?P<last>\d+)-(?P<tag>[A-Za-z0-9_.-]+)\.jsonl$")
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class RawKline:
    """One kline as received: its open time (epoch ms, or None if unparseable) and raw text."""

    open_time_ms: int | None
    raw: str


@dataclass(frozen=True)
class BatchMeta:
    """Where a batch came from: the request that produced it and when it was fetched."""

    fetched_at: str
    request: str


@dataclass(frozen=True)
class Batch:
    """Raw klines of one symbol and one UTC date, ready to be written as one Bronze part."""

    source: str
    symbol: str
    day: date
    tag: str
    rows: Sequence[RawKline]
    meta: BatchMeta | Sequence[BatchMeta]


@dataclass(frozen=True)
class PartInfo:
    """A Bronze part file and the open-time range (epoch ms) its name records."""

    path: Path
    source: str
    symbol: str
    day: str
    first_ms: int
    last_ms: int
    tag: str


class BronzeStore:
    """Reads and writes the Bronze zone under `<lake>/bronze`."""

    def __init__(self, lake: str | Path) -> None:
        self.root = Lake.at(lake).bronze

    def partition(self, source: str, symbol: str, day: date | str) -> Path:
        return self.root / f"source={source}" / f"symbol={symbol}" / f"date={day}"

    def write(self, batch: Batch) -> Path | None:
        """Write `batch` as one part atomically. Returns its path, or None when it existed."""
        known = [r.open_time_ms for r in batch.rows if r.open_time_ms is not None]
        if not batch.rows:
            return None
        first = min(known) if known else 0
        last = max(known) if known else 0
        directory = self.partition(batch.source, batch.symbol, batch.day)
        target = directory / f"part-{first}-{last}-{batch.tag}.jsonl"
        if target.exists():
            return None
        directory.mkdir(parents=True, exist_ok=True)
        metas = [batch.meta] * len(batch.rows) if isinstance(batch.meta, BatchMeta) else batch.meta
        if len(metas) != len(batch.rows):
            raise ValueError("one BatchMeta per row, or one for the whole batch")
        lines = (
            json.dumps(
                {
                    "fetched_at": meta.fetched_at,
                    "request": meta.request,
                    "batch": batch.tag,
                    "seq": seq,
                    "raw": row.raw,
                },
                separators=(",", ":"),
            )
            for seq, (row, meta) in enumerate(zip(batch.rows, metas, strict=True))
        )
        temporary = directory / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines))
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
        return target

    def parts(self, source: str | None = None, symbol: str | None = None) -> list[PartInfo]:
        """Every part, optionally of one source and/or symbol, sorted by first open time."""
        found: list[PartInfo] = []
        source_glob = f"source={source}" if source else "source=*"
        symbol_glob = f"symbol={symbol}" if symbol else "symbol=*"
        for path in self.root.glob(f"{source_glob}/{symbol_glob}/date=*/part-*.jsonl"):
            match = _PART.match(path.name)
            if not match:
                continue
            found.append(
                PartInfo(
                    path=path,
                    source=path.parents[2].name.split("=", 1)[1],
                    symbol=path.parents[1].name.split("=", 1)[1],
                    day=path.parent.name.split("=", 1)[1],
                    first_ms=int(match["first"]),
                    last_ms=int(match["last"]),
                    tag=match["tag"],
                )
            )
        return sorted(found, key=lambda p: (p.first_ms, p.last_ms, str(p.path)))

    def symbols(self) -> list[str]:
        """Symbols with at least one part, from any source."""
        return sorted({p.symbol for p in self.parts()})

    def covered_until(self, source: str, symbol: str) -> int | None:
        """The latest open time (epoch ms) stored for a source and symbol, if any."""
        parts = self.parts(source, symbol)
        return max(p.last_ms for p in parts) if parts else None

    def has_part(self, source: str, symbol: str, day: date, tag: str) -> bool:
        """Whether a part with this tag exists for the source, symbol and date."""
        return any(self.partition(source, symbol, day).glob(f"part-*-{tag}.jsonl"))

    def remove_temporaries(self) -> int:
        """Delete temporaries left by a killed writer; returns how many."""
        removed = 0
        for path in self.root.glob(f"**/{_TMP_PREFIX}*"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def marker_path(self, kind: str, key: str) -> Path:
        return self.root / "_done" / kind / f"{key}.json"

    def mark_done(self, kind: str, key: str, info: dict[str, object]) -> None:
        """Record atomically that a unit of work (for example one dump file) is fully stored."""
        path = self.marker_path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex}")
        temporary.write_text(json.dumps(info, sort_keys=True), encoding="utf-8")
        os.replace(temporary, path)

    def is_done(self, kind: str, key: str) -> bool:
        return self.marker_path(kind, key).exists()


def read_part(path: Path) -> Iterable[dict[str, object]]:
    """The records of one part (for tests and inspection; the ETL reads Bronze with Spark)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)
