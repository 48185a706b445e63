"""The Bronze zone: raw kline payloads as received, append-only, partitioned by source/symbol/date.

Layout: `<lake>/bronze/source=S/symbol=X/date=YYYY-MM-DD/part-<first>-<last>-<tag>.jsonl`, where
first/last are the smallest and largest open times (epoch ms) in the part and `tag` names the
batch (a simulator config, a dump file's hash, a REST fetch). Each line is one kline exactly as
the source delivered it (`raw`: a CSV line or a JSON array) with its ingestion metadata.

Every part is written to a temporary file and renamed into place, so a reader never sees half a
part and a killed job leaves nothing but temporaries, which the next run removes. A part that
already exists is never rewritten: reruns are no-ops, and resumption reads the covered ranges
from the file names without opening the files.

Durability: a part's contents are fsynced before its rename and its directory after it (and every
directory the write created, in its parent), so a done-marker written afterwards, itself written
and synced the same way, can never outlive a power loss that the parts it vouches for do not.

Concurrency: the writer of a source and symbol holds an advisory lock (`flock`) on
`bronze/_locks/source=S/symbol=X.lock` while it reads what is stored and writes parts, so two
ingests of one symbol run one after the other, and a cleanup removes only the temporaries of
symbols whose lock it can take: those are the leftovers of a writer that died.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from market.files import TMP_PREFIX, exclusive_lock, make_dirs_durably, write_durably
from market.lake import Lake

_PART = re.compile(r"^part-(?P<first>\d+)-(?P<last>\d+)-(?P<tag>[A-Za-z0-9_.-]+)\.jsonl$")
_LOCKS = "_locks"
_DONE = "_done"


@dataclass(frozen=True)
class RawKline:
    """One kline as received: its open time (epoch ms, or None if unparseable) and raw text.

    A line whose open time does not parse may name an `anchor_ms`: the open time (epoch ms) of the
    line it followed. It is stored with that line's part and counts as covered where that line
    does, so a rerun can tell whether it is stored already.
    """

    open_time_ms: int | None
    raw: str
    anchor_ms: int | None = None

    @property
    def position_ms(self) -> int | None:
        """Where the line sits in time (epoch ms): its open time, else its anchor's."""
        return self.open_time_ms if self.open_time_ms is not None else self.anchor_ms


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

    def symbol_dir(self, source: str, symbol: str) -> Path:
        return self.root / f"source={source}" / f"symbol={symbol}"

    def partition(self, source: str, symbol: str, day: date | str) -> Path:
        return self.symbol_dir(source, symbol) / f"date={day}"

    def write(self, batch: Batch) -> Path | None:
        """Write `batch` as one part atomically and durably. Returns its path, or None when it
        existed. The part's first/last open times include the anchors of unparseable lines."""
        known = [r.position_ms for r in batch.rows if r.position_ms is not None]
        if not batch.rows:
            return None
        first = min(known) if known else 0
        last = max(known) if known else 0
        directory = self.partition(batch.source, batch.symbol, batch.day)
        target = directory / f"part-{first}-{last}-{batch.tag}.jsonl"
        if target.exists():
            return None
        make_dirs_durably(directory)
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
        write_durably(target, "\n".join(lines) + "\n")
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

    def _lock_file(self, *names: str) -> Path:
        path = self.root.joinpath(_LOCKS, *names)
        # Durably too: it may create the lake's directories that parts and markers go under.
        make_dirs_durably(path.parent)
        return path

    @contextmanager
    def symbol_lock(self, source: str, symbol: str) -> Iterator[None]:
        """Hold the writer's lock of a source and symbol, waiting while another process does."""
        with exclusive_lock(
            self._lock_file(f"source={source}", f"symbol={symbol}.lock"), wait=True
        ):
            yield

    def remove_temporaries(self) -> int:
        """Delete the temporaries that killed writers left anywhere in Bronze; returns how many.
        A symbol whose lock is held (by any open file, this process's included) is being
        written and is skipped; its writer removes its leftovers with `remove_own_temporaries`."""
        removed = 0
        for directory in sorted(self.root.glob("source=*/symbol=*")):
            names = (directory.parent.name, f"{directory.name}.lock")
            with exclusive_lock(self._lock_file(*names), wait=False) as locked:
                if locked:
                    removed += _unlink_temporaries(directory)
        return removed + self._remove_marker_temporaries()

    def remove_own_temporaries(self, source: str, symbol: str) -> int:
        """Delete the temporaries of a source and symbol whose `symbol_lock` the caller holds:
        no other writer can be using them. Returns how many."""
        return _unlink_temporaries(self.symbol_dir(source, symbol))

    def _remove_marker_temporaries(self) -> int:
        done = self.root / _DONE
        if not done.exists():
            return 0
        # Markers are written under this lock from start to rename: any temporary seen while
        # holding it belongs to a writer that died.
        with exclusive_lock(self._lock_file("_done.lock"), wait=True):
            return _unlink_temporaries(done)

    def marker_path(self, kind: str, key: str) -> Path:
        return self.root / _DONE / kind / f"{key}.json"

    def mark_done(self, kind: str, key: str, info: dict[str, object]) -> None:
        """Record atomically and durably that a unit of work (for example one dump file) is
        stored. Call it only after the parts it vouches for were written: `write` syncs them."""
        path = self.marker_path(kind, key)
        with exclusive_lock(self._lock_file("_done.lock"), wait=True):
            make_dirs_durably(path.parent)
            write_durably(path, json.dumps(info, sort_keys=True))

    def read_marker(self, kind: str, key: str) -> dict[str, object] | None:
        """The info of a done-marker, or None when there is none."""
        try:
            info = json.loads(self.marker_path(kind, key).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        return info if isinstance(info, dict) else None

    def is_done(self, kind: str, key: str) -> bool:
        return self.marker_path(kind, key).exists()


def _unlink_temporaries(directory: Path) -> int:
    removed = 0
    for path in directory.glob(f"**/{TMP_PREFIX}*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def read_part(path: Path) -> Iterable[dict[str, object]]:
    """The records of one part (for tests and inspection; the ETL reads Bronze with Spark)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)
