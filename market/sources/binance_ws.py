"""Binance's WebSocket kline stream as a live source of closed 1-minute klines.

The protocol, from Binance's spot WebSocket Streams documentation
(`configs.schema.BINANCE_STREAM_DOCS`):

- Combined streams are opened at `/stream?streams=<name1>/<name2>/...` and every event arrives
  wrapped as `{"stream": <name>, "data": <event>}`; a stream name is the lower-case symbol and
  the stream, here `btcusdt@kline_1m`. More streams are added on an open connection with
  `{"method": "SUBSCRIBE", "params": [<names>], "id": <n>}`, answered `{"result": null, "id": n}`
  (an error answer carries `code` and `msg`).
- Limits ("WebSocket Limits"): at most 1024 streams per connection; at most 5 incoming messages
  per second per connection, where a PING frame, a PONG frame and a JSON control message each
  count (a connection beyond it is disconnected); 300 connection attempts per 5 minutes per IP.
- The server sends a ping frame every 20 s and disconnects a client that has not answered with a
  pong within a minute; `websockets` answers pings itself, so the receive loop must never block
  the event loop (REST backfills run on a worker thread). A connection is cut at 24 h, so each
  one is replaced before that (`max_connection_age_s`): the replacement is opened and fully
  subscribed before the old one is closed, and the klines both deliver meanwhile are deduplicated.
- A `serverShutdown` event announces that the server is about to close the connection and asks
  for a new one as soon as possible: the client reconnects then, after its shortest backoff.
- A kline event is `{"e": "kline", "E": event_ms, "s": SYMBOL, "k": {"t": open_ms,
  "T": close_ms, "s", "i": "1m", "f", "L", "o", "c", "h", "l", "v", "n", "x": closed, "q", "V",
  "Q", "B"}}`, pushed every 2 s while the minute is open; only the update with `x == true` is
  the final, closed kline.

`BinanceKlineStream` spreads the symbols over connections of at most `max_streams_per_connection`
streams, names the first `streams_per_message` in the URL and subscribes the rest in SUBSCRIBE
messages paced under the message limit. It keeps only closed klines, replaces a connection that
stays silent for `stall_timeout_s` or drops, and reconnects with exponential backoff and jitter.
After every (re)connect, and while a connection is down, the minutes each symbol missed are
fetched from the REST client (`market.sources.binance.BinanceClient`). Per symbol a
`KlineSequence` merges the two sources so that every closed kline is delivered exactly once and
in open-time order. Klines are delivered in the REST form (a 12-element array, decimals as
strings), as `BinanceClient.klines` returns them, for the caller's validation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from configs.schema import BinanceStreamConfig
from market.klines import ONE_MINUTE_MS
from market.sources.binance import BinanceAPIError, BinanceClient

log = logging.getLogger(__name__)

KLINE_INTERVAL = "1m"
Kline = list[Any]
"""One kline in Binance's REST form: [open_ms, open, high, low, close, volume, close_ms,
quote_volume, trades, taker_buy_base, taker_buy_quote, ignore]."""

# What a REST backfill can raise once the client has spent its retries.
_REST_ERRORS: tuple[type[BaseException], ...] = (BinanceAPIError, httpx.HTTPError, OSError)
# Reconnects and backfills remembered for `stats()` (the newest ones).
_HISTORY = 10_000


def stream_name(symbol: str) -> str:
    """The kline stream of `symbol`: lower-case, as Binance names streams."""
    return f"{symbol.lower()}@kline_{KLINE_INTERVAL}"


def newest_closed_open_ms(now_s: float) -> int:
    """Open time (epoch ms) of the newest 1-minute kline closed at `now_s` (epoch seconds)."""
    now_ms = int(now_s * 1000)
    return now_ms - now_ms % ONE_MINUTE_MS - ONE_MINUTE_MS


def chunks(items: Sequence[str], size: int) -> list[list[str]]:
    """`items` in consecutive lists of at most `size`."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


class MalformedMessageError(ValueError):
    """A stream message that is not JSON or not a well-formed kline event or answer."""


class ServerShutdownError(ConnectionError):
    """The server announced its shutdown (`serverShutdown`): reconnect now."""


class StreamStalledError(TimeoutError):
    """No message arrived on a connection for `stall_timeout_s`."""


class SubscribeError(RuntimeError):
    """A SUBSCRIBE was refused or not answered within `ack_timeout_s`."""


