"""Engine shards without Ray: the symbol partition, the shard sizing in the config, the merge of
the shards' snapshots the ingress serves from, the per-shard Gold reads, and the snapshot
protocol between a shard and the ingress (rebuilt and sent only when it changed)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import ValidationError

from configs.schema import EngineShardsConfig, FeedConfig, ServeConfig
from serve.app import HandleBackend
from serve.engine.engine import SignalEngine
from serve.engine.gold import GoldStore
from serve.engine.shards import ShardPlan, partition
from serve.engine.snapshot import (
    ConfidenceHistogram,
    EngineSnapshot,
    OutcomeSummary,
    SignalCount,
    SignalPendingError,
    SnapshotUnchanged,
    SymbolState,
    merge_snapshots,
    unavailable_symbols,
)
from tests.serve_support import register_model
from tests.unit.test_gold_store import MINUTE, T0, rec
from tests.unit.test_serve_engine import FakeClock, config_for
from tests.unit.test_serve_snapshot import MODEL, SIGNAL, TAKEN_AT

SYMBOLS = [f"SIM{i:04d}" for i in range(1000)]


def test_partition_puts_every_symbol_in_exactly_one_balanced_shard() -> None:
    shards = partition(SYMBOLS, 7)
    assert len(shards) == 7
    owned = [symbol for shard in shards for symbol in shard]
    assert sorted(owned) == sorted(SYMBOLS)
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1
    # Within a shard the feed's order is kept.
    for shard in shards:
        assert list(shard) == [s for s in SYMBOLS if s in set(shard)]


def test_partition_ignores_the_listing_order_and_duplicates() -> None:
    shuffled = list(reversed(SYMBOLS)) + SYMBOLS[:10]
    by_owner = {s: i for i, shard in enumerate(partition(SYMBOLS, 4)) for s in shard}
    again = {s: i for i, shard in enumerate(partition(shuffled, 4)) for s in shard}
    assert by_owner == again


def test_partition_is_the_same_in_another_process() -> None:
    """Python's str hash is salted per process; the partition must not be."""
    code = (
        "from serve.engine.shards import partition;"
        "print(partition([f'SIM{i:04d}' for i in range(50)], 3))"
    )
    root = Path(__file__).resolve().parents[2]
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            capture_output=True,
            text=True,
            cwd=root,
            env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(root)},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
    assert outputs.pop().strip() == repr(partition([f"SIM{i:04d}" for i in range(50)], 3))


def test_no_shard_is_empty_when_there_are_as_many_symbols_as_shards() -> None:
    assert all(len(shard) == 1 for shard in partition(SYMBOLS[:5], 5))
    with pytest.raises(ValueError, match="at least 6 symbols"):
        partition(SYMBOLS[:5], 6)
    with pytest.raises(ValueError, match="shards must be >= 1"):
        partition(SYMBOLS, 0)


def test_shard_count_comes_from_a_count_or_from_symbols_per_shard() -> None:
    assert EngineShardsConfig().count(2000) == 1
    assert EngineShardsConfig(shards=4).count(2000) == 4
    assert EngineShardsConfig(symbols_per_shard=500).count(2000) == 4
    assert EngineShardsConfig(symbols_per_shard=600).count(2000) == 4  # rounded up
    assert EngineShardsConfig(symbols_per_shard=600).count(3) == 1
    with pytest.raises(ValidationError, match="not both"):
        EngineShardsConfig(shards=2, symbols_per_shard=10)
    with pytest.raises(ValidationError, match="every shard must own at least one"):
        ServeConfig(feed=FeedConfig(symbols=["SIMAAA"]), engine=EngineShardsConfig(shards=2))


def test_each_shard_config_serves_only_its_symbols() -> None:
    config = ServeConfig(
        feed=FeedConfig(symbols=SYMBOLS[:10]), engine=EngineShardsConfig(symbols_per_shard=4)
    )
    assert (
        ShardPlan.of(config.model_copy(update={"engine": EngineShardsConfig(shards=10)})).count
        == 10
    )
    plan = ShardPlan.of(config)
    assert plan.count == 3
    for shard in range(plan.count):
        shard_config = plan.shard_config(config, shard)
        assert tuple(shard_config.feed.symbols) == plan.symbols[shard]
        assert all(plan.owner(symbol) == shard for symbol in shard_config.feed.symbols)
        assert shard_config.engine.count(len(shard_config.feed.symbols)) == 1
        assert shard_config.port == config.port and shard_config.gold == config.gold
        # What the shard's deployment reads back from the JSON it is bound with.
        assert ServeConfig.model_validate(shard_config.model_dump(mode="json")) == shard_config
    assert plan.owner("NOTSERVED") is None


