"""GoldStore against a real PostgreSQL server (started by conftest.py's `postgres_url`)."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from sqlalchemy import create_engine, func, inspect, select
from sqlalchemy.engine import make_url

from serve.engine.gold import GOLD_SIGNALS, GoldStore
from tests.unit.test_gold_store import MINUTE, NOW, SIGNAL_OF, T0, H, rec

pytestmark = pytest.mark.integration


def drop_table(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        GOLD_SIGNALS.drop(conn, checkfirst=True)
    engine.dispose()


@pytest.fixture
def store(postgres_url: str) -> Iterator[GoldStore]:
    """A store on a fresh table (the server and database are shared by the session)."""
    drop_table(postgres_url)
    gold = GoldStore(postgres_url)
    yield gold
    gold.close()


def row_counts(url: str) -> dict[tuple[str, int, str], int]:
    t = GOLD_SIGNALS.c
    key = (t.symbol, t.bar_open_time_ms, t.model_version)
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(select(*key, func.count()).group_by(*key)).all()
    engine.dispose()
    return {(s, b, m): n for s, b, m, n in rows}


def test_schema_on_postgres(store: GoldStore, postgres_url: str) -> None:
    assert store.backend == "postgresql"
    password = make_url(postgres_url).password
    assert password and password not in store.url and "***" in store.url
    engine = create_engine(postgres_url)
    inspector = inspect(engine)
    columns = {c["name"]: c for c in inspector.get_columns("gold_signals")}
    assert str(columns["bar_open_time_ms"]["type"]) == "BIGINT"
    assert str(columns["close"]["type"]) == "DOUBLE PRECISION"
    assert str(columns["hit"]["type"]) == "BOOLEAN"
    assert columns["realised_close"]["nullable"] is True
    assert columns["close"]["nullable"] is False
    unique = inspector.get_unique_constraints("gold_signals")
    assert [u["column_names"] for u in unique] == [["symbol", "bar_open_time_ms", "model_version"]]
    indexes = {i["name"]: i["column_names"] for i in inspector.get_indexes("gold_signals")}
    assert indexes["ix_gold_signals_symbol_time"] == ["symbol", "bar_open_time_ms"]
    assert indexes["uq_gold_signals_accounted_bar"] == ["symbol", "bar_open_time_ms"]
    engine.dispose()


def test_record_and_duplicate(store: GoldStore) -> None:
    assert store.record(rec(T0)) is True
    assert store.record(rec(T0)) is False
    assert store.record(rec(T0, model_version="m2")) is False  # stored, not counted again
    assert store.record(rec(T0, symbol="ETHUSDT")) is True
    assert len(store.history(None, 100)) == 3
    assert store.counts_by_signal() == {("BTCUSDT", "BUY"): 1, ("ETHUSDT", "BUY"): 1}


def test_a_bar_served_by_several_models_counts_once(store: GoldStore, postgres_url: str) -> None:
    # A promotion (m1 -> m2) then a rollback (m2 -> m1) recompute bar T0: m1's BUY counts.
    served = ("m1", "m2", "m1")
    recorded = [store.record(rec(T0, SIGNAL_OF[m], model_version=m)) for m in served]
    assert recorded == [True, False, False]
    # Replicas mid-rollout race on the next bars, each with its own model: one counts per bar.
    other = GoldStore(postgres_url)
    keys = [T0 + i * MINUTE for i in range(1, 13)]
    start = threading.Barrier(4)

    def write(worker: int) -> list[bool]:
        start.wait()
        gold = (store, other)[worker % 2]
        return [gold.record(rec(t, model_version=f"r{worker}")) for t in keys]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(write, range(4)))
    assert [sum(column) for column in zip(*results, strict=True)] == [1] * len(keys)
    assert len(store.history(None, 100)) == 2 + 4 * len(keys)

    assert store.fill_outcomes("BTCUSDT", {T0 + H * MINUTE: 101.0}, NOW) == 2
    (btc,) = store.outcome_summary()
    assert (btc.signals, btc.filled, btc.directional, btc.hits) == (1 + len(keys), 1, 1, 1)
    assert btc.pnl_bps == pytest.approx(100.0, rel=1e-9)
    assert store.counts_by_signal() == {("BTCUSDT", "BUY"): 1 + len(keys)}
    other.close()


def test_table_of_the_old_schema_is_migrated(store: GoldStore, postgres_url: str) -> None:
    store.record(rec(T0, "BUY", model_version="m1"))
    store.record(rec(T0, "SELL", model_version="m2"))
    store.close()
    engine = create_engine(postgres_url)
    with engine.begin() as conn:  # back to the table an earlier release created
        conn.exec_driver_sql("ALTER TABLE gold_signals DROP COLUMN accounted")
    engine.dispose()
    again = GoldStore(postgres_url)
    assert again.counts_by_signal() == {("BTCUSDT", "BUY"): 1}  # the first stored record
    assert again.record(rec(T0, model_version="m3")) is False
    assert len(again.history(None, 10)) == 3
    again.close()


def test_concurrent_writers_same_keys(store: GoldStore, postgres_url: str) -> None:
    replicas = [store, GoldStore(postgres_url)]  # two engines: two "Serve replicas"
    keys = [T0 + i * MINUTE for i in range(25)]
    workers = 8
    start = threading.Barrier(workers)

    def write(worker: int) -> list[bool]:
        start.wait()  # maximise contention: every worker races for every key
        gold = replicas[worker % 2]
        return [gold.record(rec(t, model_version=f"m{i % 2}")) for i, t in enumerate(keys)]

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(write, range(workers)))
    assert [sum(column) for column in zip(*results, strict=True)] == [1] * len(keys)
    counts = row_counts(postgres_url)
    assert len(counts) == len(keys)
    assert set(counts.values()) == {1}
    replicas[1].close()


def test_concurrent_batches_in_opposite_orders(store: GoldStore, postgres_url: str) -> None:
    # Replicas writing and filling overlapping batches, half of them in reverse order: no
    # deadlock, one row per key, one accounted record per bar.
    replicas = [store, GoldStore(postgres_url)]
    symbols = [f"S{i:02d}USDT" for i in range(10)]
    bars = [T0 + i * MINUTE for i in range(4)]
    workers = 6
    start = threading.Barrier(workers)

    def write(worker: int) -> tuple[int, list[bool]]:
        records = [rec(t, symbol=s, model_version=f"m{worker % 2}") for s in symbols for t in bars]
        closes = {s: {t + H * MINUTE: 101.0 for t in bars} for s in symbols}
        if worker % 3:
            records.reverse()
            closes = dict(reversed(closes.items()))
        gold = replicas[worker % 2]
        start.wait()
        accounted = gold.record_many(records)
        return gold.fill_outcomes_many(closes, NOW), accounted

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(write, range(workers)))
    assert sum(sum(accounted) for _, accounted in results) == len(symbols) * len(bars)
    assert sum(filled for filled, _ in results) == 2 * len(symbols) * len(bars)
    counts = row_counts(postgres_url)
    assert len(counts) == 2 * len(symbols) * len(bars)
    assert set(counts.values()) == {1}
    assert sum(store.counts_by_signal().values()) == len(symbols) * len(bars)
    replicas[1].close()


def test_concurrent_schema_creation(postgres_url: str) -> None:
    drop_table(postgres_url)
    start = threading.Barrier(6)

    def open_store(_: int) -> GoldStore:
        start.wait()
        return GoldStore(postgres_url)

    with ThreadPoolExecutor(6) as pool:
        stores = list(pool.map(open_store, range(6)))
    assert stores[0].record(rec(T0)) is True
    assert stores[5].record(rec(T0)) is False
    for gold in stores:
        gold.close()


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
    rows = {r["bar_open_time_ms"]: r for r in store.history("BTCUSDT", 10)}
    expected = {
        T0: (math.log(1.01), True, 100.0),
        T0 + MINUTE: (math.log(1.01), False, -100.0),
        T0 + 2 * MINUTE: (math.log(0.99), None, 0.0),
        T0 + 3 * MINUTE: (math.log(0.99), True, 100.0),
    }
    for t, (realised_return, hit, pnl_bps) in expected.items():
        assert rows[t]["realised_return"] == pytest.approx(realised_return, rel=1e-12)
        assert rows[t]["hit"] is hit
        assert rows[t]["pnl_bps"] == pytest.approx(pnl_bps, rel=1e-9, abs=1e-12)
        assert rows[t]["filled_at_ms"] == NOW
    assert store.fill_outcomes("BTCUSDT", closes, NOW + 1) == 0


def test_partial_and_concurrent_fill(store: GoldStore, postgres_url: str) -> None:
    for i in range(30):
        store.record(rec(T0 + i * MINUTE, "BUY" if i % 3 else "SELL", close=100.0 + i))
    # Only every other horizon bar has arrived.
    first = {T0 + (H + i) * MINUTE: 110.0 for i in range(0, 30, 2)}
    assert store.fill_outcomes("BTCUSDT", first, NOW) == 15
    rows = {r["bar_open_time_ms"]: r for r in store.history("BTCUSDT", 100)}
    assert sorted(t for t, r in rows.items() if r["filled_at_ms"] is None) == [
        T0 + i * MINUTE for i in range(1, 30, 2)
    ]

    # Two replicas fill the remaining 15 at once: each row is filled exactly once.
    other = GoldStore(postgres_url)
    everything = {T0 + (H + i) * MINUTE: 120.0 for i in range(30)}
    start = threading.Barrier(4)

    def fill(worker: int) -> int:
        start.wait()
        return (store, other)[worker % 2].fill_outcomes("BTCUSDT", everything, NOW + worker)

    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(fill, range(4))) == 15
    rows = {r["bar_open_time_ms"]: r for r in store.history("BTCUSDT", 100)}
    assert all(r["filled_at_ms"] is not None for r in rows.values())
    assert rows[T0]["realised_close"] == 110.0  # the first fill stands
    assert rows[T0 + MINUTE]["realised_close"] == 120.0
    other.close()


def test_history_and_summary(store: GoldStore) -> None:
    signals = ["BUY", "SELL", "NEUTRAL", "BUY", "SELL"]
    for i, signal in enumerate(signals):
        store.record(rec(T0 + i * MINUTE, signal, close=100.0))
        store.record(rec(T0 + i * MINUTE, "NEUTRAL", symbol="ETHUSDT"))
    closes = {T0 + (H + i) * MINUTE: 102.0 for i in range(4)}
    assert store.fill_outcomes("BTCUSDT", closes, NOW) == 4

    newest = store.history("BTCUSDT", 2)
    assert [r["bar_open_time_ms"] for r in newest] == [T0 + 4 * MINUTE, T0 + 3 * MINUTE]
    assert newest[0]["as_of"] == "2024-01-30T00:04:00.000+00:00"
    assert newest[0]["realised_close"] is None
    assert newest[1]["hit"] is True
    both = store.history(None, 4)
    assert [r["bar_open_time_ms"] for r in both] == [T0 + 4 * MINUTE] * 2 + [T0 + 3 * MINUTE] * 2
    json.dumps(store.history(None, 100), allow_nan=False)

    summary = {s.symbol: s for s in store.outcome_summary()}
    btc = summary["BTCUSDT"]
    assert (btc.signals, btc.filled, btc.directional, btc.hits) == (5, 4, 3, 2)
    assert btc.hit_rate == pytest.approx(2 / 3)
    assert btc.pnl_bps == pytest.approx(200.0, rel=1e-9)
    assert summary["ETHUSDT"].hit_rate is None
    assert summary["ETHUSDT"].filled == 0
    assert summary["ETHUSDT"].pnl_bps == 0.0
    assert store.counts_by_signal() == {
        ("BTCUSDT", "BUY"): 2,
        ("BTCUSDT", "SELL"): 2,
        ("BTCUSDT", "NEUTRAL"): 1,
        ("ETHUSDT", "NEUTRAL"): 5,
    }


def test_signal_without_model_outputs(store: GoldStore) -> None:
    store.record(replace(rec(T0, "NEUTRAL"), p_up=math.nan, predicted_return=None))
    row = store.history("BTCUSDT", 1)[0]
    assert (row["p_up"], row["predicted_return"]) == (None, None)
    assert row["predicted_close"] == pytest.approx(100.0 * math.exp(0.001))


def test_reopen_keeps_data(store: GoldStore, postgres_url: str) -> None:
    store.record(rec(T0))
    store.close()
    again = GoldStore(postgres_url)
    assert [r["bar_open_time_ms"] for r in again.history(None, 10)] == [T0]
    assert again.record(rec(T0)) is False
    again.close()
