"""Bronze storage and the sim/dump sources: atomic parts, idempotent reruns, resumption."""

from __future__ import annotations

import gzip
import io
import logging
import zipfile
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest

from market.bronze import Batch, BatchMeta, BronzeStore, RawKline, read_part
from market.klines import ONE_DAY_MS, ONE_MINUTE_MS, date_start_ms, to_millis
from market.sources.base import KlineSource, ingest_symbol
from market.sources.dump import DumpSource
from market.sources.sim import SimSource
from tests.conftest import REAL_1M, require, sim_config


def all_open_times(store: BronzeStore, source: str, symbol: str) -> list[int]:
    times = []
    for part in store.parts(source, symbol):
        times += [
            to_millis(int(str(r["raw"]).strip("[").split(",")[0])) for r in read_part(part.path)
        ]
    return times


def test_parts_are_atomic_and_never_rewritten(tmp_path: Path) -> None:
    store = BronzeStore(tmp_path)
    batch = Batch(
        "sim",
        "SIMA",
        date(2024, 1, 1),
        "t1",
        [RawKline(0, "a"), RawKline(60_000, "b")],
        BatchMeta("now", "req"),
    )
    first = store.write(batch)
    assert first is not None and first.name == "part-0-60000-t1.jsonl"
    assert store.write(batch) is None
    records = list(read_part(first))
    assert [r["raw"] for r in records] == ["a", "b"]
    assert records[0]["request"] == "req" and records[0]["fetched_at"] == "now"
    (first.parent / ".tmp-deadbeef").write_text("half a part")
    assert store.remove_temporaries() == 1
    assert store.covered_until("sim", "SIMA") == 60_000


def test_ingest_reports_each_part_to_the_progress_callback_and_logs_one_info_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = sim_config(gap_rate=0.0)
    start = date_start_ms(config.anchor_date)
    source = SimSource(config, start, start + 5 * ONE_DAY_MS - ONE_MINUTE_MS)
    parts: list[int] = []
    with caplog.at_level(logging.INFO, logger="market.sources.base"):
        report = ingest_symbol(source, "SIMA", BronzeStore(tmp_path), on_part=parts.append)
    assert parts == [1440] * 5 and report.days_written == 5
    info = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(info) == 1 and "7200 rows in 5 parts" in info[0].getMessage()


def test_sim_ingest_twice_is_a_no_op(tmp_path: Path) -> None:
    config = sim_config(gap_rate=0.0)
    start = date_start_ms(config.anchor_date)
    source = SimSource(config, start, start + 2 * ONE_DAY_MS - ONE_MINUTE_MS)
    store = BronzeStore(tmp_path)
    first = ingest_symbol(source, "SIMA", store)
    assert first.rows_written == 2 * 1440 and first.days_written == 2
    again = ingest_symbol(source, "SIMA", store)
    assert again.rows_written == 0 and again.rows_already_stored == 2 * 1440
    assert len(all_open_times(store, "sim", "SIMA")) == 2 * 1440


class JobKilledError(RuntimeError):
    """Stands for the job being killed between two batches."""


class DiesAfter:
    """Wraps a source and raises after `n` batches, like a job killed mid-run."""

    def __init__(self, inner: KlineSource, n: int) -> None:
        self.inner, self.n, self.name = inner, n, inner.name

    def batches(self, symbol: str, store: BronzeStore) -> Iterator[Batch]:
        for i, batch in enumerate(self.inner.batches(symbol, store)):
            if i == self.n:
                raise JobKilledError
            yield batch


def test_killed_sim_ingest_resumes_without_gaps_or_duplicates(tmp_path: Path) -> None:
    config = sim_config(gap_rate=0.0)
    start = date_start_ms(config.anchor_date)
    source = SimSource(config, start, start + 4 * ONE_DAY_MS - ONE_MINUTE_MS)
    store = BronzeStore(tmp_path)
    with pytest.raises(JobKilledError):
        ingest_symbol(DiesAfter(source, 2), "SIMA", store)
    assert len(all_open_times(store, "sim", "SIMA")) == 2 * 1440
    ingest_symbol(source, "SIMA", store)
    times = sorted(all_open_times(store, "sim", "SIMA"))
    assert times == list(range(start, start + 4 * ONE_DAY_MS, ONE_MINUTE_MS))


