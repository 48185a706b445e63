"""A real local WebSocket server that speaks Binance's kline stream protocol, with fault injection.

Clients open combined streams at `/stream?streams=<symbol>@kline_1m/...` and add streams with
`{"method": "SUBSCRIBE", "params": [...], "id": n}`, answered `{"result": null, "id": n}`. Like
Binance the server enforces its limits: more than `max_streams_per_connection` streams on one
connection, or more than `max_messages_per_s` messages from a client within one second, close the
connection with 1008 (policy violation); the messages counted are the client's JSON messages
(its pong frames are answered inside `websockets` and not seen here). It pings every
`ping_interval_s` and drops a client that has not answered within `ping_timeout_s` (the
`websockets` server's keepalive).

The server replays a tape, REST-form klines per symbol (`tests.fake_binance.kline_from_csv`), on
a `ReplayClock`: once the clock passes the close of minute m, every connection subscribed to a
symbol with a kline at m gets a non-closed update of it (`x: false`, values that differ from the
final ones, as a live minute's updates do) and then the closed kline (`x: true`), each wrapped as
`{"stream": ..., "data": {"e": "kline", "E": ..., "s": ..., "k": {...}}}`. A stream gets only the
minutes that close after it was subscribed, as on the exchange.

Faults are scripted by minute (open time, epoch ms) and apply once, on the first connection that
reaches that minute: `drop` (abort the TCP connection before sending it, no close frame),
`duplicate` (the closed kline three times, once more after the next minute), `swap` (the next
minute's closed kline first, out of order), `malformed` (broken JSON instead of the closed kline),
`stall` (from that minute on the connection sends nothing but stays open, answering pings),
`shutdown` (a `serverShutdown` event instead of that minute, then a close with 1001 a replayed
minute later, unless the client went first).
`refuse(n)` answers the next n handshakes with HTTP 503. Everything is recorded (`attempts`: the
monotonic time of every handshake, refused or not; `connections`; `applied`) for assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from configs.schema import BinanceConfig, BinanceStreamConfig
from market.klines import ONE_MINUTE_MS
from market.sources.binance import BinanceClient
from market.sources.binance_ws import BinanceKlineStream
from tests.fake_binance import FakeBinance, Kline, kline_from_csv

FAULT_KINDS = frozenset({"drop", "duplicate", "swap", "malformed", "stall", "shutdown"})


class ReplayClock:
    """Epoch seconds that run `speed` times faster than real time, from `start_s`."""

    def __init__(self, start_s: float, speed: float) -> None:
        self.start_s = start_s
        self.speed = speed
        self._t0 = time.monotonic()

    def restart(self) -> None:
        """Read `start_s` again now (servers started before the client must not run ahead)."""
        self._t0 = time.monotonic()

    def __call__(self) -> float:
        return self.start_s + (time.monotonic() - self._t0) * self.speed

    def real_s_until(self, epoch_s: float) -> float:
        """Real seconds until the clock reads `epoch_s` (0 when it has)."""
        return max(0.0, (epoch_s - self()) / self.speed)


def kline_event(symbol: str, kline: Kline, *, closed: bool, event_ms: int) -> dict[str, Any]:
    """A combined-stream kline event exactly as Binance sends it, from a REST-form kline."""
    trades = int(kline[8])
    first_trade = int(kline[0]) // 1000
    return {
        "stream": f"{symbol.lower()}@kline_1m",
        "data": {
            "e": "kline",
            "E": event_ms,
            "s": symbol,
            "k": {
                "t": kline[0],
                "T": kline[6],
                "s": symbol,
                "i": "1m",
                "f": first_trade,
                "L": first_trade + trades - 1,
                "o": kline[1],
                "c": kline[4],
                "h": kline[2],
                "l": kline[3],
                "v": kline[5],
                "n": trades,
                "x": closed,
                "q": kline[7],
                "V": kline[9],
                "Q": kline[10],
                "B": kline[11],
            },
        },
    }


def open_update(kline: Kline) -> Kline:
    """The kline as a mid-minute update shows it: the minute so far, not its final values."""
    partial = list(kline)
    partial[2] = partial[3] = partial[4] = kline[1]  # high, low, close at the open
    partial[5], partial[8] = "0.00100000", 1
    return partial


@dataclass
class ConnectionLog:
    """What one client connection did: the URL's streams, its SUBSCRIBEs, how it ended."""

    url_streams: list[str]
    subscribe_messages: list[list[str]] = field(default_factory=list)
    streams: set[str] = field(default_factory=set)
    closed_klines_sent: int = 0
    closed_by_server: str | None = None
    faulted_at: float | None = None  # monotonic time a drop or stall fault hit it
    last_sent_at: float | None = None  # monotonic time of the last kline message sent


