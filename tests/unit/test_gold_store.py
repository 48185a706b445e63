"""GoldStore on SQLite files: recording, outcome filling, history, summaries, URL errors."""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from serve.engine.gold import GoldStore, SignalRecord
from serve.engine.snapshot import OutcomeSummary

T0 = 1_706_572_800_000  # 2024-01-30 00:00 UTC, epoch ms
MINUTE = 60_000
H = 10  # horizon, minutes
NOW = T0 + 3_600_000


def rec(
    t: int,
    signal: str = "BUY",
    close: float = 100.0,
    symbol: str = "BTCUSDT",
    model_version: str = "m1",
) -> SignalRecord:
    return SignalRecord(
        symbol=symbol,
        bar_open_time_ms=t,
        signal=signal,
        confidence=0.6,
        p_up=0.6 if signal == "BUY" else 0.4,
        predicted_return=0.001,
        predicted_close=close * math.exp(0.001),
        close=close,
        horizon_minutes=H,
        model_version=model_version,
        feature_spec_hash="abcdef0123456789",
        reason=None if signal != "NEUTRAL" else "below threshold",
        served_at_ms=t + MINUTE + 150,
    )


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'nested' / 'dir' / 'gold.sqlite'}"


@pytest.fixture
def store(url: str) -> GoldStore:
    return GoldStore(url)


def by_time(store: GoldStore, symbol: str = "BTCUSDT") -> dict[int, dict[str, object]]:
    return {row["bar_open_time_ms"]: row for row in store.history(symbol, 1000)}


def test_record_and_duplicate(store: GoldStore) -> None:
    assert store.record(rec(T0)) is True
    assert store.record(rec(T0)) is False  # same (symbol, bar, model): kept once, no error
    assert store.record(replace(rec(T0), confidence=0.9)) is False  # the first write wins
    # Another model's record of the bar is kept for the history, but the bar is counted once.
    assert store.record(rec(T0, model_version="m2")) is False
    assert store.record(rec(T0, symbol="ETHUSDT")) is True
    assert len(store.history(None, 100)) == 3
    assert store.history("BTCUSDT", 100)[-1]["confidence"] == 0.6
    assert store.counts_by_signal() == {("BTCUSDT", "BUY"): 1, ("ETHUSDT", "BUY"): 1}


# m1 says BUY and m2 says SELL, so the summary shows which record stands for the bar.
SIGNAL_OF = {"m1": "BUY", "m2": "SELL"}


@pytest.mark.parametrize(
    "served",
    [("m1", "m2"), ("m2", "m1"), ("m1", "m2", "m1")],
    ids=["promotion", "rollback", "promotion-then-rollback"],
)
def test_a_bar_served_by_several_models_counts_once(
    store: GoldStore, served: tuple[str, ...]
) -> None:
    # A model swap recomputes the latest bar's signal: the same (symbol, bar) is recorded again.
    recorded = [store.record(rec(T0, SIGNAL_OF[m], model_version=m)) for m in served]
    assert recorded == [True] + [False] * (len(served) - 1)
    assert store.fill_outcomes("BTCUSDT", {T0 + H * MINUTE: 101.0}, NOW) == 2

    rows = store.history("BTCUSDT", 10)
    assert [r["model_version"] for r in rows] == [served[1], served[0]]  # both kept, newest first
    assert all(r["filled_at_ms"] == NOW for r in rows)
    first = rows[1]  # the record served at the bar's close: the one that counts
    (btc,) = store.outcome_summary()
    assert (btc.signals, btc.filled, btc.directional) == (1, 1, 1)
    assert btc.hits == (1 if first["hit"] else 0)
    assert btc.hit_rate == (1.0 if first["hit"] else 0.0)
    assert btc.pnl_bps == pytest.approx(first["pnl_bps"], rel=1e-12)
    assert abs(btc.pnl_bps) == pytest.approx(100.0, rel=1e-9)
    assert store.counts_by_signal() == {("BTCUSDT", SIGNAL_OF[served[0]]): 1}