# What ends a connection: protocol and handshake errors, socket errors (an announced server
# shutdown is one), timeouts (a stall is one), a refused or unanswered SUBSCRIBE.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    WebSocketException,
    OSError,
    TimeoutError,
    SubscribeError,
)


@dataclass(frozen=True)
class KlineEvent:
    """One kline event: `closed` is `k.x`; `kline` is the REST form of `k`."""

    symbol: str
    open_ms: int
    closed: bool
    kline: Kline


@dataclass(frozen=True)
class ControlReply:
    """The answer to a control message: `error` None when `result` came back."""

    id: int
    error: str | None


def _int_field(payload: dict[str, Any], key: str) -> int:
    value = payload.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedMessageError(f"kline field {key!r} is not an integer: {value!r:.40}")
    return value


def parse_message(message: str | bytes) -> KlineEvent | ControlReply:
    """A combined-stream message: a kline event or the answer to a control message.

    Raises ServerShutdownError for a `serverShutdown` event and MalformedMessageError for
    anything else (not JSON, another event type, a kline without its open time, interval or
    closed flag, an open time off the minute). Prices and
    volumes are not checked here: the caller validates the REST form like any other kline.
    """
    try:
        payload = json.loads(message)
    except (ValueError, UnicodeDecodeError) as error:
        raise MalformedMessageError(f"not JSON: {error}") from None
    if not isinstance(payload, dict):
        raise MalformedMessageError(f"not a JSON object: {str(message)[:80]!r}")
    if "id" in payload and ("result" in payload or "code" in payload):
        reply_id = payload["id"]
        if not isinstance(reply_id, int):
            raise MalformedMessageError(f"control answer with id {reply_id!r:.40}")
        if "code" in payload:
            return ControlReply(reply_id, f"code {payload['code']}: {payload.get('msg')}")
        return ControlReply(reply_id, None)
    data = payload.get("data", payload)  # combined streams wrap events, a raw event is bare
    if isinstance(data, dict) and data.get("e") == "serverShutdown":
        raise ServerShutdownError("the server announced its shutdown")
    if (
        not isinstance(data, dict)
        or data.get("e") != "kline"
        or not isinstance(data.get("k"), dict)
    ):
        raise MalformedMessageError(f"not a kline event: {str(message)[:80]!r}")
    k: dict[str, Any] = data["k"]
    symbol, closed = k.get("s"), k.get("x")
    if not isinstance(symbol, str) or not isinstance(closed, bool):
        raise MalformedMessageError("kline without a symbol or a closed flag")
    if k.get("i") != KLINE_INTERVAL:
        raise MalformedMessageError(f"kline of interval {k.get('i')!r:.20}, not {KLINE_INTERVAL}")
    open_ms, close_ms, trades = _int_field(k, "t"), _int_field(k, "T"), _int_field(k, "n")
    if open_ms % ONE_MINUTE_MS:
        raise MalformedMessageError(f"kline open time {open_ms} is off the minute")
    try:
        kline = [open_ms, k["o"], k["h"], k["l"], k["c"], k["v"], close_ms, k["q"], trades]
        kline += [k["V"], k["Q"], k.get("B", "0")]
    except KeyError as missing:
        raise MalformedMessageError(f"kline without field {missing}") from None
    return KlineEvent(symbol, open_ms, closed, kline)


