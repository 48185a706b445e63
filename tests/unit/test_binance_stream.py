"""The Binance WebSocket kline client: message parsing and the per-symbol sequencing (pure), then
the client against a real local stream server and REST server on loopback (tests/fake_binance_ws
.py) replaying simulator bars on a 1,500x clock: exact delivery, batched subscription across
connections under the message limit, and reconnect backoff with REST catch-up meanwhile; and the
feed's choice of live source."""

from __future__ import annotations

import itertools
import json
import random
from datetime import date

import pytest

from configs.schema import BinanceStreamConfig, FeedConfig, SimConfig
from market.klines import ONE_MINUTE_MS
from market.sources.binance_ws import (
    ControlReply,
    KlineEvent,
    KlineSequence,
    MalformedMessageError,
    ServerShutdownError,
    StreamStats,
    newest_closed_open_ms,
    parse_message,
)
from market.sources.sim import MarketSimulator, format_dump_line
from serve.engine.feed import BarFeed
from tests.fake_binance import kline_from_csv
from tests.fake_binance_ws import StreamRig, kline_event, open_update, start_rig

MINUTE = ONE_MINUTE_MS
T0 = 1_706_745_600_000  # 2024-02-01 00:00 UTC
SIM = SimConfig(seed=23, anchor_date=date(2024, 2, 1))


def sim_lines(symbol: str, minutes: int) -> list[str]:
    """The first `minutes` simulated bars of `symbol` as Binance dump lines (no gaps)."""
    _, day = next(iter(MarketSimulator(SIM, symbol).days(SIM.anchor_date, SIM.anchor_date)))
    return [format_dump_line(day, i) for i in range(minutes)]


def kline(minute: int) -> list[object]:
    """A REST-form kline opening at minute `minute` after T0 (values are irrelevant here)."""
    open_ms = T0 + minute * MINUTE
    return [open_ms, "1.0", "1.0", "1.0", "1.0", "2.0", open_ms + MINUTE - 1, "2.0", 3, "1.0"]