# The schema before the accounted flag, as an earlier release created it.
OLD_SCHEMA = """
CREATE TABLE gold_signals (
    id INTEGER NOT NULL,
    symbol VARCHAR(32) NOT NULL,
    bar_open_time_ms BIGINT NOT NULL,
    signal VARCHAR(8) NOT NULL,
    confidence DOUBLE NOT NULL,
    p_up DOUBLE,
    predicted_return DOUBLE,
    predicted_close DOUBLE,
    close DOUBLE NOT NULL,
    horizon_minutes INTEGER NOT NULL,
    model_version VARCHAR(128) NOT NULL,
    feature_spec_hash VARCHAR(64) NOT NULL,
    reason TEXT,
    served_at_ms BIGINT NOT NULL,
    realised_close DOUBLE,
    realised_return DOUBLE,
    hit BOOLEAN,
    pnl_bps DOUBLE,
    filled_at_ms BIGINT,
    PRIMARY KEY (id),
    CONSTRAINT uq_gold_signals_key UNIQUE (symbol, bar_open_time_ms, model_version),
    CONSTRAINT ck_gold_signals_signal CHECK (signal IN ('BUY', 'SELL', 'NEUTRAL')),
    CONSTRAINT ck_gold_signals_horizon CHECK (horizon_minutes > 0)
);
CREATE INDEX ix_gold_signals_pending ON gold_signals (symbol, filled_at_ms, bar_open_time_ms);
CREATE INDEX ix_gold_signals_symbol_time ON gold_signals (symbol, bar_open_time_ms);
"""


def test_store_of_the_old_schema_is_migrated_at_open(tmp_path: Path) -> None:
    path = tmp_path / "gold.sqlite"
    # Bar T0 served by m1 (BUY, filled: +100 bps) then m2 (SELL, filled: -100 bps); T0+1 by m2.
    old_rows = [
        (T0, "BUY", "m1", 101.0, True, 100.0, NOW),
        (T0, "SELL", "m2", 101.0, False, -100.0, NOW),
        (T0 + MINUTE, "SELL", "m2", None, None, None, None),
    ]
    with sqlite3.connect(path) as raw:
        raw.executescript(OLD_SCHEMA)
        raw.executemany(
            "INSERT INTO gold_signals (symbol, bar_open_time_ms, signal, confidence, close, "
            "horizon_minutes, model_version, feature_spec_hash, served_at_ms, realised_close, "
            "hit, pnl_bps, filled_at_ms) "
            "VALUES ('BTCUSDT', ?, ?, 0.6, 100.0, 10, ?, 'abc', 0, ?, ?, ?, ?)",
            old_rows,
        )
    raw.close()

    store = GoldStore(f"sqlite:///{path}")
    (btc,) = store.outcome_summary()
    assert (btc.signals, btc.filled, btc.directional, btc.hits) == (2, 1, 1, 1)
    assert btc.pnl_bps == pytest.approx(100.0)  # m1's record: the first stored for T0
    assert store.counts_by_signal() == {("BTCUSDT", "BUY"): 1, ("BTCUSDT", "SELL"): 1}
    assert len(store.history(None, 10)) == 3  # the history is untouched
    assert store.record(rec(T0, model_version="m3")) is False  # T0 already has its record
    assert store.record(rec(T0, model_version="m1")) is False  # the old key still holds
    assert store.record(rec(T0 + 2 * MINUTE)) is True
    store.close()

    again = GoldStore(f"sqlite:///{path}")  # a migrated table is opened as it is
    assert again.counts_by_signal() == {("BTCUSDT", "BUY"): 2, ("BTCUSDT", "SELL"): 1}
    again.close()
    with sqlite3.connect(path) as raw:
        unique = {row[1] for row in raw.execute("PRAGMA index_list(gold_signals)") if row[2]}
    raw.close()
    assert "uq_gold_signals_accounted_bar" in unique


