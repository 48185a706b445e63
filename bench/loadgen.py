"""Closed-loop HTTP/1.1 keep-alive load generator for loopback benchmarks.

    from bench.loadgen import run_load
    res = run_load("http://127.0.0.1:8000/signal/BTCUSDT", {"Authorization": "Bearer ..."},
                   concurrency=16, duration_s=8)

``concurrency`` keep-alive connections each send one GET, wait for the whole response and send
the next (closed loop, no pipelining). ``warmup_s`` of load is generated first and discarded.
The result counts completed responses in the measured window; ``errors`` counts non-2xx
responses plus transport errors (connect/read/write failures, and responses slower than
``timeout_s``, which are also left out of the latency percentiles). Only loopback targets are
accepted and every run is bounded in time (the generator process is killed
``warmup_s + duration_s + 30`` s after it starts at the latest).

Engines. The generator runs in its own process, never in the caller's, and on a 2-core machine
its CPU is taken from the server under test, so the cheapest accurate generator wins:

* ``wrk`` (C, epoll; Debian package ``wrk`` 4.1), driven through a generated Lua script: headers
  go on ``-H``, a ``response()`` hook counts non-2xx statuses per thread (wrk itself only counts
  status >= 400), and ``done()`` prints one JSON line with the exact per-request latency
  histogram percentiles (wrk records every request's latency in microseconds). One wrk thread is
  used: it saturates Python servers at a fraction of a core. wrk only takes whole seconds, so
  ``duration_s`` and ``warmup_s`` are rounded up to whole seconds (the reported rps uses the
  duration wrk measured). Selected by default when ``wrk`` is on PATH.
* ``asyncio``: a pure-Python fallback (raw asyncio streams on uvloop when available, one
  coroutine per connection, no httpx) in a child process. Same semantics, fractional durations.

Paced load (``paced_load``, asyncio engine): a fixed total request rate spread over the
connections (each sends its next request one interval after the previous one was sent, or at
once when that one took longer), cycling through several paths, and every request recorded as
a ``Sample`` (send time, latency, status; status 0 for a transport error or a timeout). Every
request sent within the window is counted, however late it ends, so that a fault injected during
the run cannot hide a failure behind the end of the window. For fault tests: the failures and the
tail latency of any part of the run are read from the samples.

Choice, measured here (2 cores, shared; the trivial FastAPI route of bench/serve_probe.py on
plain uvicorn; generator CPU from getrusage of the child, user + system, loopback syscalls
included): wrk costs 31-42 us of CPU per request, the asyncio engine 80-117 us (2.5-3x more),
and at 1 connection the asyncio engine's own per-request latency lowers the rps it can drive
(~0.7-0.8k vs ~1.2-1.6k rps in the same run). The Lua ``response()`` hook adds only 2-4 us per
request. So ``engine="auto"`` uses wrk whenever it is installed (``apt-get install -y wrk``)
and the asyncio engine only as a fallback. Run ``python bench/loadgen.py --help`` for a CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

Engine = Literal["auto", "wrk", "asyncio"]

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# Extra seconds a generator process may run beyond warm-up + duration before it is killed.
KILL_GRACE_S = 30.0
JSON_MARKER = "LOADGEN_JSON "

_WRK_LUA = """
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  non2xx = 0
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end

function done(summary, latency, requests)
  local non2xx_total = 0
  for _, t in ipairs(threads) do
    non2xx_total = non2xx_total + t:get("non2xx")
  end
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"non2xx":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\\n',
    "LOADGEN_JSON ", summary.requests, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, non2xx_total,
    latency:percentile(50.0), latency:percentile(99.0), latency.max))
end
"""


@dataclass(frozen=True)
class Sample:
    """One request of a paced load: when it was sent (seconds since the window opened), how
    long it took (seconds; until the transport error or the timeout when it failed), its path
    and its HTTP status (0: transport error or timeout)."""

    sent_s: float
    latency_s: float
    path: str
    status: int

    @property
    def ok(self) -> bool:
        return 200 <= self.status <= 299


@dataclass(frozen=True)
class LoadResult:
    """Outcome of one measured window (warm-up excluded). `samples` holds every request of a
    paced load (`paced_load`), in the order they ended, and `started_at` the epoch seconds at
    which its window opened (the samples' time origin); empty and 0.0 otherwise."""

    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    duration_s: float = 0.0
    engine: str = ""
    samples: tuple[Sample, ...] = ()
    started_at: float = 0.0


def _check_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are supported, got {url!r}")
    host = parts.hostname or ""
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"load targets must be loopback (127.0.0.1), got {host!r}")
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return host, port, path


