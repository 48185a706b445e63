"""POST /token under abuse: per-address throttling of failed attempts, no lockout of a client by
someone else's failures, a bound on concurrent secret checks, unknown ids answered like wrong
secrets, and request metrics whose method label clients cannot grow."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from configs.schema import AuthConfig, GoldConfig, JwtConfig, ServeConfig
from serve.api import clients as clients_module
from serve.api.auth import TokenService
from serve.api.clients import ClientEntry, ClientStore, hash_secret
from serve.api.metrics import ApiMetrics
from serve.api.ratelimit import ClientAddress, ConcurrencyLimit, RateLimiter
from serve.api.routes import make_api
from serve.ingress_env import ingress_env
from tests.serve_support import NoEngine

CLIENT_ID = "desk"
CLIENT_SECRET = "the-right-secret-" + "s" * 30
ADDRESS_A = ("203.0.113.7", 40000)
ADDRESS_B = ("198.51.100.9", 40001)


@pytest.fixture(scope="module")
def store() -> ClientStore:
    entry = ClientEntry(
        client_id=CLIENT_ID, secret_hash=hash_secret(CLIENT_SECRET), scopes=["signals:read"]
    )
    return ClientStore([entry])


def config_for(tmp_path: Path, **auth: Any) -> ServeConfig:
    return ServeConfig(
        registry=str(tmp_path / "registry"),
        auth=AuthConfig(
            jwt=JwtConfig(secret_env="QUANT_AI_UNSET_FOR_TESTS"),
            clients_file=str(tmp_path / "clients.yaml"),
            **auth,
        ),
        gold=GoldConfig(url=f"sqlite:///{tmp_path / 'gold.sqlite'}"),
    )


def api_for(config: ServeConfig, store: ClientStore, metrics: ApiMetrics | None = None) -> FastAPI:
    tokens = TokenService(config.auth.jwt, secret="abuse-secret-" + "x" * 40)
    return make_api(NoEngine(), config, tokens, store, metrics=metrics)


def form(client_id: str, secret: str) -> dict[str, str]:
    return {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}


def test_rotating_client_ids_from_one_address_is_throttled(
    tmp_path: Path, store: ClientStore
) -> None:
    config = config_for(
        tmp_path,
        token_rate_limit_per_minute_per_address=1.0,
        token_rate_limit_burst_per_address=3,
    )
    api = api_for(config, store)
    caller = TestClient(api, client=ADDRESS_A)
    statuses = [caller.post("/token", data=form(f"id-{n}", "nope")).status_code for n in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    limited = caller.post("/token", data=form("guess-9", "nope"))
    assert limited.json()["error"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1
    # The limit is the address's: another caller is still heard.
    other = TestClient(api, client=ADDRESS_B)
    assert other.post("/token", data=form("guess-10", "nope")).status_code == 401


def test_wrong_secrets_from_one_address_do_not_lock_out_the_client(
    tmp_path: Path, store: ClientStore
) -> None:
    # The per-client limit of bearer-token requests is as small as the per-address one: a
    # /token limit keyed by the client id would lock the client out after three failures.
    config = config_for(
        tmp_path,
        rate_limit_per_minute=1.0,
        rate_limit_burst=3,
        token_rate_limit_per_minute_per_address=1.0,
        token_rate_limit_burst_per_address=3,
    )
    api = api_for(config, store)
    attacker = TestClient(api, client=ADDRESS_A)
    flood = [attacker.post("/token", data=form(CLIENT_ID, "wrong")).status_code for _ in range(6)]
    assert flood == [401, 401, 401, 429, 429, 429]
    owner = TestClient(api, client=ADDRESS_B)
    # Successful attempts are not counted: the owner is never throttled by its own logins.
    for _ in range(5):
        granted = owner.post("/token", data=form(CLIENT_ID, CLIENT_SECRET))
        assert granted.status_code == 200, granted.json()
        assert granted.json()["token_type"] == "bearer"


class BlockingStore(ClientStore):
    """Checks secrets only once `release` is set, counting the checks under way."""

    def __init__(self, inner: ClientStore) -> None:
        super().__init__()
        self._inner = inner
        self.release = threading.Event()
        self.started = 0
        self._lock = threading.Lock()

    def authenticate(self, client_id: str, secret: str) -> ClientEntry:
        with self._lock:
            self.started += 1
        self.release.wait(timeout=30)
        return self._inner.authenticate(client_id, secret)


def test_concurrent_verifications_beyond_the_bound_are_refused_at_once(
    tmp_path: Path, store: ClientStore
) -> None:
    config = config_for(tmp_path, token_max_concurrent_verifications=2)
    blocking = BlockingStore(store)
    api = api_for(config, blocking)

    async def scenario() -> tuple[httpx.Response, float, list[httpx.Response]]:
        transport = httpx.ASGITransport(app=api, client=ADDRESS_A)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            held = [
                asyncio.create_task(http.post("/token", data=form(CLIENT_ID, CLIENT_SECRET)))
                for _ in range(2)
            ]
            try:
                deadline = time.monotonic() + 10
                while blocking.started < 2 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                assert blocking.started == 2
                started = time.perf_counter()
                excess = await asyncio.wait_for(
                    http.post("/token", data=form(CLIENT_ID, CLIENT_SECRET)), timeout=5
                )
                elapsed = time.perf_counter() - started
            finally:
                blocking.release.set()
            return excess, elapsed, list(await asyncio.gather(*held))

    excess, elapsed, held = asyncio.run(scenario())
    assert excess.status_code == 429 and excess.json()["error"] == "rate_limited"
    assert excess.headers["Retry-After"] == "1"
    assert elapsed < 1.0
    assert blocking.started == 2  # the refused request checked nothing
    assert [r.status_code for r in held] == [200, 200]
    # The slots come back: the next request is served.
    client = TestClient(api, client=ADDRESS_A)
    assert client.post("/token", data=form(CLIENT_ID, CLIENT_SECRET)).status_code == 200


def test_unknown_id_and_wrong_secret_answer_identically(
    tmp_path: Path, store: ClientStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[tuple[int, int, int, int]] = []
    real_scrypt = clients_module._scrypt

    def counting(secret: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
        hashed.append((n, r, p, dklen))
        return real_scrypt(secret, salt, n, r, p, dklen)

    monkeypatch.setattr(clients_module, "_scrypt", counting)
    api = api_for(config_for(tmp_path), store)
    caller = TestClient(api, client=ADDRESS_A)
    unknown = caller.post("/token", data=form("nobody", "nope"))
    unknown_work = list(hashed)
    hashed.clear()
    wrong = caller.post("/token", data=form(CLIENT_ID, "nope"))
    assert unknown.status_code == wrong.status_code == 401
    assert unknown.json() == wrong.json()
    assert unknown.json()["error"] == "invalid_client"
    assert unknown.headers["WWW-Authenticate"] == wrong.headers["WWW-Authenticate"]
    # The same work, even for the first unknown id a replica sees: one scrypt of one cost.
    assert unknown_work == hashed == [(2**14, 8, 1, 32)]


def test_nonstandard_methods_share_one_metrics_label(tmp_path: Path, store: ClientStore) -> None:
    metrics = ApiMetrics(NoEngine().snapshot, time.time)
    client = TestClient(api_for(config_for(tmp_path), store, metrics))
    for method in ("PROPFIND", "MKCOL", "PURGE", "LOCK", "COPY", "SEARCH"):
        client.request(method, "/healthz")
    assert client.get("/healthz").status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    samples = families["quant_ai_http_requests"].samples
    methods = {s.labels["method"] for s in samples if s.labels["route"] == "/healthz"}
    assert methods == {"GET", "other"}
    other = [s.value for s in samples if s.labels["method"] == "other"]
    assert sum(other) == 6


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("203.0.113.7", [], [], "203.0.113.7"),
        # Without trusted proxies the header is ignored: any caller can write it.
        ("203.0.113.7", ["1.2.3.4"], [], "203.0.113.7"),
        ("127.0.0.1", ["1.2.3.4"], [], "127.0.0.1"),
        # A peer that is not a trusted proxy is the caller, whatever it forwards.
        ("203.0.113.7", ["1.2.3.4"], ["127.0.0.1"], "203.0.113.7"),
        ("127.0.0.1", ["1.2.3.4"], ["127.0.0.1"], "1.2.3.4"),
        # Entries the caller wrote (left of the trusted proxies' own) are not believed.
        ("127.0.0.1", ["6.6.6.6, 1.2.3.4"], ["127.0.0.1"], "1.2.3.4"),
        ("127.0.0.1", ["6.6.6.6", "10.0.0.5, 1.2.3.4"], ["127.0.0.1"], "1.2.3.4"),
        ("127.0.0.1", ["6.6.6.6, 1.2.3.4, 10.0.0.5"], ["127.0.0.1", "10.0.0.0/8"], "1.2.3.4"),
        # Only trusted hops: the leftmost one is the caller.
        ("127.0.0.1", ["10.0.0.5"], ["127.0.0.1", "10.0.0.0/8"], "10.0.0.5"),
        # A trusted proxy that forwarded nothing (or garbage) is itself the caller.
        ("127.0.0.1", [], ["127.0.0.1"], "127.0.0.1"),
        ("127.0.0.1", ["6.6.6.6, not-an-ip"], ["127.0.0.1"], "127.0.0.1"),
        ("::1", ["2001:db8::1"], ["::1"], "2001:db8::1"),
        (None, ["1.2.3.4"], ["127.0.0.1"], "unknown"),
    ],
)
def test_client_address(
    peer: str | None, forwarded: list[str], trusted: list[str], expected: str
) -> None:
    assert ClientAddress(trusted).resolve(peer, forwarded) == expected


def test_forwarded_for_is_honoured_only_from_a_trusted_proxy(
    tmp_path: Path, store: ClientStore
) -> None:
    config = config_for(
        tmp_path,
        token_rate_limit_per_minute_per_address=1.0,
        token_rate_limit_burst_per_address=1,
        trusted_proxies=["127.0.0.1"],
    )
    api = api_for(config, store)
    proxy = TestClient(api, client=("127.0.0.1", 50000))
    spoofer = TestClient(api, client=ADDRESS_A)

    def attempt(client: TestClient, forwarded: str) -> int:
        headers = {"X-Forwarded-For": forwarded}
        return client.post("/token", data=form("x", "y"), headers=headers).status_code

    # Through the trusted proxy, two callers have a limit each.
    assert [attempt(proxy, "1.1.1.1"), attempt(proxy, "1.1.1.1")] == [401, 429]
    assert attempt(proxy, "2.2.2.2") == 401
    # A direct caller cannot pick a fresh address with the header.
    assert [attempt(spoofer, "3.3.3.3"), attempt(spoofer, "4.4.4.4")] == [401, 429]


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    assert AuthConfig(trusted_proxies=["127.0.0.1", "10.0.0.0/8", "::1"]).trusted_proxies
    with pytest.raises(ValidationError, match="not an IP address"):
        AuthConfig(trusted_proxies=["haproxy.local"])


def test_serve_http_servers_do_not_rewrite_the_client_from_forwarded_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Serve's HTTP servers are uvicorn with its defaults, which trust X-Forwarded-For from
    loopback peers: where Serve's HAProxy connects from, passing a client's header through."""
    env = ingress_env("proxy")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = uvicorn.Config(FastAPI())
    config.load()
    assert config.forwarded_allow_ips == ""
    assert "127.0.0.1" not in uvicorn.middleware.proxy_headers._TrustedHosts(
        config.forwarded_allow_ips
    )


def test_rate_limiter_refund_gives_back_one_request() -> None:
    now = [0.0]
    limiter = RateLimiter(rate_per_minute=1.0, burst=2, clock=lambda: now[0])
    assert limiter.check("k") is None and limiter.check("k") is None
    assert limiter.check("k") is not None
    limiter.refund("k")
    assert limiter.check("k") is None
    # Never beyond the burst.
    limiter.refund("k")
    limiter.refund("k")
    limiter.refund("k")
    assert [limiter.check("k") is None for _ in range(3)] == [True, True, False]


def test_concurrency_limit() -> None:
    limit = ConcurrencyLimit(2)
    assert limit.try_acquire() and limit.try_acquire()
    assert not limit.try_acquire()
    limit.release()
    assert limit.try_acquire()
    with pytest.raises(ValueError):
        ConcurrencyLimit(0)