def test_fill_outcomes_exact_values(store: GoldStore) -> None:
    store.record(rec(T0, "BUY", close=100.0))
    store.record(rec(T0 + MINUTE, "SELL", close=100.0))
    store.record(rec(T0 + 2 * MINUTE, "NEUTRAL", close=100.0))
    store.record(rec(T0 + 3 * MINUTE, "SELL", close=200.0))
    closes = {
        T0 + H * MINUTE: 101.0,
        T0 + (H + 1) * MINUTE: 101.0,
        T0 + (H + 2) * MINUTE: 99.0,
        T0 + (H + 3) * MINUTE: 198.0,
    }
    assert store.fill_outcomes("BTCUSDT", closes, NOW) == 4
    rows = by_time(store)

    buy = rows[T0]
    assert buy["realised_close"] == 101.0
    assert buy["realised_return"] == pytest.approx(math.log(1.01), rel=1e-12)
    assert buy["hit"] is True
    assert buy["pnl_bps"] == pytest.approx(100.0, rel=1e-9)  # +1 x (101/100 - 1) x 1e4
    assert buy["filled_at_ms"] == NOW

    sell_loss = rows[T0 + MINUTE]
    assert sell_loss["hit"] is False
    assert sell_loss["pnl_bps"] == pytest.approx(-100.0, rel=1e-9)

    neutral = rows[T0 + 2 * MINUTE]
    assert neutral["realised_return"] == pytest.approx(math.log(0.99), rel=1e-12)
    assert neutral["hit"] is None  # no position: neither hit nor miss
    assert neutral["pnl_bps"] == 0.0

    sell_win = rows[T0 + 3 * MINUTE]
    assert sell_win["realised_return"] == pytest.approx(math.log(0.99), rel=1e-12)
    assert sell_win["hit"] is True
    assert sell_win["pnl_bps"] == pytest.approx(100.0, rel=1e-9)  # -1 x (198/200 - 1) x 1e4

    # Filled rows are final: the same closes again, or other values, change nothing.
    assert store.fill_outcomes("BTCUSDT", closes, NOW + 1) == 0
    assert store.fill_outcomes("BTCUSDT", {T0 + H * MINUTE: 50.0}, NOW + 2) == 0
    assert by_time(store)[T0] == buy


def test_flat_return_is_a_miss_both_ways(store: GoldStore) -> None:
    store.record(rec(T0, "BUY"))
    store.record(rec(T0, "SELL", model_version="m2"))
    assert store.fill_outcomes("BTCUSDT", {T0 + H * MINUTE: 100.0}, NOW) == 2
    rows = store.history("BTCUSDT", 10)
    assert [(r["hit"], r["realised_return"], r["pnl_bps"]) for r in rows] == [
        (False, 0.0, 0.0),
        (False, 0.0, 0.0),
    ]


def test_partial_fill(store: GoldStore) -> None:
    for i in range(5):
        store.record(rec(T0 + i * MINUTE, "BUY", close=100.0 + i))
    store.record(rec(T0, "SELL", symbol="ETHUSDT", close=10.0))

    # Only the horizon bars of t0 and t0+2 have arrived (plus bars no signal is waiting for).
    closes = {T0 + H * MINUTE: 110.0, T0 + (H + 2) * MINUTE: 112.0, T0 + 5 * MINUTE: 1.0}
    assert store.fill_outcomes("BTCUSDT", closes, NOW) == 2
    rows = by_time(store)
    assert [t for t, r in sorted(rows.items()) if r["filled_at_ms"] is not None] == [
        T0,
        T0 + 2 * MINUTE,
    ]
    pending = rows[T0 + MINUTE]
    assert pending["realised_close"] is None
    assert pending["realised_return"] is None
    assert pending["hit"] is None
    assert pending["pnl_bps"] is None
    # Another symbol's pending signal at the same bar is not touched.
    assert store.history("ETHUSDT", 10)[0]["filled_at_ms"] is None

    later = {T0 + (H + i) * MINUTE: 120.0 for i in (1, 3, 4)}
    assert store.fill_outcomes("BTCUSDT", later, NOW + MINUTE) == 3
    rows = by_time(store)
    assert all(r["filled_at_ms"] is not None for r in rows.values())
    assert rows[T0 + MINUTE]["realised_return"] == pytest.approx(math.log(120.0 / 101.0))
    assert rows[T0]["filled_at_ms"] == NOW  # the first fill stands
    assert store.fill_outcomes("BTCUSDT", {}, NOW) == 0


def test_fill_rejects_bad_closes(store: GoldStore) -> None:
    store.record(rec(T0))
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="positive"):
            store.fill_outcomes("BTCUSDT", {T0 + H * MINUTE: bad}, NOW)
    assert store.history("BTCUSDT", 1)[0]["filled_at_ms"] is None