def part(
    symbols: tuple[str, ...], *, taken_at: float, staleness_s: float = 2.0, **changes: object
) -> EngineSnapshot:
    snap = EngineSnapshot(
        sequence=5,
        taken_at=taken_at,
        stale_after_s=30.0,
        symbols=tuple(
            SymbolState(s, staleness_s, replace(SIGNAL, symbol=s), None) for s in symbols
        ),
        model=MODEL,
        load_error=None,
        reloads=1,
        signal_counts=tuple(SignalCount(s, "BUY", 2) for s in symbols),
        confidence=ConfidenceHistogram(buckets=(0.5, 1.0), counts=(1, 3), sum=2.0),
        outcomes=tuple(OutcomeSummary(s, 2, 1, 1, 1, 1.0, 4.0) for s in symbols),
    )
    return replace(snap, **changes)  # type: ignore[arg-type]


def test_merge_restates_each_shards_staleness_to_the_newest_snapshot() -> None:
    fresh = part(("SIMAAA",), taken_at=TAKEN_AT)
    behind = part(("SIMBBB",), taken_at=TAKEN_AT - 40.0)  # that shard stopped reporting
    merged = merge_snapshots([behind, fresh], symbol_order=("SIMAAA", "SIMBBB"))
    assert merged.taken_at == TAKEN_AT
    assert merged.symbol_names == ("SIMAAA", "SIMBBB")
    assert merged.staleness("SIMAAA", TAKEN_AT) == (2.0, False)
    assert merged.staleness("SIMBBB", TAKEN_AT) == (42.0, True)
    # Only the silent shard's symbol turns NEUTRAL; the other keeps its signal.
    assert merged.signal("SIMAAA", TAKEN_AT).signal == "BUY"
    stale = merged.signal("SIMBBB", TAKEN_AT)
    assert stale.signal == "NEUTRAL" and "stale features" in (stale.reason or "")


def test_merge_sums_counts_and_concatenates_per_symbol_figures() -> None:
    a = part(("SIMAAA", "SIMCCC"), taken_at=TAKEN_AT, sequence=3, reloads=2)
    b = part(("SIMBBB",), taken_at=TAKEN_AT, sequence=4, reloads=1)
    merged = merge_snapshots([a, b], symbol_order=("SIMAAA", "SIMBBB", "SIMCCC"))
    assert merged.sequence == 7 and merged.reloads == 2
    assert merged.confidence.counts == (2, 6) and merged.confidence.sum == 4.0
    assert [c.symbol for c in merged.signal_counts] == ["SIMAAA", "SIMBBB", "SIMCCC"]
    assert [o.symbol for o in merged.outcomes] == ["SIMAAA", "SIMBBB", "SIMCCC"]


def test_merge_serves_the_newest_model_and_none_while_a_shard_has_none() -> None:
    old = part(("SIMAAA",), taken_at=TAKEN_AT)
    newer_model = replace(MODEL, version="v0002", loaded_at_ms=MODEL.loaded_at_ms + 1)
    new = part(("SIMBBB",), taken_at=TAKEN_AT, model=newer_model)
    assert merge_snapshots([old, new]).require_model().version == "v0002"
    failed = part(("SIMBBB",), taken_at=TAKEN_AT, model=None, load_error="weights missing")
    merged = merge_snapshots([old, failed])
    assert merged.model is None and merged.load_error == "weights missing"


def test_symbols_of_a_shard_that_never_reported_are_not_ready() -> None:
    merged = merge_snapshots(
        [part(("SIMAAA",), taken_at=TAKEN_AT)],
        symbol_order=("SIMAAA", "SIMBBB"),
        unavailable=unavailable_symbols(("SIMBBB",), "engine shard 1 has not reported yet"),
    )
    assert merged.symbol_names == ("SIMAAA", "SIMBBB")
    assert merged.signal("SIMAAA", TAKEN_AT).signal == "BUY"
    with pytest.raises(SignalPendingError):
        merged.signal("SIMBBB", TAKEN_AT)
    assert merged.state("SIMBBB").feed_error == "engine shard 1 has not reported yet"
    with pytest.raises(ValueError, match="at least one"):
        merge_snapshots([])


def test_gold_reads_can_be_limited_to_a_shards_symbols(tmp_path: Path) -> None:
    store = GoldStore(f"sqlite:///{tmp_path / 'gold.sqlite'}")
    for minute, symbol in enumerate(("SIMAAA", "SIMBBB", "SIMAAA")):
        store.record(rec(T0 + minute * MINUTE, symbol=symbol))
    assert store.counts_by_signal(["SIMAAA"]) == {("SIMAAA", "BUY"): 2}
    assert [o.symbol for o in store.outcome_summary(["SIMBBB"])] == ["SIMBBB"]
    assert {row["symbol"] for row in store.history(None, 10, among=["SIMBBB"])} == {"SIMBBB"}
    assert len(store.history(None, 10)) == 3
    store.close()


