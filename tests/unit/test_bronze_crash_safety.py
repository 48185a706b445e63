"""Bronze under partial runs and crashes: dump ranges, durable markers, malformed-line reruns."""

from __future__ import annotations

import json
import os
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from market.bronze import BronzeStore
from market.klines import ONE_DAY_MS, ONE_MINUTE_MS, date_start_ms
from market.sources.base import ingest_symbol
from market.sources.dump import DumpSource, covers, merge_ranges
from tests.ingest_child import dump_lines, stored_rows

DAY = date(2024, 3, 1)
START = date_start_ms(DAY)


def write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("open_time,open,high,low,close\n" + "\n".join(lines) + "\n")
    return path


def raw_lines(lake: Path) -> Counter[str]:
    return Counter({key[4]: n for key, n in stored_rows(lake).items()})


def test_a_wider_rerun_of_a_dump_stores_exactly_the_rows_the_narrow_run_left_out(
    tmp_path: Path,
) -> None:
    lines = dump_lines(0, DAY, days=3, malformed_every=500)
    path = write_csv(tmp_path / "BTCUSDT-1m.csv", lines)
    store = BronzeStore(tmp_path / "lake")
    # Day 2 from 06:00 to 18:00 only: a range that cuts days, not just whole files.
    narrow = DumpSource(
        str(path),
        START + ONE_DAY_MS + 360 * ONE_MINUTE_MS,
        START + ONE_DAY_MS + 1080 * ONE_MINUTE_MS,
    )
    first = ingest_symbol(narrow, "BTCUSDT", store)
    assert first.rows_written == 721 + 1, "721 bars and the malformed line after one of them"

    wide = ingest_symbol(DumpSource(str(path)), "BTCUSDT", store)
    assert wide.rows_written == len(lines) - first.rows_written
    assert raw_lines(tmp_path / "lake") == Counter(lines), "every line exactly once"

    (marker,) = (store.root / "_done" / "dump").glob("*.json")
    assert json.loads(marker.read_text())["ranges"] == [[None, None]]
    assert ingest_symbol(DumpSource(str(path)), "BTCUSDT", store).rows_written == 0
    assert ingest_symbol(narrow, "BTCUSDT", store).rows_written == 0


def test_a_dump_marker_records_the_ranges_it_covers_and_a_covered_rerun_skips_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = dump_lines(0, DAY, days=3, malformed_every=10_000)
    path = write_csv(tmp_path / "BTCUSDT-1m.csv", lines)
    store = BronzeStore(tmp_path / "lake")
    day1 = (START, START + ONE_DAY_MS - ONE_MINUTE_MS)
    day3 = (START + 2 * ONE_DAY_MS, START + 3 * ONE_DAY_MS - ONE_MINUTE_MS)
    ingest_symbol(DumpSource(str(path), *day3), "BTCUSDT", store)
    ingest_symbol(DumpSource(str(path), *day1), "BTCUSDT", store)
    (marker,) = (store.root / "_done" / "dump").glob("*.json")
    assert json.loads(marker.read_text())["ranges"] == [list(day1), list(day3)]

    # Within the recorded ranges the file is not even read; outside them it is.
    def no_reading(path: Path) -> list[str]:
        raise AssertionError(f"{path} was read although its marker covers the range")

    monkeypatch.setattr("market.sources.dump.read_lines", no_reading)
    assert ingest_symbol(DumpSource(str(path), *day1), "BTCUSDT", store).rows_written == 0
    monkeypatch.undo()
    day2 = ingest_symbol(DumpSource(str(path), day1[1], day3[0]), "BTCUSDT", store)
    assert day2.rows_written == 1440, "day 2, not the stored 23:59 of day 1 or 00:00 of day 3"
    assert raw_lines(tmp_path / "lake") == Counter(lines)
    assert json.loads(marker.read_text())["ranges"] == [[day1[0], day3[1]]]


class MarkerKilledError(RuntimeError):
    """Stands for the job being killed after its last part, before the file's marker."""


def test_a_rerun_after_a_kill_before_the_marker_stores_malformed_lines_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = dump_lines(0, DAY, days=2, malformed_every=300)
    path = write_csv(tmp_path / "BTCUSDT-1m.csv", lines)
    store = BronzeStore(tmp_path / "lake")

    def killed(*_: object) -> None:
        raise MarkerKilledError

    monkeypatch.setattr(store, "mark_done", killed)
    with pytest.raises(MarkerKilledError):
        ingest_symbol(DumpSource(str(path)), "BTCUSDT", store)
    monkeypatch.undo()
    assert raw_lines(tmp_path / "lake") == Counter(lines)
    again = ingest_symbol(DumpSource(str(path)), "BTCUSDT", store)
    assert again.rows_written == 0 and again.rows_already_stored == len(lines)
    assert raw_lines(tmp_path / "lake") == Counter(lines), "no malformed line stored twice"


def test_a_malformed_line_belongs_to_the_range_of_the_bar_before_it(tmp_path: Path) -> None:
    lines = dump_lines(0, DAY, days=1, malformed_every=1440)  # one, after bar 720 (12:00)
    path = write_csv(tmp_path / "BTCUSDT-1m.csv", lines)
    store = BronzeStore(tmp_path / "lake")
    morning = DumpSource(str(path), START, START + 719 * ONE_MINUTE_MS)
    assert ingest_symbol(morning, "BTCUSDT", store).rows_written == 720
    assert not any(line.startswith("broken") for line in raw_lines(tmp_path / "lake"))
    assert ingest_symbol(DumpSource(str(path)), "BTCUSDT", store).rows_written == 720 + 1
    assert raw_lines(tmp_path / "lake") == Counter(lines)


