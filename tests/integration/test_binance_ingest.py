"""BinanceClient and BinanceSource against a real local HTTP server that speaks Binance's API.

The HTTP traffic is real (tests/fake_binance.py serves klines from the real BTCUSDT dump); only
sleeping is faked, so retries and rate limits are recorded instead of waited for.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from configs.schema import BinanceConfig
from market.bronze import BronzeStore, PartInfo, read_part
from market.klines import ONE_DAY_MS, ONE_MINUTE_MS, utc_date
from market.sources.base import IngestReport, ingest_symbol
from market.sources.binance import BinanceAPIError, BinanceClient, BinanceSource
from tests.fake_binance import KLINES_PATH, FakeBinance, Fault, load_dump_lines

pytestmark = pytest.mark.integration

DUMP = (
    Path(__file__).resolve().parents[2].parent
    / "shared/data/raw/BTCUSDT-1m-spot-2023-12-01_2024-12-31.csv.gz"
)
SYMBOL = "BTCUSDT"
DAY1 = 1_701_388_800_000  # 2023-12-01 00:00 UTC, the dump's first minute
DAY2 = DAY1 + ONE_DAY_MS
DAY3 = DAY2 + ONE_DAY_MS
DAY4 = DAY3 + ONE_DAY_MS
SERVED_DAYS = 4  # the server also holds a day after every requested range


class SleepRecorder:
    """A fake `sleep` that records each wait and, given a fake clock, advances it."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.sleeps: list[float] = []
        self.clock = clock

    def __call__(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.clock is not None:
            self.clock.now += seconds


class FakeClock:
    """Wall-clock seconds that only move when someone sleeps."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def dump_lines() -> list[str]:
    if not DUMP.exists():
        pytest.skip(f"real Binance dump not found at {DUMP} (../shared/data is absent)")
    return load_dump_lines(DUMP, SERVED_DAYS * 1440)


@pytest.fixture
def make_server(dump_lines: list[str]) -> Iterator[Callable[..., FakeBinance]]:
    servers: list[FakeBinance] = []

    def make(**kwargs: Any) -> FakeBinance:
        server = FakeBinance(dump_lines, **kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def make_client() -> Iterator[Callable[..., BinanceClient]]:
    clients: list[BinanceClient] = []

    def make(
        server: FakeBinance,
        sleep: Callable[[float], None],
        clock: Callable[[], float] | None = None,
        **config: Any,
    ) -> BinanceClient:
        settings: dict[str, Any] = {"base_url": server.url, "timeout_s": 5.0, **config}
        extra: dict[str, Any] = {} if clock is None else {"clock": clock}
        client = BinanceClient(
            BinanceConfig(**settings), sleep=sleep, rng=random.Random(7), **extra
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def ingest(
    client: BinanceClient, store: BronzeStore, start: int, end: int, symbol: str = SYMBOL
) -> IngestReport:
    """One ingestion run over [start, end], with a clock well after `end` (all bars closed)."""
    source = BinanceSource(client, start, end, clock=lambda: end / 1000 + 3600)
    return ingest_symbol(source, symbol, store)


def stored_records(store: BronzeStore) -> list[tuple[PartInfo, dict[str, Any]]]:
    return [(p, dict(r)) for p in store.parts("binance", SYMBOL) for r in read_part(p.path)]


def stored_open_times(store: BronzeStore) -> list[int]:
    return [int(json.loads(str(r["raw"]))[0]) for _, r in stored_records(store)]


def assert_exactly_once(store: BronzeStore, server: FakeBinance, start: int, end: int) -> None:
    times = stored_open_times(store)
    duplicated = [t for t, n in Counter(times).items() if n > 1]
    assert duplicated == [], f"{len(duplicated)} minutes stored more than once"
    assert sorted(times) == server.open_times_between(start, end)


def klines_starts(server: FakeBinance) -> list[int | None]:
    return [r.start_time for r in server.klines_requests]


def test_pagination_stores_every_minute_once_partitioned_by_utc_date(
    make_server: Callable[..., FakeBinance],
    make_client: Callable[..., BinanceClient],
    tmp_path: Path,
) -> None:
    server = make_server()
    sleeps = SleepRecorder()
    client = make_client(server, sleeps)
    store = BronzeStore(tmp_path)
    start, end = DAY1 + 17 * ONE_MINUTE_MS, DAY3 + ONE_DAY_MS - ONE_MINUTE_MS

    report = ingest(client, store, start, end)

    expected = server.open_times_between(start, end)
    assert len(expected) == 3 * 1440 - 17
    assert_exactly_once(store, server, start, end)
    assert report.rows_written == len(expected)
    assert sleeps.sleeps == []
    # Pagination follows the last open time: each page starts a minute after the previous one.
    requests = server.klines_requests
    assert len(requests) == -(-len(expected) // 1000)
    assert requests[0].start_time == start
    for before, after in itertools.pairwise(requests):
        assert after.start_time == before.open_times[-1] + ONE_MINUTE_MS
    assert all(r.end_time == end and r.params["limit"] == "1000" for r in requests)
    assert [r.weight_header for r in requests] == [2 * (i + 1) for i in range(len(requests))]

    parts = store.parts("binance", SYMBOL)
    assert sorted({p.day for p in parts}) == ["2023-12-01", "2023-12-02", "2023-12-03"]
    by_time = {int(k[0]): k for k in server.klines}
    for part in parts:
        assert part.tag == "rest"
        assert part.path.parent.name == f"date={part.day}"
        records = list(read_part(part.path))
        times = [int(json.loads(str(r["raw"]))[0]) for r in records]
        assert {str(utc_date(t)) for t in times} == {part.day}
        assert (min(times), max(times)) == (part.first_ms, part.last_ms)
        for record in records:
            raw = str(record["raw"])
            kline = json.loads(raw)
            assert len(kline) == 12
            assert raw == json.dumps(by_time[kline[0]], separators=(",", ":"))
            assert isinstance(kline[0], int) and isinstance(kline[1], str)
            fetched_at = datetime.fromisoformat(str(record["fetched_at"]))
            assert fetched_at.tzinfo is not None
            assert abs((datetime.now(UTC) - fetched_at).total_seconds()) < 300
            request = str(record["request"])
            assert request.startswith(f"GET {KLINES_PATH}?symbol={SYMBOL}&interval=1m&startTime=")
            assert f"&endTime={end}&limit=1000" in request
            # The request recorded for a row is the page that brought it.
            page_start = int(request.split("startTime=")[1].split("&")[0])
            assert page_start <= kline[0] < page_start + 1000 * ONE_MINUTE_MS
    first_part = next(p for p in parts if p.day == "2023-12-01")
    assert first_part.first_ms == start


def test_only_closed_klines_are_stored(
    make_server: Callable[..., FakeBinance],
    make_client: Callable[..., BinanceClient],
    tmp_path: Path,
) -> None:
    server = make_server()
    client = make_client(server, SleepRecorder())
    store = BronzeStore(tmp_path)
    now_s = (DAY1 + 100 * ONE_MINUTE_MS) / 1000 + 30  # 01:40:30, the 01:40 bar is still open
    source = BinanceSource(client, DAY1, DAY2 - ONE_MINUTE_MS, clock=lambda: now_s)

    ingest_symbol(source, SYMBOL, store)

    assert sorted(stored_open_times(store)) == server.open_times_between(
        DAY1, DAY1 + 99 * ONE_MINUTE_MS
    )
    assert server.klines_requests[0].end_time == DAY1 + 99 * ONE_MINUTE_MS


@pytest.mark.parametrize("status", [429, 418])
def test_rate_limit_sleeps_exactly_retry_after_then_succeeds(
    status: int,
    make_server: Callable[..., FakeBinance],
    make_client: Callable[..., BinanceClient],
    tmp_path: Path,
) -> None:
    server = make_server(faults=[None, Fault.rate_limited(7, status=status)])
    sleeps = SleepRecorder()
    client = make_client(server, sleeps)
    store = BronzeStore(tmp_path)
    start, end = DAY1, DAY2 + ONE_DAY_MS - ONE_MINUTE_MS

    ingest(client, store, start, end)

    assert sleeps.sleeps == [7.0]
    assert client.retries_done == 1
    requests = server.klines_requests
    assert [r.status for r in requests] == [200, status, 200, 200]
    assert requests[1].start_time == requests[2].start_time == DAY1 + 1000 * ONE_MINUTE_MS
    assert_exactly_once(store, server, start, end)


def test_5xx_are_retried_with_bounded_backoff(
    make_server: Callable[..., FakeBinance],
    make_client: Callable[..., BinanceClient],
    tmp_path: Path,
) -> None:
    faults = [None, Fault.http(500), Fault.http(502), Fault.http(503), Fault.http(502)]
    server = make_server(faults=faults)
    sleeps = SleepRecorder()
    client = make_client(server, sleeps, max_retries=5, backoff_base_s=0.5, backoff_max_s=1.5)
    store = BronzeStore(tmp_path)
    start, end = DAY1, DAY2 + ONE_DAY_MS - ONE_MINUTE_MS

    ingest(client, store, start, end)

    assert len(sleeps.sleeps) == 4
    for attempt, slept in enumerate(sleeps.sleeps):
        assert 0 < slept <= min(1.5, 0.5 * 2**attempt)
    assert [r.status for r in server.klines_requests] == [200, 500, 502, 503, 502, 200, 200]
    assert len(set(klines_starts(server)[1:6])) == 1  # the same page, asked again
    assert_exactly_once(store, server, start, end)


def test_more_5xx_than_max_retries_raises_and_keeps_what_was_stored(
    make_server: Callable[..., FakeBinance],
    make_client: Callable[..., BinanceClient],
    tmp_path: Path,
) -> None:
    server = make_server(faults=[None, None], then=Fault.http(503))
    sleeps = SleepRecorder()
    client = make_client(server, sleeps, max_retries=3, backoff_max_s=2.0)
    store = BronzeStore(tmp_path)

    with pytest.raises(BinanceAPIError, match=r"giving up after 3 retries: HTTP 503"):
        ingest(client, store, DAY1, DAY4 - ONE_MINUTE_MS)

    assert [r.status for r in server.klines_requests] == [200, 200] + [503] * 4
    assert len(sleeps.sleeps) == 3 and all(0 < s <= 2.0 for s in sleeps.sleeps)
    # Day 1 was complete (page 2 reached day 2) and is stored whole; day 2's rows were pending.
    parts = store.parts("binance", SYMBOL)
    assert [(p.day, p.first_ms, p.last_ms) for p in parts] == [
        ("2023-12-01", DAY1, DAY2 - ONE_MINUTE_MS)
    ]
    assert_exactly_once(store, server, DAY1, DAY2 - ONE_MINUTE_MS)
    assert not list(tmp_path.rglob(".tmp-*"))


def test_short_pages_do_not_stop_pagination(
    make_server: Callable[..., FakeBinance],
    make_client: Callable[..., BinanceClient],
    tmp_path: Path,
) -> None:
    faults = [Fault.short(), Fault.short(1), None, Fault.short(), Fault.short(17), Fault.short()]
    server = make_server(faults=faults)
    sleeps = SleepRecorder()
    client = make_client(server, sleeps)
    store = BronzeStore(tmp_path)
    start, end = DAY1, DAY3 + ONE_DAY_MS - ONE_MINUTE_MS

    report = ingest(client, store, start, end)

    rows = [r.rows for r in server.klines_requests]
    assert rows[:6] == [333, 1, 1000, 333, 17, 333]
    assert sum(rows) == 3 * 1440
    assert report.rows_written == 3 * 1440
    assert sleeps.sleeps == []
    assert_exactly_once(store, server, start, end)


def test_server_duplicates_land_and_no_minute_is_missing(
    make_server: Callable[..., FakeBinance],
    make_client: Callable[..., BinanceClient],
    tmp_path: Path,
) -> None:
    # Page 2 repeats the last 3 rows of page 1 (all still pending in day 1), page 3 holds one
    # row twice, page 5 repeats the last row of page 4.
    faults = [None, Fault.dup_previous(3), Fault.dup_inside(5), None, Fault.dup_previous(1)]
    server = make_server(faults=faults)
    client = make_client(server, SleepRecorder())
    store = BronzeStore(tmp_path)
    start, end = DAY1, DAY3 + ONE_DAY_MS - ONE_MINUTE_MS

    report = ingest(client, store, start, end)

    times = stored_open_times(store)
    counts = Counter(times)
    duplicates = sum(n - 1 for n in counts.values())
    assert sorted(counts) == server.open_times_between(start, end)  # no minute is missing
    served = sum(r.rows for r in server.klines_requests)
    assert len(times) == served - report.rows_already_stored
    assert duplicates == 3 + 1 + 1
    assert {t for t, n in counts.items() if n > 1} == {
        DAY1 + 997 * ONE_MINUTE_MS,
        DAY1 + 998 * ONE_MINUTE_MS,
        DAY1 + 999 * ONE_MINUTE_MS,
        server.klines_requests[2].open_times[5],
        server.klines_requests[3].open_times[-1],
    }


def test_duplicates_of_an_already_written_day_are_not_stored_again(
    make_server: Callable[..., FakeBinance],
    make_client: Callable[..., BinanceClient],
    tmp_path: Path,
) -> None:
    # Page 2 reaches day 2, so day 1 is written; page 3 then repeats 600 rows of page 2: the
    # last 40 minutes of day 1 (already stored) and the first 560 of day 2.
    server = make_server(faults=[None, None, Fault.dup_previous(600)])
    client = make_client(server, SleepRecorder())
    store = BronzeStore(tmp_path)
    start, end = DAY1, DAY3 + ONE_DAY_MS - ONE_MINUTE_MS

    report = ingest(client, store, start, end)

    assert report.rows_already_stored == 600
    assert_exactly_once(store, server, start, end)


@pytest.mark.parametrize(
    "fault",
    [Fault.drop(partial=True), Fault.drop(partial=False), Fault.truncated_json()],
    ids=["drop-mid-body", "drop-before-answer", "truncated-json"],
)
def test_connection_drop_is_retried_without_gaps_or_duplicates(
    fault: Fault,
    make_server: Callable[..., FakeBinance],
    make_client: Callable[..., BinanceClient],
    tmp_path: Path,
) -> None:
    server = make_server(faults=[None, fault, None, fault])
    sleeps = SleepRecorder()
    client = make_client(server, sleeps, backoff_max_s=3.0)
    store = BronzeStore(tmp_path)
    start, end = DAY1, DAY3 + ONE_DAY_MS - ONE_MINUTE_MS

    ingest(client, store, start, end)

    assert len(sleeps.sleeps) == 2 and all(0 <= s <= 3.0 for s in sleeps.sleeps)
    assert client.retries_done == 2
    starts = klines_starts(server)
    assert starts[1] == starts[2] and starts[3] == starts[4]
    assert_exactly_once(store, server, start, end)


def test_resume_starts_after_the_last_stored_minute_and_reruns_are_no_ops(
    make_server: Callable[..., FakeBinance],
    make_client: Callable[..., BinanceClient],
    tmp_path: Path,
) -> None:
    server = make_server()
    client = make_client(server, SleepRecorder())
    store = BronzeStore(tmp_path)
    end = DAY4 - ONE_MINUTE_MS

    first = ingest(client, store, DAY1, DAY2 - ONE_MINUTE_MS)
    assert first.rows_written == 1440
    assert len(server.klines_requests) == 2

    second = ingest(client, store, DAY1, end)
    requests = server.klines_requests[2:]
    assert requests[0].start_time == DAY2
    assert second.rows_written == 2 * 1440 and second.rows_already_stored == 0
    assert_exactly_once(store, server, DAY1, end)

    files = {p.path: (p.path.stat().st_mtime_ns, p.path.read_bytes()) for p in store.parts()}
    seen = len(server.requests)
    third = ingest(client, store, DAY1, end)
    assert len(server.requests) == seen  # nothing new to ask for
    assert (third.rows_written, third.days_written, third.parts) == (0, 0, [])
    after = {p.path: (p.path.stat().st_mtime_ns, p.path.read_bytes()) for p in store.parts()}
    assert after == files
    assert_exactly_once(store, server, DAY1, end)


def test_interrupted_run_then_healthy_rerun_stores_every_minute_once(
    make_server: Callable[..., FakeBinance],
    make_client: Callable[..., BinanceClient],
    tmp_path: Path,
) -> None:
    store = BronzeStore(tmp_path)
    start, end = DAY1 + 5 * ONE_MINUTE_MS, DAY4 - ONE_MINUTE_MS
    broken = make_server(faults=[None] * 4, then=Fault.http(500))
    with pytest.raises(BinanceAPIError):
        ingest(
            make_client(broken, SleepRecorder(), page_limit=500, max_retries=1), store, start, end
        )
    assert [r.status for r in broken.klines_requests] == [200] * 4 + [500, 500]
    # 2000 rows arrived: day 1 was written, day 2's 565 pending rows were lost with the error.
    covered = store.covered_until("binance", SYMBOL)
    assert covered == DAY2 - ONE_MINUTE_MS

    healthy = make_server()
    ingest(make_client(healthy, SleepRecorder(), page_limit=500), store, start, end)

    assert healthy.klines_requests[0].start_time == DAY2
    assert_exactly_once(store, healthy, start, end)


def test_weight_budget_waits_for_the_next_minute_after_five_requests(
    make_server: Callable[..., FakeBinance],
    make_client: Callable[..., BinanceClient],
    tmp_path: Path,
) -> None:
    clock = FakeClock(1_800_000_020.0)  # 20 s into a minute
    server = make_server(clock=clock)  # the server's minute window follows the same clock
    sleeps = SleepRecorder(clock)
    client = make_client(
        server,
        sleeps,
        clock=clock,
        page_limit=100,
        weight_limit_per_minute=10,
        weight_safety=1.0,
        klines_weight=2,
    )
    store = BronzeStore(tmp_path)
    start, end = DAY1, DAY1 + 649 * ONE_MINUTE_MS  # 7 pages

    ingest(client, store, start, end)

    assert sleeps.sleeps == [pytest.approx(40.05)]
    assert [r.weight_header for r in server.klines_requests] == [2, 4, 6, 8, 10, 2, 4]
    assert_exactly_once(store, server, start, end)


def test_server_used_weight_header_near_the_limit_makes_the_client_wait(
    make_server: Callable[..., FakeBinance],
    make_client: Callable[..., BinanceClient],
    tmp_path: Path,
) -> None:
    clock = FakeClock(1_800_000_030.0)  # 30 s into a minute
    # Other clients on this IP used most of the minute's weight: the server reports 5990.
    server = make_server(clock=clock, faults=[Fault.used_weight(5990)])
    sleeps = SleepRecorder(clock)
    client = make_client(server, sleeps, clock=clock)  # 6000 * 0.8 = 4800 usable
    store = BronzeStore(tmp_path)
    start, end = DAY1, DAY2 + ONE_DAY_MS - ONE_MINUTE_MS

    ingest(client, store, start, end)

    assert sleeps.sleeps == [pytest.approx(30.05)]
    assert [r.weight_header for r in server.klines_requests] == [5990, 2, 4]
    assert_exactly_once(store, server, start, end)


def test_unknown_symbol_raises_with_binance_message_and_no_retry(
    make_server: Callable[..., FakeBinance],
    make_client: Callable[..., BinanceClient],
    tmp_path: Path,
) -> None:
    server = make_server()
    sleeps = SleepRecorder()
    client = make_client(server, sleeps)
    store = BronzeStore(tmp_path)

    with pytest.raises(BinanceAPIError, match="Invalid symbol") as error:
        ingest(client, store, DAY1, DAY2 - ONE_MINUTE_MS, symbol="NOPEUSDT")

    assert "HTTP 400" in str(error.value) and '"code":-1121' in str(error.value)
    assert [(r.params["symbol"], r.status) for r in server.klines_requests] == [("NOPEUSDT", 400)]
    assert sleeps.sleeps == [] and client.retries_done == 0
    assert store.parts() == []


def test_fake_server_speaks_binance_klines(
    make_server: Callable[..., FakeBinance], dump_lines: list[str]
) -> None:
    """The fake itself: windowing, limit, order and error bodies, over real HTTP."""
    server = make_server()
    last = DAY1 + SERVED_DAYS * ONE_DAY_MS - ONE_MINUTE_MS
    with httpx.Client(base_url=server.url) as http:
        answer = http.get(
            KLINES_PATH,
            params={
                "symbol": SYMBOL,
                "interval": "1m",
                "startTime": DAY1 + 30_000,  # between two open times
                "endTime": DAY1 + 10 * ONE_MINUTE_MS,
                "limit": 5,
            },
        )
        assert answer.status_code == 200
        assert answer.headers["x-mbx-used-weight-1m"] == "2"
        rows = answer.json()
        assert [r[0] for r in rows] == [DAY1 + i * ONE_MINUTE_MS for i in range(1, 6)]
        assert rows[0] == [
            int(v) if i in (0, 6, 8) else v for i, v in enumerate(dump_lines[1].split(","))
        ]
        tail = http.get(
            KLINES_PATH,
            params={"symbol": SYMBOL, "interval": "1m", "startTime": last - ONE_MINUTE_MS},
        ).json()
        assert [r[0] for r in tail] == [last - ONE_MINUTE_MS, last]  # default limit, data's end
        latest = http.get(KLINES_PATH, params={"symbol": SYMBOL, "interval": "1m"}).json()
        assert len(latest) == 500 and latest[-1][0] == last  # no startTime: the newest klines
        bad = http.get(KLINES_PATH, params={"symbol": "XYZ", "interval": "1m"})
        assert (bad.status_code, bad.json()) == (400, {"code": -1121, "msg": "Invalid symbol."})
        assert bad.headers["x-mbx-used-weight-1m"] == "8"
    assert utc_date(last) == date(2023, 12, 4)


def test_missing_ranges_backfills_before_and_between_stored_parts() -> None:
    from market.sources.binance import missing_ranges

    minute = 60_000
    covered = [(10 * minute, 19 * minute), (30 * minute, 39 * minute)]
    assert missing_ranges(covered, 0, 49 * minute) == [
        (0, 9 * minute),
        (20 * minute, 29 * minute),
        (40 * minute, 49 * minute),
    ]
    assert missing_ranges(covered, 12 * minute, 35 * minute) == [(20 * minute, 29 * minute)]
    assert missing_ranges([(0, 99 * minute)], 0, 50 * minute) == []