def _pick_engine(engine: Engine) -> Literal["wrk", "asyncio"]:
    if engine == "auto":
        return "wrk" if shutil.which("wrk") else "asyncio"
    if engine == "wrk" and not shutil.which("wrk"):
        raise FileNotFoundError("wrk is not on PATH (apt-get install -y wrk)")
    return engine


def _run_bounded(cmd: list[str], limit_s: float) -> str:
    """Run ``cmd``, kill it after ``limit_s`` seconds, return stdout; raise on failure."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise TimeoutError(f"load generator exceeded {limit_s:.0f} s: {cmd[0]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {err.strip()[-2000:]}")
    return out


def _parse_marker(out: str) -> dict[str, Any]:
    for line in reversed(out.splitlines()):
        if line.startswith(JSON_MARKER):
            data: dict[str, Any] = json.loads(line[len(JSON_MARKER) :])
            return data
    raise RuntimeError(f"no result line in load generator output: {out[-2000:]!r}")


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds - 1e-9))


def _wrk_once(
    url: str,
    headers: dict[str, str],
    concurrency: int,
    seconds: int,
    threads: int,
    timeout_s: float,
    script: str,
) -> dict[str, float]:
    cmd = [
        "wrk",
        f"-t{max(1, min(threads, concurrency))}",
        f"-c{concurrency}",
        f"-d{seconds}s",
        f"--timeout={_whole_seconds(timeout_s)}s",
        "-s",
        script,
    ]
    for name, value in headers.items():
        if "\r" in name + value or "\n" in name + value:
            raise ValueError(f"header {name!r} contains a line break")
        cmd += ["-H", f"{name}: {value}"]
    cmd.append(url)
    return _parse_marker(_run_bounded(cmd, seconds + KILL_GRACE_S))


def _run_wrk(
    url: str,
    headers: dict[str, str],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    threads: int,
    timeout_s: float,
) -> LoadResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(_WRK_LUA)
        script = fh.name
    try:
        if warmup_s > 0:
            _wrk_once(
                url, headers, concurrency, _whole_seconds(warmup_s), threads, timeout_s, script
            )
        raw = _wrk_once(
            url, headers, concurrency, _whole_seconds(duration_s), threads, timeout_s, script
        )
    finally:
        os.unlink(script)
    seconds = raw["duration_us"] / 1e6
    requests = int(raw["requests"])
    # wrk's "status" errors (>= 400) are a subset of our non-2xx count: do not add both.
    errors = int(raw["connect"] + raw["read"] + raw["write"] + raw["timeout"] + raw["non2xx"])
    return LoadResult(
        requests=requests,
        errors=errors,
        rps=requests / seconds if seconds > 0 else 0.0,
        p50_ms=raw["p50_us"] / 1e3,
        p99_ms=raw["p99_us"] / 1e3,
        max_ms=raw["max_us"] / 1e3,
        duration_s=seconds,
        engine="wrk",
    )


# --- asyncio engine (runs in a child process: ``python loadgen.py --worker SPEC``) -------------


def _percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = math.ceil(pct / 100.0 * len(sorted_values))
    return sorted_values[min(len(sorted_values) - 1, max(0, rank - 1))]


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one HTTP/1.1 response; return (status, server_wants_close)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = -1
    chunked = False
    close = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"content-length":
            length = int(value)
        elif key == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif key == b"connection" and b"close" in value.lower():
            close = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length > 0:
        await reader.readexactly(length)
    elif length < 0 and status not in (204, 304) and status >= 200:
        await reader.read()  # body delimited by connection close
        close = True
    return status, close


TRANSPORT_ERROR = 0
"""The status recorded for a request that got no complete answer (connection refused or lost,
malformed response, timeout)."""


class _KeepAlive:
    """One keep-alive HTTP/1.1 connection, opened on first use and again after a response or an
    error that closed it."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def exchange(self, request: bytes) -> int:
        """Send `request` (raw bytes) and read the answer; its status, or TRANSPORT_ERROR."""
        try:
            if self._streams is None:
                self._streams = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), self.timeout_s
                )
            reader, writer = self._streams
            writer.write(request)
            status, close = await asyncio.wait_for(_read_response(reader), self.timeout_s)
        except (
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
            TimeoutError,
        ):
            status, close = TRANSPORT_ERROR, True
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
        self._streams = None


async def _connection_loop(
    host: str,
    port: int,
    request: bytes,
    measure_from: float,
    measure_to: float,
    timeout_s: float,
    latencies: list[float],
    counters: dict[str, int],
) -> None:
    clock = time.perf_counter  # uvloop's loop.time() only has millisecond resolution
    connection = _KeepAlive(host, port, timeout_s)
    while clock() < measure_to:
        start = clock()
        status = await connection.exchange(request)
        ok = status != TRANSPORT_ERROR
        end = clock()
        if start >= measure_from and end <= measure_to:
            if 200 <= status <= 299:
                latencies.append(end - start)
            else:
                counters["errors"] += 1
                if ok:  # a complete non-2xx response still counts as a request
                    latencies.append(end - start)
        if not ok:
            await asyncio.sleep(0.01)  # do not spin on a dead server
    connection.close()