class DurabilityLog:
    """What would survive a power loss, from the fsync, rename and mkdir calls observed.

    A file's contents survive once it was fsynced; a directory entry (a rename's target, a new
    directory) survives once its directory was fsynced after the entry appeared. A path survives
    when its contents and every entry from `root` down to it do. `root` and everything that existed
    before the log started count as durable.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.entries: set[Path] = set()
        self.pending: set[Path] = set()
        self.synced: set[Path] = set()
        self.events: list[tuple[str, str]] = []
        self.checks: list[Any] = []
        self.preexisting: set[Path] = set()

    def durable(self, path: Path) -> bool:
        if path not in self.synced:
            return False
        node = path
        while node != self.root:
            if node in self.pending or not (node in self.entries or node in self.preexisting):
                return False
            node = node.parent
        return True

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.preexisting = set(self.root.rglob("*")) | {self.root}
        self.synced |= self.preexisting
        real_fsync, real_replace, real_mkdir = os.fsync, os.replace, os.mkdir

        def fsync(fd: int) -> None:
            real_fsync(fd)
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            self.events.append(("fsync", str(path)))
            if path.is_dir():
                done = {p for p in self.pending if p.parent == path}
                self.pending -= done
                self.entries |= done
            self.synced.add(path)
            self._check()

        def replace(src: Any, dst: Any) -> None:
            real_replace(src, dst)
            source, target = Path(src), Path(dst)
            self.events.append(("replace", str(target)))
            self.synced.discard(target)
            if source in self.synced:
                self.synced.add(target)
            self.entries.discard(target)
            self.pending.add(target)
            self._check()

        def mkdir(path: Any, mode: int = 0o777, *args: Any, **kwargs: Any) -> None:
            real_mkdir(path, mode, *args, **kwargs)
            self.events.append(("mkdir", str(path)))
            self.pending.add(Path(path))
            self.synced.add(Path(path))  # a directory has no contents of its own to lose

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "mkdir", mkdir)

    def _check(self) -> None:
        for check in self.checks:
            check()


def test_a_marker_survives_a_power_loss_only_once_every_part_it_vouches_for_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = dump_lines(0, DAY, days=3, malformed_every=700)
    path = write_csv(tmp_path / "BTCUSDT-1m.csv", lines)
    lake = tmp_path / "lake"
    store = BronzeStore(lake)
    log = DurabilityLog(tmp_path)
    marker_seen_durable: list[int] = []

    def parts_durable_whenever_the_marker_is() -> None:
        markers = list((store.root / "_done" / "dump").glob("*.json"))
        if markers and log.durable(markers[0]):
            marker_seen_durable.append(len(log.events))
            parts = [p.path for p in store.parts("dump", "BTCUSDT")]
            assert len(parts) == 3 and all(log.durable(p) for p in parts), log.events

    def marker_never_visible_before_its_parts() -> None:
        if list((store.root / "_done" / "dump").glob("*.json")):
            assert raw_lines(lake) == Counter(lines)

    log.checks += [parts_durable_whenever_the_marker_is, marker_never_visible_before_its_parts]
    log.install(monkeypatch)
    ingest_symbol(DumpSource(str(path)), "BTCUSDT", store)
    monkeypatch.undo()

    parts = [p.path for p in store.parts("dump", "BTCUSDT")]
    assert all(log.durable(p) for p in parts), log.events
    assert marker_seen_durable, "the marker survives a power loss once it is written"
    # Each part: its contents are synced before the rename, its directory after it.
    for part in parts:
        renamed = log.events.index(("replace", str(part)))
        assert ("fsync", str(part.parent)) in log.events[renamed:]


def test_cleanup_skips_the_temporaries_of_a_symbol_being_written(tmp_path: Path) -> None:
    store = BronzeStore(tmp_path)
    busy = store.partition("dump", "AAAUSDT", "2024-03-01")
    idle = store.partition("dump", "BBBUSDT", "2024-03-01")
    for directory in (busy, idle):
        directory.mkdir(parents=True)
        (directory / ".tmp-left").write_text("half a part")
    (store.root / "_done" / "dump").mkdir(parents=True)
    (store.root / "_done" / "dump" / ".tmp-marker").write_text("{")
    with store.symbol_lock("dump", "AAAUSDT"):
        assert store.remove_temporaries() == 2, "BBBUSDT's and the marker's, not AAAUSDT's"
        assert (busy / ".tmp-left").exists()
        # The holder of the lock may remove its own symbol's leftovers.
        assert store.remove_own_temporaries("dump", "AAAUSDT") == 1
    assert not list(store.root.rglob(".tmp-*"))


def test_ingest_removes_its_symbols_leftover_temporaries_under_its_lock(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "BTCUSDT-1m.csv", dump_lines(0, DAY, days=1, malformed_every=500))
    store = BronzeStore(tmp_path / "lake")
    leftover = store.partition("dump", "BTCUSDT", DAY) / ".tmp-killed"
    leftover.parent.mkdir(parents=True)
    leftover.write_text("half a part")
    report = ingest_symbol(DumpSource(str(path)), "BTCUSDT", store)
    assert report.temporaries_removed == 1 and not leftover.exists()


def test_merged_ranges_join_overlapping_and_touching_ones_and_keep_open_ends() -> None:
    assert merge_ranges([(10, 20), (21, 30), (50, None), (None, 5)]) == [
        (None, 5),
        (10, 30),
        (50, None),
    ]
    assert covers([(None, 5), (10, 30)], (12, 30)) and not covers([(10, 30)], (5, 12))
    assert covers([(None, None)], (None, 3)) and not covers([], (1, 1))