class KlineSequence:
    """Exactly-once, in-order delivery of one symbol's closed klines from the stream and REST.

    `next_open_ms` is the minute to deliver next (None before the first backfill). A stream
    kline before it, or one already pending, is a duplicate and dropped; the next one is
    delivered; a later one waits in `pending` and asks for a backfill of the minutes between.
    Delivery also waits while a backfill is requested or running (after a reconnect the stream
    resumes before the REST answer arrives). A backfill asks REST for
    [`next_open_ms`, max(newest closed minute, first pending - 1 minute)]; minutes REST does not
    return are skipped only when a later kline proves them closed (the exchange had none), never
    on the local clock's word, so a fast local clock cannot lose a minute.
    """

    def __init__(self) -> None:
        self.next_open_ms: int | None = None
        self.pending: dict[int, Kline] = {}
        self.requested = True  # the first backfill loads the history
        self.in_flight = False
        self.duplicates = 0

    @property
    def blocked(self) -> bool:
        return self.requested or self.in_flight or self.next_open_ms is None

    def offer(self, open_ms: int, kline: Kline) -> list[Kline]:
        """A closed kline from the stream; the klines now deliverable, in order."""
        if (self.next_open_ms is not None and open_ms < self.next_open_ms) or (
            open_ms in self.pending
        ):
            self.duplicates += 1
            return []
        self.pending[open_ms] = kline
        return self._release()

    def _release(self) -> list[Kline]:
        if self.blocked or self.next_open_ms is None:
            return []
        released: list[Kline] = []
        while self.next_open_ms in self.pending:
            released.append(self.pending.pop(self.next_open_ms))
            self.next_open_ms += ONE_MINUTE_MS
        if self.pending:  # a minute is missing before the pending klines
            self.requested = True
        return released

    def begin_backfill(self, newest_closed_ms: int, history_minutes: int) -> tuple[int, int]:
        """Start the requested backfill: the inclusive open-time range to ask REST for."""
        self.requested, self.in_flight = False, True
        start = self.next_open_ms
        if start is None:
            start = newest_closed_ms - (history_minutes - 1) * ONE_MINUTE_MS
        end = newest_closed_ms
        if self.pending:
            end = max(end, min(self.pending) - ONE_MINUTE_MS)
        return start, end

    def finish_backfill(self, rows: list[tuple[int, Kline]], start: int, end: int) -> list[Kline]:
        """REST's klines of [start, end] (open time, kline); the klines now deliverable."""
        self.in_flight = False
        known = {o: k for o, k in self.pending.items() if o >= start}
        self.duplicates += len(self.pending) - len(known)
        for open_ms, kline in rows:
            if start <= open_ms <= end:
                if open_ms in known:
                    self.duplicates += 1
                else:
                    known[open_ms] = kline
        released: list[Kline] = []
        cursor = start
        for open_ms in sorted(known):
            # Minutes in [cursor, open_ms) were asked for and REST had none: the exchange has no
            # kline there. Past `end + 1 minute` they were not asked for: stop and ask.
            if open_ms != cursor and open_ms > end + ONE_MINUTE_MS:
                break
            released.append(known.pop(open_ms))
            cursor = open_ms + ONE_MINUTE_MS
        self.next_open_ms = cursor
        self.pending = known
        if self.pending:
            self.requested = True
        return released

    def backfill_failed(self, max_pending: int) -> list[Kline]:
        """A backfill failed: retry later, unless too many klines wait (then accept the gap)."""
        self.in_flight, self.requested = False, True
        if len(self.pending) <= max_pending:
            return []
        first = min(self.pending)
        log.warning("giving up on the minutes before %d: %d klines waited", first, max_pending)
        self.next_open_ms, self.requested = first, False
        return self._release()


@dataclass(frozen=True)
class Reconnect:
    """One lost connection: the wait before the next attempt and why it was lost.

    `attempt` counts the failed attempts in a row before this one (0 after a connection that
    delivered klines); the wait is drawn from [cap / 2, cap] with
    cap = min(backoff_max_s, backoff_base_s * 2**attempt).
    """

    connection: int
    attempt: int
    delay_s: float
    reason: str


@dataclass(frozen=True)
class Backfill:
    """One REST backfill of a symbol: the open-time range asked, rows received, any error."""

    symbol: str
    start_ms: int
    end_ms: int
    rows: int
    error: str | None = None


@dataclass
class StreamStats:
    """Counters of a stream since it started (a snapshot, see `BinanceKlineStream.stats`)."""

    connects: int = 0
    delivered: int = 0
    duplicates: int = 0
    open_updates: int = 0
    malformed: int = 0
    rotations: int = 0
    reconnects: list[Reconnect] = field(default_factory=list)
    backfills: list[Backfill] = field(default_factory=list)


@dataclass
class _Session:
    """One connection's state: the SUBSCRIBE messages awaiting their answer, and whether every
    stream of the connection is subscribed (`live`)."""

    awaiting: dict[int, tuple[float, list[str]]] = field(default_factory=dict)
    unanswered_batches: int = 0
    live: asyncio.Event = field(default_factory=asyncio.Event)
    received_klines: bool = False


