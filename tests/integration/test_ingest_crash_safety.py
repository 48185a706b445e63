"""Bronze ingestion as real processes: two at once over one lake, and SIGKILLs at random points.

The processes run `tests.ingest_child` (the Bronze writes of `jobs.ingest --source dump` without
Ray, which would cost seconds per start). Run under the shared lock: `flock /tmp/ray-test.lock`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import pytest

from market.bronze import BronzeStore
from market.klines import ONE_MINUTE_MS, date_start_ms
from tests.ingest_child import (
    MALFORMED_EVERY,
    day_range_iso,
    dump_lines,
    stored_rows,
    write_dump_file,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FIRST_DAY = date(2024, 3, 1)
DAYS = 3
SYMBOLS = ("AAAUSDT", "BBBUSDT")


def child(lake: Path, dumps: Path, *extra: str, symbols: str = ",".join(SYMBOLS)) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tests.ingest_child",
        "--lake",
        str(lake),
        "--path",
        str(dumps / "*.csv"),
        "--symbols",
        symbols,
        *extra,
    ]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def run_child(lake: Path, dumps: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        child(lake, dumps, *extra), env=env(), capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def dumps(tmp_path: Path) -> Path:
    directory = tmp_path / "dumps"
    directory.mkdir()
    for i, symbol in enumerate(SYMBOLS):
        write_dump_file(directory, symbol, i, FIRST_DAY, DAYS)
    return directory


@pytest.fixture
def reference(tmp_path: Path, dumps: Path) -> Counter[tuple[str, str, str, str, str]]:
    """The rows of one clean, uninterrupted run."""
    lake = tmp_path / "clean"
    done = run_child(lake, dumps)
    assert done.returncode == 0, done.stderr
    rows = stored_rows(lake)
    lines = [
        line
        for i in range(len(SYMBOLS))
        for line in dump_lines(i, FIRST_DAY, DAYS, MALFORMED_EVERY)
    ]
    assert sum(rows.values()) == len(lines) == 2 * (DAYS * 1440 + 4)
    assert max(rows.values()) == 1
    return rows


def temporaries(lake: Path) -> list[Path]:
    return list((lake / "bronze").rglob(".tmp-*"))


def test_two_ingests_over_one_lake_at_once_both_succeed(
    tmp_path: Path, dumps: Path, reference: Counter[tuple[str, str, str, str, str]]
) -> None:
    lake, ready = tmp_path / "lake", tmp_path / "ready"
    # The first holds a finished temporary of AAAUSDT while the second cleans up and ingests
    # both symbols: the second must neither delete that temporary nor store its rows twice.
    first = subprocess.Popen(
        child(lake, dumps, "--pause-at-rename", "3", "--ready", str(ready)),
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.01)
    assert temporaries(lake), "the first process holds a temporary"
    second = run_child(lake, dumps)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert second.returncode == 0, second.stderr
    assert stored_rows(lake) == reference
    totals = [json.loads(out), json.loads(second.stdout)]
    assert sum(t["rows_written"] for t in totals) == sum(reference.values())
    assert not temporaries(lake)


def check_markers_vouch_for_their_rows(
    lake: Path, reference: Counter[tuple[str, str, str, str, str]]
) -> None:
    """Every dump marker's ranges hold all of its file's rows in those ranges, already."""
    stored = stored_rows(lake)
    for marker in (BronzeStore(lake).root / "_done" / "dump").glob("*.json"):
        symbol = marker.stem.split("-", 1)[0]
        for low, high in json.loads(marker.read_text())["ranges"]:
            vouched = [
                key
                for key in reference
                if key[1] == symbol
                and (low is None or low <= _position(key[4]))
                and (high is None or _position(key[4]) <= high)
            ]
            missing = [key for key in vouched if stored[key] != 1]
            assert not missing, f"{marker.name} vouches for {len(missing)} rows not stored"


def _position(raw: str) -> int:
    """A line's open time; for a malformed `broken-S-i` line, that of bar i, which it follows."""
    head = raw.split(",", 1)[0]
    if head.isdigit():
        return int(head)
    return date_start_ms(FIRST_DAY) + int(head.rsplit("-", 1)[1]) * ONE_MINUTE_MS


def test_ingests_sigkilled_at_random_points_rerun_to_exactly_a_clean_runs_rows(
    tmp_path: Path, dumps: Path, reference: Counter[tuple[str, str, str, str, str]]
) -> None:
    rng = random.Random(20240301)
    # The write events (fsyncs and renames) of one clean run, to aim the kills at.
    probe = tmp_path / "probe"
    events = _count_events(probe, dumps)
    narrow = day_range_iso(date(2024, 3, 2), 1)
    kills = mid_write = external = rounds = 0
    started = time.perf_counter()
    while kills < 18:
        rounds += 1
        assert rounds <= 40, f"only {kills} kills landed in 40 rounds"
        lake = tmp_path / f"round{rounds}"
        # Every other round starts with a narrower range (one day) and widens on a rerun.
        first_args = ("--start", narrow[0], "--end", narrow[1]) if rounds % 2 == 0 else ()
        for attempt in range(3):
            args = first_args if attempt == 0 else ()
            if attempt == 0 and rounds % 3 == 0:
                outcome = _kill_after_random_delay(lake, dumps, rng, args)
                external += outcome
            else:
                # One kill a round lands right after a part's temporary is written.
                kill = ("--kill-at-part", str(rng.randint(1, 3)))
                if attempt != 1:
                    kill = ("--kill-at", str(rng.randint(1, events)))
                result = run_child(lake, dumps, *kill, *args)
                outcome = int(result.returncode == -signal.SIGKILL)
                assert outcome or result.returncode == 0, result.stderr
            kills += outcome
            mid_write += bool(outcome and _part_temporaries(lake))
            check_markers_vouch_for_their_rows(lake, reference)
        final = run_child(lake, dumps)
        assert final.returncode == 0, final.stderr
        stored = stored_rows(lake)
        lost = sum((reference - stored).values())
        duplicated = sum((stored - reference).values())
        assert (lost, duplicated) == (0, 0), f"round {rounds}: {lost} lost, {duplicated} extra"
        assert stored == reference
        assert not temporaries(lake)
    elapsed = time.perf_counter() - started
    print(
        f"{kills} kills ({external} by timer, {mid_write} with a part's temporary on disk) "
        f"in {rounds} rounds, {events} write events per clean run, {elapsed:.1f} s"
    )
    assert mid_write >= 3, "some kills land mid-write, with a part's temporary on disk"


def _part_temporaries(lake: Path) -> list[Path]:
    return [p for p in temporaries(lake) if "_done" not in p.parts]


def _count_events(lake: Path, dumps: Path) -> int:
    """Write events (fsyncs, renames) of a clean run: kill points past them let a run finish."""
    result = run_child(lake, dumps)
    assert result.returncode == 0, result.stderr
    return int(json.loads(result.stdout)["write_events"])


def _kill_after_random_delay(
    lake: Path, dumps: Path, rng: random.Random, args: tuple[str, ...]
) -> int:
    """SIGKILL from outside once the process has started writing; 1 if it died of it."""
    process = subprocess.Popen(
        child(lake, dumps, *args), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    bronze = lake / "bronze"
    deadline = time.monotonic() + 30
    while not bronze.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(rng.uniform(0.0, 0.15))  # a run's writes take a few tenths of a second
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    return int(process.returncode == -signal.SIGKILL)