def test_the_engine_rebuilds_its_snapshot_only_when_its_state_changed(tmp_path: Path) -> None:
    register_model(tmp_path / "registry", seed=1)
    clock = FakeClock()
    engine = SignalEngine(config_for(tmp_path, symbols=["SIMAAA", "SIMBBB"]), clock=clock)
    engine.refresh_model()
    engine.tick()
    first = engine.snapshot()
    clock.now += 0.4  # no bar due yet (1 bar/s): nothing changes
    engine.tick()
    same = engine.snapshot()
    assert same is first
    # Read at a later instant, the kept snapshot still gives the exact staleness.
    assert same.staleness("SIMAAA", clock.now)[0] == pytest.approx(
        first.state("SIMAAA").staleness_s + 0.4
    )
    clock.now += 1.0  # a new bar for every symbol
    engine.tick()
    after_bar = engine.snapshot()
    assert after_bar.sequence > first.sequence and after_bar.taken_at == clock.now
    assert after_bar.state("SIMAAA").staleness_s < 1.0
    # A feed error alone is a change too.
    engine.feed._states["SIMBBB"].last_error = "connection reset"
    with_error = engine.snapshot()
    assert with_error.sequence > after_bar.sequence
    assert with_error.state("SIMBBB").feed_error == "connection reset"
    # A restarted engine never repeats a sequence its predecessor handed out.
    restarted = SignalEngine(config_for(tmp_path, symbols=["SIMAAA", "SIMBBB"]), clock=clock)
    assert restarted.snapshot().sequence > with_error.sequence
    engine.close()
    restarted.close()


class ScriptedHandle:
    """A shard's DeploymentHandle whose `snapshot` answers from a script, noting what the
    backend said it held."""

    def __init__(self, answers: list[EngineSnapshot | SnapshotUnchanged]) -> None:
        self.answers = answers
        self.held: list[int | None] = []
        self.snapshot = self

    async def remote(self, held_sequence: int | None) -> EngineSnapshot | SnapshotUnchanged:
        self.held.append(held_sequence)
        return self.answers.pop(0)


def test_the_ingress_keeps_a_current_snapshot_and_restates_its_age() -> None:
    config = ServeConfig(feed=FeedConfig(symbols=["SIMAAA"]))
    built = part(("SIMAAA",), taken_at=TAKEN_AT, sequence=41)
    handle = ScriptedHandle([built, SnapshotUnchanged(TAKEN_AT + 5.0)])
    backend = HandleBackend([handle], handle, 1.0, ShardPlan.of(config))  # type: ignore[list-item,arg-type]
    loop = asyncio.new_event_loop()
    loop.run_until_complete(backend._fetch(0))
    loop.run_until_complete(backend._fetch(0))
    loop.close()
    assert handle.held == [None, 41]
    current = backend.snapshot()
    assert current is not None and current.sequence == 41 and current.taken_at == TAKEN_AT + 5.0
    assert current.state("SIMAAA").staleness_s == 7.0  # 2 s at build + 5 s since


class HistoryHandle:
    """A shard's DeploymentHandle whose `history` answers `rows`, or raises when down."""

    def __init__(self, rows: list[dict[str, object]] | None) -> None:
        self.rows = rows
        self.asked: list[str | None] = []
        self.history = self

    async def remote(self, symbol: str | None, limit: int) -> list[dict[str, object]]:
        self.asked.append(symbol)
        if self.rows is None:
            raise ConnectionError("replica down")
        return self.rows[:limit]


def test_history_of_every_symbol_leaves_out_a_failing_shard() -> None:
    config = ServeConfig(
        feed=FeedConfig(symbols=["SIMAAA", "SIMBBB"]), engine=EngineShardsConfig(shards=2)
    )
    plan = ShardPlan.of(config)
    row = {"symbol": plan.symbols[0][0], "bar_open_time_ms": 1, "served_at_ms": 2}
    up, down = HistoryHandle([row]), HistoryHandle(None)
    backend = HandleBackend([up, down], up, 1.0, plan)  # type: ignore[list-item,arg-type]
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(backend.history(None, 10)) == [row]
        with pytest.raises(ConnectionError):
            loop.run_until_complete(backend.history(plan.symbols[1][0], 10))
        backend.engines = (down, down)
        with pytest.raises(ConnectionError):  # every shard down: an error, not an empty list
            loop.run_until_complete(backend.history(None, 10))
    finally:
        loop.close()
    assert up.asked == [None]