def test_history_order_limit_and_symbol(store: GoldStore) -> None:
    for i in range(6):
        store.record(rec(T0 + i * MINUTE, "BUY", symbol="BTCUSDT"))
        store.record(rec(T0 + i * MINUTE, "SELL", symbol="ETHUSDT"))
    newest = store.history("BTCUSDT", 3)
    assert [r["bar_open_time_ms"] for r in newest] == [
        T0 + 5 * MINUTE,
        T0 + 4 * MINUTE,
        T0 + 3 * MINUTE,
    ]
    assert {r["symbol"] for r in newest} == {"BTCUSDT"}
    both = store.history(None, 4)
    assert [r["bar_open_time_ms"] for r in both] == [T0 + 5 * MINUTE] * 2 + [T0 + 4 * MINUTE] * 2
    assert {r["symbol"] for r in both} == {"BTCUSDT", "ETHUSDT"}
    assert store.history("XRPUSDT", 10) == []
    assert len(store.history(None, 1000)) == 12
    with pytest.raises(ValueError, match="limit"):
        store.history(None, 0)

    item = newest[0]
    assert item["as_of"] == "2024-01-30T00:05:00.000+00:00"
    assert item["outcome_open_time_ms"] == T0 + (5 + H) * MINUTE
    assert item["feature_spec_hash"] == "abcdef0123456789"
    assert item["model_version"] == "m1"
    assert item["horizon_minutes"] == H
    assert item["served_at_ms"] == T0 + 6 * MINUTE + 150
    json.dumps(store.history(None, 1000), allow_nan=False)  # JSON-ready, also before filling


def test_outcome_summary_and_counts(store: GoldStore) -> None:
    signals = ["BUY", "SELL", "NEUTRAL", "BUY", "SELL"]
    for i, signal in enumerate(signals):
        store.record(rec(T0 + i * MINUTE, signal, close=100.0))
    store.record(rec(T0, "NEUTRAL", symbol="ETHUSDT"))
    store.record(rec(T0 + MINUTE, "BUY", symbol="SOLUSDT"))  # never filled
    # Up to 102 for the first four horizon bars; the last SELL stays pending.
    closes = {T0 + (H + i) * MINUTE: 102.0 for i in range(4)}
    assert store.fill_outcomes("BTCUSDT", closes, NOW) == 4
    assert store.fill_outcomes("ETHUSDT", {T0 + H * MINUTE: 90.0}, NOW) == 1

    summary = store.outcome_summary()
    assert [s.symbol for s in summary] == ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
    btc, eth, sol = summary
    assert btc.signals == 5
    assert btc.filled == 4
    assert btc.directional == 3  # BUY, SELL, BUY filled; the NEUTRAL does not count
    assert btc.hits == 2
    assert btc.hit_rate == pytest.approx(2 / 3)
    assert btc.pnl_bps == pytest.approx(200.0 - 200.0 + 200.0, rel=1e-9)
    assert eth == OutcomeSummary(
        symbol="ETHUSDT", signals=1, filled=1, directional=0, hits=0, hit_rate=None, pnl_bps=0.0
    )
    assert sol.hit_rate is None
    assert sol.pnl_bps == 0.0
    assert store.counts_by_signal() == {
        ("BTCUSDT", "BUY"): 2,
        ("BTCUSDT", "SELL"): 2,
        ("BTCUSDT", "NEUTRAL"): 1,
        ("ETHUSDT", "NEUTRAL"): 1,
        ("SOLUSDT", "BUY"): 1,
    }


def test_signal_without_model_outputs(store: GoldStore) -> None:
    # A NEUTRAL on stale features has no p_up / prediction: None or NaN, stored as NULL.
    store.record(replace(rec(T0, "NEUTRAL"), p_up=None, predicted_return=None))
    store.record(replace(rec(T0 + MINUTE, "NEUTRAL"), p_up=math.nan, predicted_close=math.nan))
    assert store.fill_outcomes("BTCUSDT", {T0 + H * MINUTE: 99.0}, NOW) == 1
    rows = by_time(store)
    assert rows[T0]["p_up"] is None
    assert rows[T0]["predicted_return"] is None
    assert rows[T0]["pnl_bps"] == 0.0
    assert rows[T0 + MINUTE]["p_up"] is None
    assert rows[T0 + MINUTE]["predicted_close"] is None
    assert rows[T0 + MINUTE]["predicted_return"] == 0.001
    json.dumps(store.history(None, 10), allow_nan=False)