class FakeBinanceStream:
    """A WebSocket server on 127.0.0.1 (a free port) replaying `tape` on `clock`."""

    def __init__(
        self,
        tape: Mapping[str, Sequence[Kline]],
        *,
        clock: ReplayClock,
        faults: Mapping[int, str] | None = None,
        max_streams_per_connection: int = 1024,
        max_messages_per_s: int = 5,
        ping_interval_s: float = 20.0,
        ping_timeout_s: float = 60.0,
    ) -> None:
        self.tape = {symbol: {int(k[0]): k for k in klines} for symbol, klines in tape.items()}
        self.minutes = sorted({minute for klines in self.tape.values() for minute in klines})
        self.clock = clock
        self.faults: dict[int, str] = dict(faults or {})
        unknown = set(self.faults.values()) - FAULT_KINDS
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}")
        self.max_streams = max_streams_per_connection
        self.max_messages_per_s = max_messages_per_s
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.attempts: list[float] = []
        self.connections: list[ConnectionLog] = []
        self.applied: list[tuple[int, str]] = []
        self.refused = 0
        self._refuse_next = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("server not started")
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}"

    def start(self) -> FakeBinanceStream:
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._main()), name="fake-binance-ws", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("the fake stream server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeBinanceStream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def refuse(self, handshakes: int) -> None:
        """Answer the next `handshakes` connection attempts with HTTP 503."""
        self._refuse_next += handshakes

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        async with serve(
            self._handle,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            ping_interval=self.ping_interval_s,
            ping_timeout=self.ping_timeout_s,
            close_timeout=1,
        ) as server:
            self._server = server
            self._ready.set()
            await self._stopping.wait()

    # -- protocol -----------------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self.attempts.append(time.monotonic())
        if urlsplit(request.path).path != "/stream":
            return connection.respond(HTTPStatus.NOT_FOUND, "unknown path\n")
        if self._refuse_next > 0:
            self._refuse_next -= 1
            self.refused += 1
            return Response(503, "Service Unavailable", Headers(), b"try again later\n")
        return None

    def _start_minute(self) -> int:
        """The minute whose close comes next: a stream subscribed now gets it and later ones."""
        now_ms = int(self.clock() * 1000)
        return now_ms - now_ms % ONE_MINUTE_MS

    async def _handle(self, connection: ServerConnection) -> None:
        query = parse_qs(urlsplit(connection.request.path if connection.request else "").query)
        url_streams = [s for s in query.get("streams", [""])[0].split("/") if s]
        log = ConnectionLog(url_streams)
        self.connections.append(log)
        starts: dict[str, int] = {}
        if not await self._add_streams(connection, log, starts, url_streams):
            return
        sender = asyncio.create_task(self._send_klines(connection, log, starts))
        received: deque[float] = deque()
        try:
            async for message in connection:
                now = time.monotonic()
                received.append(now)
                while received and now - received[0] > 1.0:
                    received.popleft()
                if len(received) > self.max_messages_per_s:
                    log.closed_by_server = "too many messages"
                    await connection.close(1008, "Too many requests")
                    return
                request = json.loads(message)
                if request.get("method") == "SUBSCRIBE":
                    log.subscribe_messages.append(list(request["params"]))
                    if not await self._add_streams(connection, log, starts, request["params"]):
                        return
                    await connection.send(json.dumps({"result": None, "id": request["id"]}))
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()

    async def _add_streams(
        self,
        connection: ServerConnection,
        log: ConnectionLog,
        starts: dict[str, int],
        streams: list[str],
    ) -> bool:
        log.streams.update(streams)
        if len(log.streams) > self.max_streams:
            log.closed_by_server = "too many streams"
            await connection.close(1008, "Too many streams")
            return False
        for stream in streams:
            starts.setdefault(stream.split("@", 1)[0].upper(), self._start_minute())
        return True

    async def _send_klines(
        self, connection: ServerConnection, log: ConnectionLog, starts: dict[str, int]
    ) -> None:
        index = 0
        held: list[str] = []  # closed klines of a swapped minute, sent after the next one
        while index < len(self.minutes):
            minute = self.minutes[index]
            await asyncio.sleep(self.clock.real_s_until((minute + ONE_MINUTE_MS) / 1000))
            fault = self.faults.pop(minute, None)
            if fault is not None:
                self.applied.append((minute, fault))
            if fault in ("drop", "stall", "shutdown"):
                log.faulted_at = time.monotonic()
            if fault == "shutdown":
                log.closed_by_server = "shutdown"
                await connection.send(json.dumps({"e": "serverShutdown", "E": minute}))
                await asyncio.sleep(self.clock.real_s_until(self.clock() + 60))
                await connection.close(1001, "server shutdown")
                return
            if fault == "drop":
                log.closed_by_server = "dropped"
                connection.transport.abort()
                return
            if fault == "stall":
                log.closed_by_server = "stalled"
                await asyncio.Event().wait()  # silent until the client gives up
            event_ms = int(self.clock() * 1000)
            closed: list[str] = []
            for symbol, start in list(starts.items()):
                kline = self.tape.get(symbol, {}).get(minute)
                if kline is None or minute < start:
                    continue
                update = kline_event(symbol, open_update(kline), closed=False, event_ms=event_ms)
                await connection.send(json.dumps(update))
                log.last_sent_at = time.monotonic()
                closed.append(
                    json.dumps(kline_event(symbol, kline, closed=True, event_ms=event_ms))
                )
            if fault == "malformed":
                closed = [text[: len(text) // 2] for text in closed]
            if fault == "duplicate":
                closed = closed * 3
            if fault == "swap":
                held = closed
                index += 1
                continue
            for text in closed + held:
                await connection.send(text)
                log.closed_klines_sent += 1
                log.last_sent_at = time.monotonic()
            # A duplicated minute is sent once more, stale, after the next minute.
            held = closed[:1] if fault == "duplicate" else []
            index += 1
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()  # the tape is over: stay connected, silent


def collect(
    stream: BinanceKlineStream, expected: Mapping[str, int], timeout_s: float
) -> dict[str, list[Kline]]:
    """Drain a started stream until each symbol has its `expected` count of klines or the time
    is up (real seconds); everything delivered, per symbol in delivery order."""
    delivered: dict[str, list[Kline]] = {symbol: [] for symbol in expected}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for symbol, klines in stream.drain().items():
            delivered.setdefault(symbol, []).extend(klines)
        if all(len(delivered[s]) >= n for s, n in expected.items()):
            break
        time.sleep(0.02)
    time.sleep(0.1)  # anything delivered after the last expected kline is a duplicate
    for symbol, klines in stream.drain().items():
        delivered.setdefault(symbol, []).extend(klines)
    return delivered


MINUTE_REAL_S = 0.04
"""Real seconds per replayed minute in the stream tests (a 1,500x clock)."""


@dataclass
class StreamRig:
    """A kline stream client wired to a local REST server and stream server serving one tape."""

    tape: dict[str, list[Kline]]
    clock: ReplayClock
    rest: FakeBinance
    server: FakeBinanceStream
    stream: BinanceKlineStream

    def collect(self, timeout_s: float = 30.0) -> dict[str, list[Kline]]:
        """Start the clock and the client; collect until every kline of the tape was delivered."""
        self.clock.restart()
        self.stream.start()
        return collect(self.stream, {s: len(k) for s, k in self.tape.items()}, timeout_s)

    def close(self) -> None:
        self.stream.stop()
        self.server.stop()
        self.rest.stop()


def start_rig(
    lines: Mapping[str, Sequence[str]],
    history_minutes: int,
    *,
    faults: Mapping[int, str] | None = None,
    server: Mapping[str, Any] | None = None,
    **stream: Any,
) -> StreamRig:
    """Servers replaying `lines` (dump lines per symbol, the same minutes for each) and a client.

    The clock starts (`StreamRig.collect`) just after the first `history_minutes` minutes have
    closed, so the client loads those from REST and streams the rest; one minute takes
    `MINUTE_REAL_S` real seconds. The client's history reaches back over the whole tape, so that
    however late its first backfill runs on a loaded machine, the tape is what it must deliver.
    `server` and `stream` override FakeBinanceStream and BinanceStreamConfig settings.
    """
    tape = {symbol: [kline_from_csv(line) for line in rows] for symbol, rows in lines.items()}
    first_open = min(int(klines[0][0]) for klines in tape.values())
    start_s = (first_open + history_minutes * ONE_MINUTE_MS) / 1000 + 1.0
    clock = ReplayClock(start_s, speed=60.0 / MINUTE_REAL_S)
    rest = FakeBinance(lines, clock=clock).start()
    ws = FakeBinanceStream(tape, clock=clock, faults=faults, **(server or {})).start()
    settings: dict[str, Any] = {
        "url": ws.url,
        # Long enough that a loaded machine's pauses are not taken for a stall (the stall test
        # sets its own); the silent server after the tape ends stalls only after collect().
        "stall_timeout_s": 5.0,
        "backoff_base_s": 0.05,
        "backoff_max_s": 0.4,
        "backfill_retry_s": 0.1,
        "ack_timeout_s": 2.0,
        **stream,
    }
    client = BinanceClient(
        BinanceConfig(
            base_url=rest.url, timeout_s=5.0, max_retries=2, backoff_base_s=0.01, backoff_max_s=0.05
        )
    )
    kline_stream = BinanceKlineStream(
        list(tape),
        BinanceStreamConfig(**settings),
        client,
        history_minutes=max(len(klines) for klines in tape.values()),
        clock=clock,
        rng=random.Random(7),
    )
    return StreamRig(tape, clock, rest, ws, kline_stream)
