"""The tests' S3-compatible store (SeaweedFS on loopback, on ports of its own), and the model
registry on it."""

from __future__ import annotations

import psutil
import pytest

from models.registry import PRODUCTION, ModelRegistry, RegistryError
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


def test_the_registry_registers_and_promotes_on_the_store_named_by_the_environment(
    object_store: ObjectStore, object_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in object_store.environment.items():
        monkeypatch.setenv(name, value)
    registry = ModelRegistry(object_store.uri(object_prefix))
    first = registry.register("signal", {"weights.pt": b"w1"}, {"git_commit": "0" * 40})
    second = registry.register("signal", {"weights.pt": b"w2"}, {"git_commit": "0" * 40})
    registry.set_alias("signal", PRODUCTION, second, reason="test")
    assert (first, second) == ("v0001", "v0002")
    assert registry.get_alias("signal", PRODUCTION) == second
    reopened = ModelRegistry(object_store.uri(object_prefix))
    assert reopened.read_file("signal", second, "weights.pt") == b"w2"


def test_a_registry_on_a_missing_bucket_is_refused_at_once(
    object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in object_store.environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RegistryError, match="bucket 'no-such-bucket' does not exist"):
        ModelRegistry("s3://no-such-bucket/registry")