def test_empty_store(store: GoldStore) -> None:
    assert store.outcome_summary() == ()
    assert store.counts_by_signal() == {}
    assert store.history(None, 10) == []


def test_reopen_keeps_data_and_uses_wal(url: str, tmp_path: Path) -> None:
    first = GoldStore(url)
    first.record(rec(T0))
    first.fill_outcomes("BTCUSDT", {T0 + H * MINUTE: 101.0}, NOW)
    before = first.history(None, 10)
    first.close()

    path = tmp_path / "nested" / "dir" / "gold.sqlite"
    assert path.is_file()  # parent directories were created
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)

    again = GoldStore(url)  # create_all on an existing table is a no-op
    assert again.history(None, 10) == before
    assert again.record(rec(T0)) is False
    assert again.record(rec(T0 + MINUTE)) is True
    again.close()


def test_concurrent_writers_keep_one_row_per_key(url: str) -> None:
    stores = [GoldStore(url), GoldStore(url)]  # two "replicas" on one file
    keys = [T0 + i * MINUTE for i in range(20)]
    start = threading.Barrier(6)

    def write(worker: int) -> list[bool]:
        start.wait()
        return [stores[worker % 2].record(rec(t)) for t in keys]

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(write, range(6)))
    assert [sum(column) for column in zip(*results, strict=True)] == [1] * len(keys)
    assert len(stores[0].history(None, 1000)) == len(keys)
    for store in stores:
        store.close()


def test_memory_url_is_one_database() -> None:
    store = GoldStore("sqlite://")
    store.record(rec(T0))
    with ThreadPoolExecutor(2) as pool:
        assert pool.submit(store.history, None, 10).result()[0]["bar_open_time_ms"] == T0
    store.close()


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("mysql://gold:hunter2@db.internal/gold", "'mysql'"),
        ("postgresql+nosuchdriver://gold:hunter2@db.internal/gold", "'postgresql+nosuchdriver'"),
        ("not a url at all hunter2", "not a SQLAlchemy URL"),
    ],
)
def test_bad_url_error_names_scheme_and_hides_password(url: str, named: str) -> None:
    with pytest.raises(ValueError) as caught:
        GoldStore(url)
    message = str(caught.value)
    assert named in message
    assert "hunter2" not in message
    assert caught.value.__cause__ is None or "hunter2" not in str(caught.value.__cause__)


def test_unreachable_postgres_error_hides_password() -> None:
    # Port 1 on loopback refuses at once: the connection error comes from create_all.
    with pytest.raises(OperationalError) as caught:
        GoldStore("postgresql://gold:hunter2@127.0.0.1:1/gold?connect_timeout=2")
    assert "hunter2" not in str(caught.value)
    assert "127.0.0.1" in str(caught.value)


