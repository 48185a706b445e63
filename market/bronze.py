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

All of the above is `BronzeStore`, on local disk. On an object store (no rename, no locks)
`ObjectBronzeStore` keeps the same layout and guarantees with commit markers instead; see its
docstring. `open_bronze` picks the one a lake's location needs, and sources see either through
the `Bronze` protocol.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path, PurePath, PurePosixPath
from typing import Protocol

import pyarrow.fs as pafs

from configs.schema import ObjectStoreConfig
from market.files import TMP_PREFIX, exclusive_lock, make_dirs_durably, write_durably
from market.lake import BRONZE, Lake
from market.storage import Location, resolve

_PART = re.compile(r"^part-(?P<first>\d+)-(?P<last>\d+)-(?P<tag>[A-Za-z0-9_.-]+)\.jsonl$")
_LOCKS = "_locks"
_DONE = "_done"
_COMMITTED = "_committed"


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
    """A Bronze part and the open-time range (epoch ms) its name records. `path` is the part's
    path in its store's filesystem: a local path, or `bucket/key` on an object store."""

    path: PurePath
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
        if not batch.rows:
            return None
        directory = self.partition(batch.source, batch.symbol, batch.day)
        target = directory / part_name(batch)
        if target.exists():
            return None
        text = part_text(batch)
        make_dirs_durably(directory)
        write_durably(target, text)
        return target

    def parts(self, source: str | None = None, symbol: str | None = None) -> list[PartInfo]:
        """Every part, optionally of one source and/or symbol, sorted by first open time."""
        source_glob = f"source={source}" if source else "source=*"
        symbol_glob = f"symbol={symbol}" if symbol else "symbol=*"
        found = self.root.glob(f"{source_glob}/{symbol_glob}/date=*/part-*.jsonl")
        return _sorted_parts(part_info(path) for path in found)

    def covered_until(self, source: str, symbol: str) -> int | None:
        """The latest open time (epoch ms) stored for a source and symbol, if any."""
        parts = self.parts(source, symbol)
        return max(p.last_ms for p in parts) if parts else None

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

    def records(self, part: PartInfo) -> Iterator[dict[str, object]]:
        """The records of one part, in order."""
        yield from read_part(Path(part.path))


class ObjectBronzeStore:
    """The Bronze zone on an object store, which has neither rename nor locks.

    A part is committed in two single PUTs: the part object, then its commit marker, an object
    at the same key under `<bronze>/_committed/`. Readers list the markers only, so a part whose
    writer died before its marker is invisible; a rerun writes the same part again (its name is
    derived from its rows), overwriting the leftover, and then the marker. Done-markers are one
    PUT each. Without locks, two ingests of one symbol into one object-store lake at the same
    time are not serialised: run one ingest per lake at a time.
    """

    def __init__(self, location: Location) -> None:
        self.filesystem = location.filesystem
        self.root = location.path

    def _key(self, *names: str) -> str:
        return "/".join((self.root, *names))

    def write(self, batch: Batch) -> PurePosixPath | None:
        """Write `batch` as one committed part. Returns its key, or None when it was committed
        already."""
        if not batch.rows:
            return None
        relative = "/".join(
            (f"source={batch.source}", f"symbol={batch.symbol}", f"date={batch.day}")
        )
        relative = f"{relative}/{part_name(batch)}"
        marker = self._key(_COMMITTED, relative)
        if self.filesystem.get_file_info(marker).type == pafs.FileType.File:
            return None
        text = part_text(batch).encode("utf-8")
        self._put(self._key(relative), text)
        self._put(marker, json.dumps({"bytes": len(text), "rows": len(batch.rows)}).encode())
        return PurePosixPath(self._key(relative))

    def parts(self, source: str | None = None, symbol: str | None = None) -> list[PartInfo]:
        """Every committed part, optionally of one source and/or symbol, sorted by first open
        time."""
        committed = self._key(_COMMITTED)
        selector = pafs.FileSelector(committed, recursive=True, allow_not_found=True)
        found: list[PartInfo | None] = []
        for info in self.filesystem.get_file_info(selector):
            if info.type != pafs.FileType.File:
                continue
            part = part_info(PurePosixPath(self.root, info.path[len(committed) + 1 :]))
            if part is not None and source in (None, part.source) and symbol in (None, part.symbol):
                found.append(part)
        return _sorted_parts(found)

    def records(self, part: PartInfo) -> Iterator[dict[str, object]]:
        """The records of one part, in order."""
        with self.filesystem.open_input_stream(str(part.path)) as stream:
            text = stream.read().decode("utf-8")
        for line in text.splitlines():
            if line.strip():
                yield json.loads(line)

    @contextmanager
    def symbol_lock(self, source: str, symbol: str) -> Iterator[None]:
        """No lock exists on an object store; commit markers keep readers consistent."""
        yield

    def remove_temporaries(self) -> int:
        """Nothing to remove: an uncommitted part is invisible and overwritten by the rerun."""
        return 0

    def remove_own_temporaries(self, source: str, symbol: str) -> int:
        return 0

    def mark_done(self, kind: str, key: str, info: dict[str, object]) -> None:
        """Record that a unit of work is stored (one PUT). Call it only after the parts it
        vouches for were committed."""
        self._put(self._key(_DONE, kind, f"{key}.json"), json.dumps(info, sort_keys=True).encode())

    def read_marker(self, kind: str, key: str) -> dict[str, object] | None:
        """The info of a done-marker, or None when there is none."""
        path = self._key(_DONE, kind, f"{key}.json")
        if self.filesystem.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.filesystem.open_input_stream(path) as stream:
            info = json.loads(stream.read().decode("utf-8"))
        return info if isinstance(info, dict) else None

    def _put(self, key: str, data: bytes) -> None:
        with self.filesystem.open_output_stream(key) as stream:
            stream.write(data)