def opens(klines: list[list[object]]) -> list[int]:
    return [(int(str(k[0])) - T0) // MINUTE for k in klines]


# -- parsing --------------------------------------------------------------------------------------


def test_a_closed_kline_event_becomes_its_rest_form() -> None:
    rest = kline_from_csv(sim_lines("SIMAAA", 1)[0])
    event = kline_event("SIMAAA", rest, closed=True, event_ms=T0 + MINUTE)
    parsed = parse_message(json.dumps(event))
    assert parsed == KlineEvent("SIMAAA", rest[0], True, rest)
    update = parse_message(
        json.dumps(kline_event("SIMAAA", open_update(rest), closed=False, event_ms=1))
    )
    assert isinstance(update, KlineEvent) and not update.closed


def test_a_server_shutdown_event_ends_the_connection() -> None:
    for message in ('{"e":"serverShutdown","E":1}', '{"stream":"x","data":{"e":"serverShutdown"}}'):
        with pytest.raises(ServerShutdownError):
            parse_message(message)


def test_control_answers_are_parsed() -> None:
    assert parse_message('{"result":null,"id":3}') == ControlReply(3, None)
    assert parse_message('{"code":2,"msg":"Invalid request","id":4}') == ControlReply(
        4, "code 2: Invalid request"
    )


@pytest.mark.parametrize(
    "message",
    [
        '{"stream":"simaaa@kline_1m","data":{"e":"kline","k":{"t":1',  # cut JSON
        "[1,2]",
        '{"stream":"simaaa@trade","data":{"e":"trade"}}',
        '{"data":{"e":"kline","k":{"t":1706745600000,"T":1,"s":"SIMAAA","i":"1m","n":1}}}',
        '{"data":{"e":"kline","k":{"t":1706745600007,"T":1,"s":"S","i":"1m","n":1,"x":true}}}',
        '{"data":{"e":"kline","k":{"t":1706745600000,"T":1,"s":"S","i":"5m","n":1,"x":true}}}',
        '{"data":{"e":"kline","k":{"t":1706745600000,"T":1,"s":"S","i":"1m","n":1,"x":true}}}',
    ],
    ids=["cut", "array", "trade", "no-closed-flag", "off-minute", "interval", "no-prices"],
)
def test_malformed_messages_are_rejected(message: str) -> None:
    with pytest.raises(MalformedMessageError):
        parse_message(message)


# -- sequencing (no sockets) ---------------------------------------------------------------------


def history(sequence: KlineSequence, newest: int, minutes: int) -> list[list[object]]:
    """Run the first backfill: REST has every minute up to `newest`."""
    start, end = sequence.begin_backfill(T0 + newest * MINUTE, minutes)
    rows = [(T0 + m * MINUTE, kline(m)) for m in range(newest - minutes + 1, newest + 1)]
    assert (start, end) == (rows[0][0], rows[-1][0])
    return sequence.finish_backfill(rows, start, end)


def test_stream_klines_wait_for_the_history_then_flow_in_order_without_duplicates() -> None:
    sequence = KlineSequence()
    assert sequence.offer(T0 + 10 * MINUTE, kline(10)) == []  # before the history: held
    assert opens(history(sequence, 9, 5)) == [5, 6, 7, 8, 9, 10]
    assert opens(sequence.offer(T0 + 11 * MINUTE, kline(11))) == [11]
    assert sequence.offer(T0 + 11 * MINUTE, kline(11)) == []
    assert sequence.offer(T0 + 7 * MINUTE, kline(7)) == []
    assert sequence.duplicates == 2 and not sequence.requested


def test_an_out_of_order_kline_asks_for_the_gap_and_the_late_copy_is_dropped() -> None:
    sequence = KlineSequence()
    history(sequence, 9, 5)
    assert sequence.offer(T0 + 11 * MINUTE, kline(11)) == []  # minute 10 is missing
    assert sequence.requested
    start, end = sequence.begin_backfill(T0 + 11 * MINUTE, 5)
    assert (start, end) == (T0 + 10 * MINUTE, T0 + 11 * MINUTE)
    assert sequence.offer(T0 + 10 * MINUTE, kline(10)) == []  # held while the backfill runs
    rows = [(T0 + m * MINUTE, kline(m)) for m in (10, 11)]
    assert opens(sequence.finish_backfill(rows, start, end)) == [10, 11]
    assert sequence.offer(T0 + 10 * MINUTE, kline(10)) == []
    assert sequence.next_open_ms == T0 + 12 * MINUTE and not sequence.requested


def test_a_fast_local_clock_cannot_skip_a_minute_rest_has_not_closed() -> None:
    sequence = KlineSequence()
    history(sequence, 9, 5)
    sequence.requested = True  # a reconnect
    # The local clock says minutes 10 and 11 have closed; the exchange has only closed 10.
    start, end = sequence.begin_backfill(T0 + 11 * MINUTE, 5)
    assert opens(sequence.finish_backfill([(T0 + 10 * MINUTE, kline(10))], start, end)) == [10]
    assert sequence.next_open_ms == T0 + 11 * MINUTE
    assert opens(sequence.offer(T0 + 11 * MINUTE, kline(11))) == [11]


def test_minutes_the_exchange_never_had_are_skipped_once_a_later_kline_proves_them_closed() -> None:
    sequence = KlineSequence()
    history(sequence, 9, 5)
    assert sequence.offer(T0 + 13 * MINUTE, kline(13)) == []
    start, end = sequence.begin_backfill(T0 + 12 * MINUTE, 5)
    assert opens(sequence.finish_backfill([], start, end)) == [13]  # 10..12: an outage


def test_a_failing_backfill_holds_klines_until_too_many_wait() -> None:
    sequence = KlineSequence()
    history(sequence, 9, 5)
    for minute in (11, 12):
        sequence.offer(T0 + minute * MINUTE, kline(minute))
    sequence.begin_backfill(T0 + 12 * MINUTE, 5)
    assert sequence.backfill_failed(max_pending=2) == [] and sequence.requested
    sequence.offer(T0 + 13 * MINUTE, kline(13))
    sequence.begin_backfill(T0 + 13 * MINUTE, 5)
    assert opens(sequence.backfill_failed(max_pending=2)) == [11, 12, 13]  # minute 10 is lost


# -- against the local servers -------------------------------------------------------------------


def test_closed_klines_arrive_exactly_once_in_order_from_history_and_stream(
    rigs: list[StreamRig],
) -> None:
    lines = {symbol: sim_lines(symbol, 50) for symbol in ("SIMAAA", "SIMBBB")}
    # The server pings every 50 ms and drops a client whose pong is 0.5 s late.
    rig = start_rig(lines, 20, server={"ping_interval_s": 0.05, "ping_timeout_s": 0.5})
    rigs.append(rig)

    delivered = rig.collect()

    assert delivered == rig.tape  # nothing lost, duplicated, changed or out of order
    stats = rig.stream.stats()
    assert stats.reconnects == [] and stats.connects == 1 and stats.malformed == 0
    # The history from REST, one request per symbol; the rest from the stream, each closed kline
    # preceded by a non-closed update that was ignored. A minute closing between the server's
    # subscription and the client's backfill comes both ways: one copy is dropped.
    requests = rig.rest.klines_requests
    assert sorted(r.params["symbol"] for r in requests) == ["SIMAAA", "SIMBBB"]
    history = sum(r.rows for r in requests)
    streamed = rig.server.connections[0].closed_klines_sent
    assert history >= 2 * 20 and streamed >= 2 * 20  # most of the 30 live minutes streamed
    assert history + streamed - stats.duplicates == 2 * 50
    assert stats.open_updates == streamed
    assert [rig.stream.error(s) for s in lines] == [None, None]


def test_symbols_beyond_the_per_connection_limit_open_more_connections_subscribed_in_paced_batches(
    rigs: list[StreamRig],
) -> None:
    symbols = [f"SIM{chr(ord('A') + i)}XX" for i in range(12)]
    lines = {symbol: sim_lines(symbol, 60) for symbol in symbols}
    limits = {"max_streams_per_connection": 7, "max_messages_per_s": 5}
    rig = start_rig(lines, 20, server=limits, streams_per_message=1, **limits)
    rigs.append(rig)

    delivered = rig.collect()

    assert delivered == rig.tape
    assert rig.stream.connections == [tuple(symbols[:7]), tuple(symbols[7:])]
    logs = sorted(rig.server.connections, key=lambda c: c.url_streams)
    assert [c.url_streams for c in logs] == [["simaxx@kline_1m"], ["simhxx@kline_1m"]]
    # 6 and 4 SUBSCRIBE messages of one stream each: 7 is more than the server allows in a
    # second, so only pacing them keeps the connections open.
    assert [len(c.subscribe_messages) for c in logs] == [6, 4]
    assert all(len(m) == 1 for c in logs for m in c.subscribe_messages)
    assert [c.closed_by_server for c in logs] == [None, None]
    assert rig.stream.stats().reconnects == []


def test_refused_handshakes_back_off_exponentially_with_jitter_while_rest_keeps_up(
    rigs: list[StreamRig],
) -> None:
    lines = {"SIMAAA": sim_lines("SIMAAA", 60)}
    rig = start_rig(lines, 20, backoff_base_s=0.1, backoff_max_s=0.3)
    rigs.append(rig)
    rig.server.refuse(3)

    delivered = rig.collect()

    assert delivered == rig.tape
    reconnects = rig.stream.stats().reconnects[:3]
    assert [r.attempt for r in reconnects] == [0, 1, 2]
    assert all("503" in r.reason for r in reconnects)
    jitter = random.Random(7)  # the rig's seed: cap / 2 + uniform(0, cap / 2)
    caps = [0.1, 0.2, 0.3]
    assert [r.delay_s for r in reconnects] == [c / 2 + jitter.uniform(0, c / 2) for c in caps]
    attempts = rig.server.attempts
    assert len(attempts) >= 4 and rig.server.refused == 3
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts[:4])]
    assert all(gap >= r.delay_s - 0.01 for gap, r in zip(gaps, reconnects, strict=True))
    # No connection was open before the 4th attempt, yet REST loaded the history at the first
    # refusal and caught up after each later one (each wait spans a minute or more), and once
    # more after the connection.
    backfills = rig.stream.stats().backfills
    assert backfills[0].rows >= 20 and len(backfills) >= 4


def test_config_limits_follow_binance_documentation() -> None:
    with pytest.raises(ValueError, match="1024"):
        BinanceStreamConfig(max_streams_per_connection=1025)
    with pytest.raises(ValueError, match="5"):
        BinanceStreamConfig(max_messages_per_s=6)
    assert newest_closed_open_ms((T0 + 90_000) / 1000) == T0


def test_the_binance_feed_takes_the_stream_by_default_and_rest_polling_on_request() -> None:
    streaming = BarFeed(FeedConfig(source="binance", symbols=["BTCUSDT"]))
    polling = BarFeed(FeedConfig(source="binance", symbols=["BTCUSDT"], binance_live="polling"))
    try:
        assert streaming.stream_stats() == StreamStats()  # nothing opened before the first poll
        assert "'live': 'websocket'" in repr(streaming)
        assert polling.stream_stats() is None and "'live': 'polling'" in repr(polling)
    finally:
        streaming.close()
        polling.close()