@pytest.mark.parametrize(
    "change",
    [
        {"signal": "HOLD"},
        {"confidence": math.nan},
        {"close": math.nan},
        {"predicted_return": math.inf},
        {"p_up": -math.inf},
        {"close": 0.0},
        {"horizon_minutes": 0},
        {"symbol": ""},
    ],
)
def test_invalid_record_is_rejected(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        replace(rec(T0), **change)


def table_rows(url: str) -> list[tuple[object, ...]]:
    """Every stored row, every column but the id, in storage order."""
    with sqlite3.connect(url.removeprefix("sqlite:///")) as raw:
        rows = raw.execute("SELECT * FROM gold_signals ORDER BY id").fetchall()
    return [row[1:] for row in rows]


def test_record_many_equals_recording_one_by_one(tmp_path: Path) -> None:
    batches = [
        # A bar served by two models and a key repeated inside one batch.
        [rec(T0), rec(T0, "SELL", model_version="m2"), rec(T0, symbol="ETHUSDT"), rec(T0)],
        [],
        # Across batches: the key again (other values: the first write wins), a third model.
        [replace(rec(T0), confidence=0.9), rec(T0, model_version="m3"), rec(T0 + MINUTE)],
        [replace(rec(T0 + 2 * MINUTE, "NEUTRAL"), p_up=math.nan, predicted_return=None)],
    ]
    one_url, many_url = (f"sqlite:///{tmp_path / name}" for name in ("one.sqlite", "many.sqlite"))
    one, many = GoldStore(one_url), GoldStore(many_url)
    one_by_one = [[one.record(record) for record in batch] for batch in batches]
    batched = [many.record_many(batch) for batch in batches]
    assert batched == one_by_one
    assert batched == [[True, False, True, False], [], [False, False, True], [True]]
    assert table_rows(many_url) == table_rows(one_url)
    assert len(table_rows(many_url)) == 6
    assert many.counts_by_signal() == one.counts_by_signal()
    one.close()
    many.close()


def test_concurrent_batches_keep_one_row_per_key_and_one_accounted_per_bar(url: str) -> None:
    stores = [GoldStore(url), GoldStore(url)]  # two "replicas" on one file
    bars = [T0 + i * MINUTE for i in range(20)]
    start = threading.Barrier(6)

    def write(worker: int) -> list[tuple[SignalRecord, bool]]:
        # Overlapping batches in different orders; workers of one parity serve the same model.
        order = bars if worker % 3 else bars[::-1]
        batches = [order[:12], order[8:]]
        start.wait()
        written = []
        for batch in batches:
            records = [rec(t, model_version=f"m{worker % 2}") for t in batch]
            written += zip(records, stores[worker % 2].record_many(records), strict=True)
        return written

    with ThreadPoolExecutor(6) as pool:
        results = [item for worker in pool.map(write, range(6)) for item in worker]
    accounted = {(r.bar_open_time_ms, r.model_version) for r, is_first in results if is_first}
    assert sorted(t for t, _ in accounted) == bars  # each bar counted by exactly one write
    rows = stores[0].history(None, 1000)
    assert len(rows) == 2 * len(bars)  # one row per (bar, model)
    with sqlite3.connect(url.removeprefix("sqlite:///")) as raw:
        stored = raw.execute(
            "SELECT bar_open_time_ms, model_version FROM gold_signals WHERE accounted"
        ).fetchall()
    assert set(stored) == accounted  # the writes told "accounted" are the rows accounted
    for store in stores:
        store.close()


def test_fill_outcomes_many_equals_filling_symbol_by_symbol(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lookups of two symbols each, so that the batch spans several.
    monkeypatch.setattr("serve.engine.gold._SYMBOLS_PER_LOOKUP", 2)
    symbols = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT"]
    records = [
        rec(T0 + i * MINUTE, ("BUY", "SELL", "NEUTRAL")[(i + k) % 3], 100.0 + k, symbol)
        for k, symbol in enumerate(symbols)
        for i in range(5)
    ]
    closes = {
        # Each symbol its own closes; SOLUSDT only some of its horizon bars, XRPUSDT none.
        "BTCUSDT": {T0 + (H + i) * MINUTE: 101.0 + i for i in range(5)},
        "ETHUSDT": {T0 + (H + i) * MINUTE: 99.0 - i for i in range(3)},
        "SOLUSDT": {T0 + (H + 1) * MINUTE: 103.0, T0 + (H + 4) * MINUTE: 104.0},
        "XRPUSDT": {},
        "ADAUSDT": {T0 + H * MINUTE: 1.0},  # no signals
    }
    one_url, many_url = (f"sqlite:///{tmp_path / name}" for name in ("one.sqlite", "many.sqlite"))
    one, many = GoldStore(one_url), GoldStore(many_url)
    one.record_many(records)
    many.record_many(records)
    assert sum(one.fill_outcomes(s, c, NOW) for s, c in closes.items()) == 10
    assert many.fill_outcomes_many(closes, NOW) == 10
    assert table_rows(many_url) == table_rows(one_url)
    assert many.fill_outcomes_many(closes, NOW + 1) == 0  # filled rows are never refilled
    assert table_rows(many_url) == table_rows(one_url)
    one.close()
    many.close()


def test_fill_outcomes_many_with_a_bad_close_fills_nothing(store: GoldStore) -> None:
    store.record_many([rec(T0), rec(T0, symbol="ETHUSDT")])
    bad = {"BTCUSDT": {T0 + H * MINUTE: 101.0}, "ETHUSDT": {T0 + H * MINUTE: math.nan}}
    with pytest.raises(ValueError, match="positive number"):
        store.fill_outcomes_many(bad, NOW)
    assert all(row["filled_at_ms"] is None for row in store.history(None, 10))
    assert store.fill_outcomes_many({}, NOW) == 0
