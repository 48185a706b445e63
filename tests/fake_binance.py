"""A real local HTTP server that speaks Binance's klines REST endpoint, with fault injection.

`GET /api/v3/klines?symbol=&interval=1m&startTime=&endTime=&limit=` answers like Binance: a JSON
array of at most `limit` klines (default 500, at most 1000) whose open time lies in
[startTime, endTime], sorted by open time, each a 12-element array whose decimals are strings::

    [open_time, "open", "high", "low", "close", "volume", close_time, "quote_volume", trades,
     "taker_buy_base", "taker_buy_quote", "0"]

The rows come from Binance dump CSV lines (see `load_dump_lines`): the same lines for every
symbol of `symbols`, or each symbol's own lines when `lines` maps symbols to lines (`symbols` is
then the mapping's keys; `klines` and `open_times` are the first symbol's). An unknown symbol gets
HTTP 400 with `{"code":-1121,"msg":"Invalid symbol."}`. Every answer carries
`X-MBX-USED-WEIGHT-1M`, the weight used in the current minute of the server's clock (2 per klines
request).

Faults are scripted per server: each klines request takes the next entry of `faults` (None means
a healthy answer); once the script is spent, `then` applies to every further request. Every
request is recorded (`requests`) with the fault applied, for assertions.

    with FakeBinance(rows, faults=[Fault.rate_limited(7), None, Fault.drop()]) as server:
        client = BinanceClient(BinanceConfig(base_url=server.url), sleep=...)
"""

from __future__ import annotations

import bisect
import contextlib
import gzip
import itertools
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

KLINES_PATH = "/api/v3/klines"
KLINES_WEIGHT = 2
DEFAULT_LIMIT = 500
MAX_LIMIT = 1000

# Integer columns of a kline; every other column is a decimal sent as a string.
_INT_COLUMNS = frozenset({0, 6, 8})

Kline = list[Any]


def load_dump_lines(path: str | Path, count: int | None = None) -> list[str]:
    """The first `count` lines (all when None) of a Binance dump CSV, plain or gzipped."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        lines = (line.strip() for line in handle)
        selected = lines if count is None else itertools.islice(lines, count)
        return [line for line in selected if line and line[0].isdigit()]


def kline_from_csv(line: str) -> Kline:
    """The REST form of one dump CSV line: ints for times and trade count, strings otherwise."""
    fields = line.split(",")
    if len(fields) != 12:
        raise ValueError(f"expected 12 columns, got {len(fields)}: {line!r}")
    return [int(v) if i in _INT_COLUMNS else v for i, v in enumerate(fields)]


def _series(lines: Iterable[str]) -> tuple[list[Kline], list[int]]:
    """Klines of dump lines sorted by open time, and their open times."""
    klines = sorted((kline_from_csv(line) for line in lines), key=lambda k: int(k[0]))
    return klines, [int(k[0]) for k in klines]


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour applied to one klines request.

    kinds: `http` (answer `status`, with `Retry-After` when `retry_after` is set), `short` (a
    page of `rows` rows, default limit // 3), `dup_previous` (the last `rows` rows of the previous
    page first, then the page cut to the limit), `dup_inside` (the row at `index` twice, cut to
    the limit), `drop` (close the socket: after headers and half the body when `partial`, else
    without answering), `truncated_json` (a 200 whose body is cut, with a matching length),
    `used_weight` (a healthy page, but the server's minute count jumps to `weight` first).
    """

    kind: str
    status: int = 200
    retry_after: float | None = None
    rows: int | None = None
    index: int = 1
    partial: bool = True
    weight: int = 0

    @classmethod
    def http(cls, status: int, retry_after: float | None = None) -> Fault:
        return cls("http", status=status, retry_after=retry_after)

    @classmethod
    def rate_limited(cls, retry_after: float, status: int = 429) -> Fault:
        return cls("http", status=status, retry_after=retry_after)

    @classmethod
    def short(cls, rows: int | None = None) -> Fault:
        return cls("short", rows=rows)

    @classmethod
    def dup_previous(cls, rows: int = 1) -> Fault:
        return cls("dup_previous", rows=rows)

    @classmethod
    def dup_inside(cls, index: int = 1) -> Fault:
        return cls("dup_inside", index=index)

    @classmethod
    def drop(cls, partial: bool = True) -> Fault:
        return cls("drop", partial=partial)

    @classmethod
    def truncated_json(cls) -> Fault:
        return cls("truncated_json")

    @classmethod
    def used_weight(cls, weight: int) -> Fault:
        return cls("used_weight", weight=weight)

    def describe(self) -> str:
        if self.kind == "http":
            after = "" if self.retry_after is None else f" retry-after={self.retry_after:g}"
            return f"http {self.status}{after}"
        return self.kind