class Bronze(Protocol):
    """What ingestion needs of a Bronze zone, on local disk or on an object store."""

    def write(self, batch: Batch) -> PurePath | None: ...
    def parts(self, source: str | None = None, symbol: str | None = None) -> list[PartInfo]: ...
    def records(self, part: PartInfo) -> Iterator[dict[str, object]]: ...
    def symbol_lock(self, source: str, symbol: str) -> AbstractContextManager[None]: ...
    def remove_temporaries(self) -> int: ...
    def remove_own_temporaries(self, source: str, symbol: str) -> int: ...
    def mark_done(self, kind: str, key: str, info: dict[str, object]) -> None: ...
    def read_marker(self, kind: str, key: str) -> dict[str, object] | None: ...


def open_bronze(
    lake: str | Path | Location, object_store: ObjectStoreConfig | None = None
) -> Bronze:
    """The Bronze zone of `lake` (a path or URI, see `market.storage`, or a `Location` already
    resolved, which is not probed again): a `BronzeStore` on local disk, an `ObjectBronzeStore`
    on an object store. StorageError when `lake` cannot be used."""
    root = lake if isinstance(lake, Location) else resolve(lake, object_store)
    if root.is_local:
        return BronzeStore(root.local_path())
    return ObjectBronzeStore(root.child(BRONZE))


def _unlink_temporaries(directory: Path) -> int:
    removed = 0
    for path in directory.glob(f"**/{TMP_PREFIX}*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def part_name(batch: Batch) -> str:
    """`part-<first>-<last>-<tag>.jsonl` of a non-empty batch: first/last are the smallest and
    largest positions (epoch ms) of its rows, unparseable lines' anchors included."""
    known = [r.position_ms for r in batch.rows if r.position_ms is not None]
    first = min(known) if known else 0
    last = max(known) if known else 0
    return f"part-{first}-{last}-{batch.tag}.jsonl"


def part_text(batch: Batch) -> str:
    """A batch's part contents: one JSON record per line, its ingestion metadata with it."""
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
    return "\n".join(lines) + "\n"


def part_info(path: PurePath) -> PartInfo | None:
    """The part at `.../source=S/symbol=X/date=D/part-*.jsonl`, or None for another name."""
    match = _PART.match(path.name)
    if not match:
        return None
    return PartInfo(
        path=path,
        source=path.parents[2].name.split("=", 1)[1],
        symbol=path.parents[1].name.split("=", 1)[1],
        day=path.parent.name.split("=", 1)[1],
        first_ms=int(match["first"]),
        last_ms=int(match["last"]),
        tag=match["tag"],
    )


def _sorted_parts(parts: Iterable[PartInfo | None]) -> list[PartInfo]:
    found = [p for p in parts if p is not None]
    return sorted(found, key=lambda p: (p.first_ms, p.last_ms, str(p.path)))


def read_part(path: Path) -> Iterable[dict[str, object]]:
    """The records of one part (for tests and inspection; the ETL reads Bronze with Spark)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)
