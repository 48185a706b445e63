"""The tests' S3-compatible store: SeaweedFS on loopback, on ports of its own."""

from __future__ import annotations

import psutil
import pytest

from tests.object_store import ObjectStore

pytestmark = pytest.mark.integration


def test_the_test_store_serves_s3_on_loopback_only(
    object_store: ObjectStore, object_prefix: str
) -> None:
    filesystem = object_store.filesystem()
    key = f"{object_store.bucket}/{object_prefix}/hello.txt"
    with filesystem.open_output_stream(key) as stream:
        stream.write(b"hello")
    with filesystem.open_input_stream(key) as stream:
        assert stream.read() == b"hello"

    listening = [
        c.laddr
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.pid == object_store.pid
    ]
    assert listening, "the server's listening sockets"
    assert {address.ip for address in listening} == {"127.0.0.1"}
    assert 8333 not in {address.port for address in listening}, "no fixed well-known port"