@dataclass
class RecordedRequest:
    """One request the server received and what it did with it."""

    path: str
    params: dict[str, str]
    fault: Fault | None
    status: int | None  # None when the connection was dropped before a status line
    rows: int = 0
    open_times: list[int] = field(default_factory=list)
    weight_header: int | None = None

    @property
    def start_time(self) -> int | None:
        value = self.params.get("startTime")
        return int(value) if value is not None else None

    @property
    def end_time(self) -> int | None:
        value = self.params.get("endTime")
        return int(value) if value is not None else None


class _DroppedError(Exception):
    """The handler is to close the connection without a complete answer."""

    def __init__(self, partial: bool) -> None:
        super().__init__("connection dropped")
        self.partial = partial


def _error(code: int, msg: str) -> bytes:
    return json.dumps({"code": code, "msg": msg}, separators=(",", ":")).encode()


_INTERNAL = _error(-1001, "Internal error; unable to process your request. Please try again.")
_HTTP_ERRORS = {
    429: _error(-1003, "Too many requests; current limit is 6000 request weight per 1 MINUTE."),
    418: _error(-1003, "Way too many requests; IP banned until later."),
}


class FakeBinance:
    """A threaded HTTP server on 127.0.0.1 (a free port) serving klines of `symbols`."""

    def __init__(
        self,
        lines: Iterable[str] | Mapping[str, Iterable[str]],
        *,
        symbols: Sequence[str] = ("BTCUSDT",),
        faults: Iterable[Fault | None] = (),
        then: Fault | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(lines, Mapping):
            by_symbol = {symbol: _series(series) for symbol, series in lines.items()}
        else:
            shared = _series(lines)
            by_symbol = dict.fromkeys(symbols, shared)
        self._by_symbol: dict[str, tuple[list[Kline], list[int]]] = by_symbol
        self.klines, self.open_times = next(iter(by_symbol.values()))
        self.symbols = frozenset(by_symbol)
        self.clock = clock
        self.requests: list[RecordedRequest] = []
        self._faults: deque[Fault | None] = deque(faults)
        self._then = then
        self._lock = threading.Lock()
        self._previous_page: list[Kline] = []
        self._weight_minute = int(clock() // 60)
        self._weight_used = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("server not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeBinance:
        handler = type("Handler", (_Handler,), {"fake": self})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server, self._thread = None, None

    def __enter__(self) -> FakeBinance:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- scripting and inspection -------------------------------------------------------------

    def inject(self, *faults: Fault | None) -> None:
        """Append faults to the script (None: one healthy answer)."""
        with self._lock:
            self._faults.extend(faults)

    def set_then(self, fault: Fault | None) -> None:
        """The fault applied once the script is spent (None: healthy)."""
        with self._lock:
            self._then = fault

    @property
    def klines_requests(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path == KLINES_PATH]

    @property
    def weight_used(self) -> int:
        with self._lock:
            self._roll_weight()
            return self._weight_used

    def open_times_between(self, start_ms: int, end_ms: int) -> list[int]:
        """Open times of the served klines in [start_ms, end_ms]."""
        lo = bisect.bisect_left(self.open_times, start_ms)
        hi = bisect.bisect_right(self.open_times, end_ms)
        return self.open_times[lo:hi]

    # -- request handling (called from handler threads) ---------------------------------------

    def _roll_weight(self) -> None:
        minute = int(self.clock() // 60)
        if minute != self._weight_minute:
            self._weight_minute, self._weight_used = minute, 0

    def _next_fault(self) -> Fault | None:
        return self._faults.popleft() if self._faults else self._then

    def _select(self, params: dict[str, str]) -> tuple[int, bytes, list[Kline]]:
        """Status, body and rows of a healthy answer to a klines request."""
        symbol = params.get("symbol", "")
        if not symbol:
            return (
                400,
                _error(
                    -1102,
                    "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.",
                ),
                [],
            )
        if symbol not in self.symbols:
            return 400, _error(-1121, "Invalid symbol."), []
        klines, open_times = self._by_symbol[symbol]
        if params.get("interval") != "1m":
            return 400, _error(-1120, "Invalid interval."), []
        try:
            limit = int(params.get("limit", DEFAULT_LIMIT))
            start = int(params["startTime"]) if "startTime" in params else None
            end = int(params["endTime"]) if "endTime" in params else None
        except ValueError:
            return 400, _error(-1100, "Illegal characters found in a parameter."), []
        if limit < 1:
            return 400, _error(-1130, "Data sent for parameter 'limit' is not valid."), []
        limit = min(limit, MAX_LIMIT)
        lo = 0 if start is None else bisect.bisect_left(open_times, start)
        hi = len(open_times) if end is None else bisect.bisect_right(open_times, end)
        # With no startTime Binance answers the most recent klines up to endTime.
        if start is None:
            lo = max(lo, hi - limit)
        return 200, b"", klines[lo : min(hi, lo + limit)]

    def handle(self, handler: _Handler) -> None:
        parts = urlsplit(handler.path)
        params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        headers: dict[str, str] = {}
        with self._lock:
            self._roll_weight()
            is_klines = parts.path == KLINES_PATH
            if is_klines:
                self._weight_used += KLINES_WEIGHT
            fault = self._next_fault() if is_klines else None
            if fault is not None and fault.kind == "used_weight":
                self._weight_used = max(self._weight_used, fault.weight)
            headers["X-MBX-USED-WEIGHT-1M"] = str(self._weight_used)
            record = RecordedRequest(
                parts.path, params, fault, status=None, weight_header=self._weight_used
            )
            self.requests.append(record)
            if fault is not None and fault.kind == "drop":
                raise _DroppedError(fault.partial)
            if not is_klines:
                status, body = 404, _error(-1000, "Unknown path.")
            elif fault is not None and fault.kind == "http":
                status, body = fault.status, _HTTP_ERRORS.get(fault.status, _INTERNAL)
                if fault.retry_after is not None:
                    headers["Retry-After"] = f"{fault.retry_after:g}"
            else:
                status, body, rows = self._select(params)
                if status == 200:
                    rows = self._apply(fault, rows, params)
                    self._previous_page = rows
                    record.rows = len(rows)
                    record.open_times = [int(r[0]) for r in rows]
                    body = json.dumps(rows, separators=(",", ":")).encode()
                    if fault is not None and fault.kind == "truncated_json":
                        body = body[: max(1, len(body) // 2)]
            record.status = status
        handler.send_body(status, body, headers)

    def _apply(self, fault: Fault | None, rows: list[Kline], params: dict[str, str]) -> list[Kline]:
        if fault is None or not rows:
            return rows
        limit = min(int(params.get("limit", DEFAULT_LIMIT)), MAX_LIMIT)
        if fault.kind == "short":
            keep = fault.rows if fault.rows is not None else max(1, limit // 3)
            return rows[: max(1, keep)]
        if fault.kind == "dup_previous":
            previous = self._previous_page[-(fault.rows or 1) :] if self._previous_page else []
            return (previous + rows)[:limit] if previous else rows
        if fault.kind == "dup_inside":
            index = min(fault.index, len(rows) - 1)
            return (rows[: index + 1] + rows[index:])[:limit]
        return rows


class _Handler(BaseHTTPRequestHandler):
    fake: FakeBinance
    protocol_version = "HTTP/1.1"
    timeout = 10
    server_version = "FakeBinance/1.0"

    def do_GET(self) -> None:
        try:
            self.fake.handle(self)
        except _DroppedError as dropped:
            self._drop(dropped.partial)

    def _drop(self, partial: bool) -> None:
        """Close the socket: after the headers and half the promised body, or at once."""
        if partial:
            body = b'[[1701388800000,"37723.97000000","37744.72000000"'
            self.send_response(200)
            self.send_header("Content-Type", "application/json;charset=UTF-8")
            self.send_header("Content-Length", str(len(body) * 2))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def send_body(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output free of one access-log line per request."""
