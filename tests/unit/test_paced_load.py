"""`bench.loadgen.paced_load` against a real HTTP server on loopback: the rate it keeps, the paths
it cycles through, and every request recorded, failures included."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.loadgen import latency_percentile_ms, paced_load


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        status = 500 if self.path.startswith("/fail") else 200
        body = b"{}"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_paced_load_keeps_its_rate_cycles_paths_and_records_every_failure(server: str) -> None:
    result = paced_load(
        server, ["/ok?symbol=A", "/ok?symbol=B", "/fail"], {}, 60.0, 1.5, concurrency=3
    )
    # 60 req/s for 1.5 s: 90 requests, a few fewer when the child starts slowly.
    assert 80 <= result.requests <= 92, result.requests
    by_path = Counter(sample.path for sample in result.samples)
    assert set(by_path) == {"/ok?symbol=A", "/ok?symbol=B", "/fail"}
    assert max(by_path.values()) - min(by_path.values()) <= 3, by_path
    assert result.errors == by_path["/fail"]
    assert {s.status for s in result.samples if s.path == "/fail"} == {500}
    sent = sorted(sample.sent_s for sample in result.samples)
    assert sent[0] < 0.1 and sent[-1] < 1.5
    assert abs(result.started_at - time.time()) < 10
    assert 0 < latency_percentile_ms(result.samples, 50) <= result.max_ms


def test_refused_connections_are_failed_samples() -> None:
    """Requests to a port that stops accepting after the start-up check fail as status 0
    instead of vanishing."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def accept_the_check_then_close() -> None:
            connection, _ = listener.accept()
            connection.close()
            listener.close()

        thread = threading.Thread(target=accept_the_check_then_close)
        thread.start()
        result = paced_load(f"http://127.0.0.1:{port}", ["/x"], {}, 20.0, 0.5, concurrency=1)
        thread.join()
    assert result.requests >= 5
    assert result.errors == result.requests
    assert {sample.status for sample in result.samples} == {0}