async def _asyncio_main(spec: dict[str, object]) -> dict[str, float]:
    host, port, path = _check_url(str(spec["url"]))
    headers = spec["headers"]
    assert isinstance(headers, dict)
    concurrency = int(str(spec["concurrency"]))
    warmup_s = float(str(spec["warmup_s"]))
    duration_s = float(str(spec["duration_s"]))
    timeout_s = float(str(spec["timeout_s"]))
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    measure_from = time.perf_counter() + warmup_s
    measure_to = measure_from + duration_s
    latencies: list[float] = []
    counters = {"errors": 0}
    tasks = [
        asyncio.create_task(
            _connection_loop(
                host, port, request, measure_from, measure_to, timeout_s, latencies, counters
            )
        )
        for _ in range(concurrency)
    ]
    # Hard bound: connections stuck past the window are cancelled.
    _, pending = await asyncio.wait(tasks, timeout=warmup_s + duration_s + timeout_s + 1.0)
    for task in pending:
        task.cancel()
    latencies.sort()  # one entry per complete response, non-2xx included
    return {
        "requests": len(latencies),
        "errors": counters["errors"],
        "duration_s": duration_s,
        "p50_s": _percentile(latencies, 50.0),
        "p99_s": _percentile(latencies, 99.0),
        "max_s": latencies[-1] if latencies else 0.0,
    }