def test_extending_a_sim_range_mid_day_adds_only_the_new_minutes(tmp_path: Path) -> None:
    config = sim_config(gap_rate=0.0)
    start = date_start_ms(config.anchor_date)
    store = BronzeStore(tmp_path)
    ingest_symbol(SimSource(config, start, start + 600 * ONE_MINUTE_MS), "SIMA", store)
    ingest_symbol(SimSource(config, start, start + ONE_DAY_MS - ONE_MINUTE_MS), "SIMA", store)
    times = sorted(all_open_times(store, "sim", "SIMA"))
    assert times == list(range(start, start + ONE_DAY_MS, ONE_MINUTE_MS))


DUMP_LINES = [
    "1704067200000,42283.58,42298.62,42261.02,42298.61,35.92724,1704067259999,"
    "1519032.02,1327,21.7146,918216.77,0",
    "1704067260000,42298.62,42320.0,42298.61,42320.0,21.65384,1704067319999,"
    "916233.64,1062,12.27178,519231.56,0",
]
MICRO_LINE = (
    "1735689600000000,93576.0,93610.93,93537.5,93610.93,8.21827,1735689659999999,"
    "768978.36,1317,4.06987,380850.42,0"
)


def write_dump(path: Path, lines: list[str], header: bool = False) -> Path:
    text = (
        "open_time,open,high,low,close,volume,close_time,quote_volume,count,"
        "taker_buy_volume,taker_buy_quote_volume,ignore\n"
        if header
        else ""
    )
    text += "\n".join(lines) + "\n"
    if path.suffix == ".zip":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr(path.stem + ".csv", text)
        path.write_bytes(buffer.getvalue())
    elif path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize(
    "name",
    ["BTCUSDT-1m-2024-01-01.zip", "BTCUSDT-1m-2024-01-01.csv.gz", "BTCUSDT-1m-2024-01-01.csv"],
)
def test_dump_files_of_every_kind_are_stored_as_received(tmp_path: Path, name: str) -> None:
    path = write_dump(tmp_path / name, DUMP_LINES, header=True)
    store = BronzeStore(tmp_path / "lake")
    report = ingest_symbol(DumpSource(str(path)), "BTCUSDT", store)
    assert report.rows_written == 2
    (part,) = store.parts("dump", "BTCUSDT")
    assert [r["raw"] for r in read_part(part.path)] == DUMP_LINES
    assert part.day == "2024-01-01"
    again = ingest_symbol(DumpSource(str(path)), "BTCUSDT", store)
    assert again.rows_written == 0


def test_microsecond_dumps_and_malformed_lines(tmp_path: Path) -> None:
    path = write_dump(tmp_path / "BTCUSDT-1m-2025-01-01.csv", [MICRO_LINE, "garbage,,", MICRO_LINE])
    store = BronzeStore(tmp_path / "lake")
    report = ingest_symbol(DumpSource(str(path)), "BTCUSDT", store)
    assert report.rows_written == 3, "a malformed line is kept for the ETL to quarantine"
    (part,) = store.parts("dump", "BTCUSDT")
    assert part.day == "2025-01-01" and part.first_ms == 1_735_689_600_000


@pytest.mark.realdata
def test_the_real_dump_lands_one_part_per_day(tmp_path: Path) -> None:
    require(REAL_1M)
    end = date_start_ms(date(2023, 12, 4)) - ONE_MINUTE_MS
    store = BronzeStore(tmp_path)
    report = ingest_symbol(DumpSource(str(REAL_1M), end_ms=end), "BTCUSDT", store)
    assert report.rows_written == 3 * 1440
    assert [p.day for p in store.parts("dump", "BTCUSDT")] == [
        "2023-12-01",
        "2023-12-02",
        "2023-12-03",
    ]