class BinanceKlineStream:
    """Closed 1-minute klines of `symbols`, each delivered once and in order (see module doc).

    Runs its own asyncio loop on a daemon thread between `start()` and `stop()`; REST backfills
    run on one worker thread (the REST client is not shared across threads, and one at a time
    keeps under its request-weight budget). `drain()` hands over what was delivered since the
    last call. `clock` returns epoch seconds (what "closed" is judged by); `rng` draws the
    reconnect jitter. The first backfill of a symbol fetches its last `history_minutes` minutes.
    """

    def __init__(
        self,
        symbols: Sequence[str],
        config: BinanceStreamConfig,
        client: BinanceClient,
        *,
        history_minutes: int,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if not symbols:
            raise ValueError("a kline stream needs at least one symbol")
        self.config = config
        self.symbols = tuple(dict.fromkeys(symbols))
        self.connections = [
            tuple(group) for group in chunks(self.symbols, config.max_streams_per_connection)
        ]
        self._client = client
        self._history_minutes = history_minutes
        self._clock = clock
        self._rng = rng or random.Random()
        self._sequences = {symbol: KlineSequence() for symbol in self.symbols}
        self._by_stream = {stream_name(symbol): symbol for symbol in self.symbols}
        self._lock = threading.Lock()
        self._delivered: dict[str, list[Kline]] = {}
        self._errors: dict[str, str | None] = dict.fromkeys(self.symbols)
        self._stats = StreamStats()
        self._reconnects: deque[Reconnect] = deque(maxlen=_HISTORY)
        self._backfills: deque[Backfill] = deque(maxlen=_HISTORY)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kline-backfill")
        self._backfill_queue: asyncio.Queue[str] | None = None
        self._queued: set[str] = set()

    # -- lifecycle (any thread) -----------------------------------------------------------

    def start(self) -> None:
        """Open the connections (in the background); a no-op when already started."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._main()), name="binance-kline-stream", daemon=True
        )
        self._thread.start()
        self._started.wait(timeout=10)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close the connections and the REST client; what was delivered stays drainable."""
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if loop is not None and stopping is not None:
            loop.call_soon_threadsafe(stopping.set)
        if thread is not None:
            thread.join(timeout=timeout_s)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # -- reads (any thread) ---------------------------------------------------------------

    def drain(self) -> dict[str, list[Kline]]:
        """Klines delivered since the last call, per symbol in open-time order."""
        with self._lock:
            delivered, self._delivered = self._delivered, {}
        return delivered

    def error(self, symbol: str) -> str | None:
        """Why `symbol` is not live now (connection down, backfill failing); None when it is."""
        with self._lock:
            return self._errors[symbol]

    def stats(self) -> StreamStats:
        """A snapshot of the counters, reconnects and backfills (the newest 10,000 of each)."""
        with self._lock:
            return replace(
                self._stats,
                duplicates=sum(s.duplicates for s in self._sequences.values()),
                reconnects=list(self._reconnects),
                backfills=list(self._backfills),
            )

    # -- the loop (stream thread) ---------------------------------------------------------

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._backfill_queue = asyncio.Queue()
        self._started.set()
        tasks = [
            asyncio.create_task(self._run_connection(index, symbols))
            for index, symbols in enumerate(self.connections)
        ]
        tasks.append(asyncio.create_task(self._backfill_worker()))
        await self._stopping.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _deliver(self, symbol: str, klines: list[Kline]) -> None:
        if not klines:
            return
        with self._lock:
            self._delivered.setdefault(symbol, []).extend(klines)
            self._stats.delivered += len(klines)

    def _set_error(self, symbols: Sequence[str], message: str | None) -> None:
        with self._lock:
            for symbol in symbols:
                self._errors[symbol] = message

    def _request_backfill(self, symbols: Sequence[str]) -> None:
        """Fetch what `symbols` missed from REST (after a reconnect, a gap, or while down)."""
        queue = self._backfill_queue
        assert queue is not None
        for symbol in symbols:
            self._sequences[symbol].requested = True
            if symbol not in self._queued:
                self._queued.add(symbol)
                queue.put_nowait(symbol)

    def _backoff(self, attempt: int) -> float:
        # Half the cap is always waited, so that a flapping server cannot draw a burst of
        # near-immediate reconnects against the 300 attempts per 5 minutes allowed per IP.
        cap = min(self.config.backoff_max_s, self.config.backoff_base_s * 2**attempt)
        return cap / 2 + self._rng.uniform(0.0, cap / 2)

    async def _run_connection(self, index: int, symbols: tuple[str, ...]) -> None:
        attempt = 0
        while True:
            session = _Session()
            task = asyncio.create_task(self._session(index, symbols, session))
            session, task = await self._rotate_until_lost(index, symbols, session, task)
            try:
                await task
                reason = "closed"
            except _CONNECTION_ERRORS as error:
                reason = f"{type(error).__name__}: {error}"
            except Exception as error:  # a bug must not end the symbols' live feed for good
                log.exception("kline stream connection %d failed", index)
                reason = f"{type(error).__name__}: {error}"
            if session.received_klines:
                attempt = 0
            delay = self._backoff(attempt)
            log.warning(
                "kline stream connection %d (%d symbols) lost: %s; reconnecting in %.2fs",
                index,
                len(symbols),
                reason,
                delay,
            )
            with self._lock:
                self._reconnects.append(Reconnect(index, attempt, delay, reason))
            self._set_error(symbols, f"stream disconnected ({reason}); reconnecting")
            # REST keeps the symbols current while the stream is down.
            self._request_backfill(symbols)
            attempt += 1
            await asyncio.sleep(delay)

    async def _rotate_until_lost(
        self,
        index: int,
        symbols: tuple[str, ...],
        session: _Session,
        task: asyncio.Task[None],
    ) -> tuple[_Session, asyncio.Task[None]]:
        """Replace the connection every `max_connection_age_s` seconds, make before break, until
        one is lost; returns that connection's session and its (finished) task.

        The replacement must be fully subscribed before the old connection is closed, so no
        minute depends on a REST backfill; a replacement that fails is retried after the
        reconnect backoff while the old connection keeps delivering.
        """
        wait_s = self.config.max_connection_age_s
        failures = 0
        while True:
            try:
                done, _ = await asyncio.wait({task}, timeout=wait_s)
            except asyncio.CancelledError:  # the stream stops: so does its connection
                task.cancel()
                raise
            if done:
                return session, task
            successor = _Session()
            successor_task = asyncio.create_task(self._session(index, symbols, successor))
            live = asyncio.create_task(successor.live.wait())
            try:
                await asyncio.wait(
                    {live, successor_task, task}, return_when=asyncio.FIRST_COMPLETED
                )
            except asyncio.CancelledError:
                for running in (live, successor_task, task):
                    running.cancel()
                raise
            live.cancel()
            if successor_task.done():  # the replacement failed: keep the old connection
                error = successor_task.exception() if not successor_task.cancelled() else None
                log.warning(
                    "kline stream connection %d: its replacement failed (%s); retrying",
                    index,
                    f"{type(error).__name__}: {error}" if error else "cancelled",
                )
                wait_s = self._backoff(failures)
                failures += 1
                continue
            # The replacement is live, or the old connection was lost first: either way the
            # replacement takes over (a lost old connection's minutes come from its backfill).
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                with self._lock:
                    self._stats.rotations += 1
                log.info("kline stream connection %d replaced before its age limit", index)
            elif not task.cancelled() and task.exception() is not None:
                log.warning("kline stream connection %d lost while being replaced", index)
            session, task = successor, successor_task
            wait_s, failures = self.config.max_connection_age_s, 0

    async def _session(self, index: int, symbols: tuple[str, ...], session: _Session) -> None:
        batches = chunks([stream_name(s) for s in symbols], self.config.streams_per_message)
        url = f"{self.config.url.rstrip('/')}/stream?streams={'/'.join(batches[0])}"
        # No client pings: the server pings every 20 s and `websockets` answers them; a silent
        # connection is caught by the stall timeout instead, and our pings would count against
        # the 5 messages per second.
        async with connect(
            url, open_timeout=self.config.open_timeout_s, ping_interval=None, close_timeout=1.0
        ) as ws:
            with self._lock:
                self._stats.connects += 1
            self._subscribed(batches[0])
            session.unanswered_batches = len(batches) - 1
            if session.unanswered_batches == 0:
                session.live.set()
            sender = asyncio.create_task(self._subscribe(ws, batches[1:], session))
            try:
                await self._receive(ws, session)
            finally:
                # The sender fails too when the connection is lost; its error is the receiver's.
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)

    def _subscribed(self, streams: list[str]) -> None:
        """The streams are live: backfill what their symbols missed until now."""
        symbols = [self._by_stream[name] for name in streams]
        self._set_error(symbols, None)
        self._request_backfill(symbols)

    async def _subscribe(
        self, ws: ClientConnection, batches: list[list[str]], session: _Session
    ) -> None:
        """SUBSCRIBE the remaining batches, one message per 1/(limit - 1) seconds."""
        interval = 1.0 / (self.config.max_messages_per_s - 1)
        loop = asyncio.get_running_loop()
        for number, batch in enumerate(batches, start=1):
            if number > 1:
                await asyncio.sleep(interval)
            session.awaiting[number] = (loop.time(), batch)
            request = {"method": "SUBSCRIBE", "params": batch, "id": number}
            await ws.send(json.dumps(request, separators=(",", ":")))

    async def _receive(self, ws: ClientConnection, session: _Session) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout(self.config.stall_timeout_s):
                    message = await ws.recv()
            except TimeoutError:
                raise StreamStalledError(
                    f"no message for {self.config.stall_timeout_s:g}s"
                ) from None
            self._handle(message, session)
            for sent_at, batch in session.awaiting.values():
                if loop.time() - sent_at > self.config.ack_timeout_s:
                    raise SubscribeError(f"SUBSCRIBE of {len(batch)} streams not answered")

    def _handle(self, message: str | bytes, session: _Session) -> None:
        try:
            event = parse_message(message)
        except MalformedMessageError as error:
            with self._lock:
                self._stats.malformed += 1
            log.warning("kline stream: dropped a malformed message: %s", error)
            return
        if isinstance(event, ControlReply):
            answered = session.awaiting.pop(event.id, None)
            if event.error is not None:
                raise SubscribeError(f"SUBSCRIBE {event.id} refused: {event.error}")
            if answered is not None:
                self._subscribed(answered[1])
                session.unanswered_batches -= 1
                if session.unanswered_batches == 0:
                    session.live.set()
            return
        if not event.closed:
            with self._lock:
                self._stats.open_updates += 1
            return
        sequence = self._sequences.get(event.symbol)
        if sequence is None:
            with self._lock:
                self._stats.malformed += 1
            log.warning("kline stream: a kline of %s, which is not subscribed", event.symbol)
            return
        session.received_klines = True
        self._deliver(event.symbol, sequence.offer(event.open_ms, event.kline))
        if sequence.requested and not sequence.in_flight:
            self._request_backfill([event.symbol])

    # -- REST backfill (stream thread, REST calls on the worker thread) -------------------

    async def _backfill_worker(self) -> None:
        queue = self._backfill_queue
        assert queue is not None
        loop = asyncio.get_running_loop()
        while True:
            symbol = await queue.get()
            self._queued.discard(symbol)
            sequence = self._sequences[symbol]
            if not sequence.requested:
                continue
            start, end = sequence.begin_backfill(
                newest_closed_open_ms(self._clock()), self._history_minutes
            )
            rows: list[tuple[int, Kline]] = []
            try:
                if start <= end:
                    rows = await loop.run_in_executor(
                        self._executor, self._fetch, symbol, start, end
                    )
            except _REST_ERRORS as error:
                message = f"{type(error).__name__}: {error}"
                log.warning("kline backfill %s failed, retrying: %s", symbol, message)
                with self._lock:
                    self._backfills.append(Backfill(symbol, start, end, 0, message))
                    self._errors[symbol] = f"REST backfill failed: {message}"
                self._deliver(symbol, sequence.backfill_failed(self._history_minutes))
                loop.call_later(self.config.backfill_retry_s, self._request_backfill, [symbol])
                continue
            with self._lock:
                self._backfills.append(Backfill(symbol, start, end, len(rows)))
                if (self._errors[symbol] or "").startswith("REST backfill failed"):
                    self._errors[symbol] = None
            self._deliver(symbol, sequence.finish_backfill(rows, start, end))
            if sequence.requested:
                self._request_backfill([symbol])

    def _fetch(self, symbol: str, start: int, end: int) -> list[tuple[int, Kline]]:
        """Every kline REST has in [start, end], page by page (on the worker thread).

        A row whose open time is not an integer minute is skipped (it has no place in the
        sequence); every other row is kept for the caller's validation.
        """
        rows: list[tuple[int, Kline]] = []
        cursor = start
        while cursor <= end:
            page, _ = self._client.klines(symbol, cursor, end)
            opens = [
                (row[0], row)
                for row in page
                if isinstance(row, list)
                and row
                and isinstance(row[0], int)
                and row[0] % ONE_MINUTE_MS == 0
            ]
            rows.extend(opens)
            if not opens or max(o for o, _ in opens) < cursor:
                break
            cursor = max(o for o, _ in opens) + ONE_MINUTE_MS
        return rows