def _request_bytes(host: str, port: int, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _paced_connection_loop(
    host: str,
    port: int,
    requests: list[tuple[str, bytes]],
    first_send: float,
    interval_s: float,
    measure_to: float,
    timeout_s: float,
    opened: float,
    samples: list[list[object]],
) -> None:
    """One keep-alive connection sending `requests` in turn, one every `interval_s` seconds
    from `first_send` until `measure_to` (perf_counter seconds); records each as
    [sent, latency, path, status] with `sent` relative to `opened`."""
    clock = time.perf_counter
    connection = _KeepAlive(host, port, timeout_s)
    due = first_send
    turn = 0
    while due < measure_to:
        await asyncio.sleep(max(0.0, due - clock()))
        path, request = requests[turn % len(requests)]
        turn += 1
        start = clock()
        status = await connection.exchange(request)
        samples.append([start - opened, clock() - start, path, status])
        # The next request is due one interval after this one was sent; a late answer delays
        # it (no burst to catch up).
        due = max(due + interval_s, clock())
    connection.close()


async def _paced_main(spec: dict[str, object]) -> dict[str, object]:
    host, port, _ = _check_url(str(spec["url"]))
    headers = spec["headers"]
    paths = spec["paths"]
    assert isinstance(headers, dict) and isinstance(paths, list)
    concurrency = int(str(spec["concurrency"]))
    duration_s = float(str(spec["duration_s"]))
    timeout_s = float(str(spec["timeout_s"]))
    interval_s = concurrency / float(str(spec["rate_per_s"]))
    requests = [(str(path), _request_bytes(host, port, str(path), headers)) for path in paths]
    opened, opened_at = time.perf_counter(), time.time()
    measure_to = opened + duration_s
    samples: list[list[object]] = []
    tasks = [
        asyncio.create_task(
            _paced_connection_loop(
                host,
                port,
                # Each connection starts at another path, so every path is asked at the rate.
                requests[index % len(requests) :] + requests[: index % len(requests)],
                opened + interval_s * index / concurrency,
                interval_s,
                measure_to,
                timeout_s,
                opened,
                samples,
            )
        )
        for index in range(concurrency)
    ]
    _, pending = await asyncio.wait(tasks, timeout=duration_s + timeout_s + 1.0)
    for task in pending:
        task.cancel()
    return {"duration_s": duration_s, "samples": samples, "started_at": opened_at}


def _worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    main: Coroutine[Any, Any, Mapping[str, object]] = (
        _paced_main(spec) if spec.get("rate_per_s") else _asyncio_main(spec)
    )
    result: Mapping[str, object]
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(main)
    else:
        result = uvloop.run(main)
    sys.stdout.write(JSON_MARKER + json.dumps(result) + "\n")


def _run_asyncio(
    url: str,
    headers: dict[str, str],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    timeout_s: float,
) -> LoadResult:
    spec = {
        "url": url,
        "headers": headers,
        "concurrency": concurrency,
        "duration_s": duration_s,
        "warmup_s": max(0.0, warmup_s),
        "timeout_s": timeout_s,
    }
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    raw = _parse_marker(_run_bounded(cmd, warmup_s + duration_s + KILL_GRACE_S))
    return LoadResult(
        requests=int(raw["requests"]),
        errors=int(raw["errors"]),
        rps=raw["requests"] / raw["duration_s"],
        p50_ms=raw["p50_s"] * 1e3,
        p99_ms=raw["p99_s"] * 1e3,
        max_ms=raw["max_s"] * 1e3,
        duration_s=raw["duration_s"],
        engine="asyncio",
    )


def run_load(
    url: str,
    headers: dict[str, str],
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
    *,
    engine: Engine = "auto",
    threads: int = 1,
    timeout_s: float = 10.0,
) -> LoadResult:
    """Load ``url`` (loopback only) with ``concurrency`` keep-alive connections.

    ``threads`` applies to wrk only; ``timeout_s`` is the per-request limit after which a
    request counts as an error. Raises ValueError for non-loopback or non-http URLs,
    ConnectionError (OSError) when the target does not accept a TCP connection before the
    run starts, TimeoutError when the generator overruns its time bound; connection failures
    during the run are counted in ``errors``.
    """
    _check_url(url)
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if not 0 < duration_s <= 600:
        raise ValueError("duration_s must be in (0, 600]")
    if not 0 <= warmup_s <= 600:
        raise ValueError("warmup_s must be in [0, 600]")
    chosen = _pick_engine(engine)
    host, port, _ = _check_url(url)
    # Fail fast (ConnectionError) when nothing listens; wrk would refuse to start anyway.
    socket.create_connection((host, port), timeout=5).close()
    if chosen == "wrk":
        return _run_wrk(url, headers, concurrency, duration_s, warmup_s, threads, timeout_s)
    return _run_asyncio(url, headers, concurrency, duration_s, warmup_s, timeout_s)


def paced_load(
    base_url: str,
    paths: Sequence[str],
    headers: dict[str, str],
    rate_per_s: float,
    duration_s: float,
    *,
    concurrency: int = 4,
    timeout_s: float = 10.0,
) -> LoadResult:
    """GET `paths` of `base_url` (loopback only) in turn at `rate_per_s` requests per second in
    all, over `concurrency` keep-alive connections, for `duration_s` seconds, recording every
    request (`LoadResult.samples`; asyncio engine, in a child process).

    A connection sends its next request `concurrency / rate_per_s` seconds after its previous
    one, or at once when the answer came later, so the rate is met while answers take less than
    that. `errors` counts non-2xx answers and transport errors or timeouts (`timeout_s` per
    request) of every request sent within the window. Raises as `run_load` does.
    """
    host, port, _ = _check_url(base_url)
    if not paths:
        raise ValueError("paths must name at least one path")
    if concurrency < 1 or rate_per_s <= 0:
        raise ValueError("concurrency must be >= 1 and rate_per_s positive")
    if not 0 < duration_s <= 600:
        raise ValueError("duration_s must be in (0, 600]")
    socket.create_connection((host, port), timeout=5).close()
    spec = {
        "url": base_url,
        "paths": list(paths),
        "headers": headers,
        "concurrency": concurrency,
        "rate_per_s": rate_per_s,
        "duration_s": duration_s,
        "timeout_s": timeout_s,
    }
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    raw = _parse_marker(_run_bounded(cmd, duration_s + timeout_s + KILL_GRACE_S))
    records = raw["samples"]
    samples = tuple(Sample(float(s), float(t), str(p), int(c)) for s, t, p, c in records)
    latencies = sorted(sample.latency_s for sample in samples)
    return LoadResult(
        requests=len(samples),
        errors=sum(not sample.ok for sample in samples),
        rps=len(samples) / duration_s,
        p50_ms=_percentile(latencies, 50.0) * 1e3,
        p99_ms=_percentile(latencies, 99.0) * 1e3,
        max_ms=(latencies[-1] if latencies else 0.0) * 1e3,
        duration_s=duration_s,
        engine="asyncio",
        samples=samples,
        started_at=float(raw["started_at"]),
    )


def latency_percentile_ms(samples: Sequence[Sample], pct: float) -> float:
    """The nearest-rank `pct` percentile of the samples' latencies, in milliseconds (0.0 when
    there are none); failed requests count with the time they took to fail."""
    return _percentile(sorted(sample.latency_s for sample in samples), pct) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else "")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("url", nargs="?")
    parser.add_argument("-c", "--concurrency", type=int, default=16)
    parser.add_argument("-d", "--duration", type=float, default=8.0)
    parser.add_argument("-w", "--warmup", type=float, default=1.0)
    parser.add_argument("-H", "--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--engine", choices=["auto", "wrk", "asyncio"], default="auto")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return
    if not args.url:
        parser.error("url is required")
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    result = run_load(
        args.url, headers, args.concurrency, args.duration, args.warmup, engine=args.engine
    )
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
