"""The signal API as a real Ray Serve application, called over HTTP.

One application is deployed for the module (local Ray, Serve's HTTP proxy on a free loopback
port): a simulator replay at 4 bars per second, a registry holding an untrained GRU as
`production`, a SQLite Gold store shared by two engine shards (one symbol each, so every route
reads a snapshot merged from both), HS256 tokens, two ingress replicas each with its operator port
in a free loopback range. Tests call every route and every error of DESIGN.md §5, swap the
production model under concurrent load (every shard follows), kill an ingress replica and an
engine shard under load, and scrape each replica's operator `/metrics` with prometheus_client's
parser. When Serve shuts down at the end,
the operator ports must close and the target files go (checked in the fixture's teardown).
"""

from __future__ import annotations

import base64
import itertools
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families

from configs.schema import (
    AuthConfig,
    EngineShardsConfig,
    FeedConfig,
    GoldConfig,
    JwtConfig,
    OperatorConfig,
    PredictConfig,
    RayConfig,
    ServeConfig,
    SimConfig,
)
from market.sim_silver import simulated_bars
from models.registry import ModelRegistry
from serve.api.clients import ClientStore
from serve.api.metrics import METRIC_NAMES
from serve.engine.shards import ShardPlan
from serve.operator import read_targets
from tests.serve_support import MODEL_NAME, free_range, register_model

pytestmark = pytest.mark.integration

SECRET = "test-secret-" + "x" * 40
AUDIENCE = "quant-ai"
ISSUER = "quant-ai"
SYMBOLS = ["SIMAAA", "SIMBBB"]
SIGNAL_FIELDS = {
    "symbol",
    "signal",
    "confidence",
    "p_up",
    "predicted_return",
    "predicted_close",
    "horizon_minutes",
    "as_of",
    "model_version",
    "feature_spec_hash",
    "reason",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def token(
    scope: str = "signals:read signals:predict",
    *,
    secret: str = SECRET,
    lifetime_s: int = 300,
    issued_offset_s: int = 0,
    audience: str = AUDIENCE,
    drop: tuple[str, ...] = (),
    algorithm: str = "HS256",
    key: Any = None,
    subject: str = "full",
) -> str:
    now = int(time.time()) + issued_offset_s
    claims = {
        "sub": subject,
        "aud": audience,
        "iss": ISSUER,
        "iat": now,
        "nbf": now,
        "exp": now + lifetime_s,
        "scope": scope,
    }
    for name in drop:
        claims.pop(name)
    return jwt.encode(claims, key if key is not None else secret, algorithm=algorithm)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


class Service:
    def __init__(
        self, url: str, registry: Path, secrets: dict[str, str], config: ServeConfig
    ) -> None:
        self.url = url
        self.registry = registry
        self.secrets = secrets
        self.operator = config.operator
        self.shards = ShardPlan.of(config)
        self.client = httpx.Client(base_url=url, timeout=30.0)

    def operator_targets(self) -> list[str]:
        """host:port of every ingress replica's operator endpoint, from its target file."""
        return read_targets(Path(str(self.operator.targets_dir)))

    def scrape(self, target: str) -> str:
        return httpx.get(f"http://{target}/metrics", timeout=10.0).text

    def scrape_all(self) -> list[str]:
        return [self.scrape(target) for target in self.operator_targets()]

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, **kwargs)

    def wait_for(self, predicate: Any, timeout_s: float = 120.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}: last {last!r}")


def serve_config(tmp: Path, port: int, **feed: Any) -> ServeConfig:
    (tmp / "jwt_secret").write_text(SECRET)
    feed_config: dict[str, Any] = {
        "source": "sim",
        "symbols": SYMBOLS,
        "history_bars": 320,
        "replay_bars_per_s": 4.0,
        "stale_after_s": 10.0,
        "sim_days": 1,
        "sim": SimConfig(seed=9, anchor_date=date(2024, 3, 1), signal_strength=0.2),
    }
    feed_config.update(feed)
    return ServeConfig(
        ray=RayConfig(num_cpus=2),
        registry=str(tmp / "registry"),
        model_name=MODEL_NAME,
        port=port,
        ingress_replicas=2,
        registry_poll_s=1.0,
        snapshot_poll_s=0.2,
        max_predict_bars=1000,
        max_body_bytes=200_000,
        # One prediction at a time and one more queued per ingress replica: a flood of /predict
        # is mostly refused with 503 busy (test_predict_flood_leaves_signal_fresh).
        predict=PredictConfig(replicas=1, max_ongoing_requests=1, max_queued_requests=1),
        engine=EngineShardsConfig(shards=2),
        operator=OperatorConfig(
            port=free_range(4), ports_per_node=4, targets_dir=str(tmp / "prometheus-targets")
        ),
        auth=AuthConfig(
            jwt=JwtConfig(
                secret_env="QUANT_AI_TEST_UNSET_SECRET", secret_file=str(tmp / "jwt_secret")
            ),
            clients_file=str(tmp / "clients.yaml"),
            rate_limit_per_minute=60_000,
            rate_limit_burst=2_000,
        ),
        feed=FeedConfig(**feed_config),
        gold=GoldConfig(url=f"sqlite:///{tmp / 'gold.sqlite'}"),
    )


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from ray import serve

    from cluster.ray_runtime import shutdown
    from serve.deploy import deploy

    tmp = tmp_path_factory.mktemp("serve")
    register_model(tmp / "registry", seed=1)
    store = ClientStore.load(str(tmp / "clients.yaml"))
    secrets = {
        "full": store.add("full", ["signals:read", "signals:predict"]),
        "reader": store.add("reader", ["signals:read"]),
    }
    port = free_port()
    config = serve_config(tmp, port)
    targets_dir = Path(str(config.operator.targets_dir))
    operator_ports = range(config.operator.port, config.operator.port + 4)
    try:
        deployed = deploy(config, address=None)
        svc = Service(f"http://127.0.0.1:{port}", tmp / "registry", secrets, config)
        assert len(deployed["metrics"]) == 2, deployed
        svc.wait_for(lambda: _ok(svc, "/readyz"), timeout_s=180, what="the service to become ready")
        yield svc
    finally:
        serve.shutdown()
        shutdown()
    # Serve stops each replica through its __del__: listener closed, target file removed.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listening = [p for p in operator_ports if _accepts(p)]
        files = sorted(targets_dir.glob("*.json"))
        if not listening and not files:
            break
        time.sleep(0.5)
    assert not listening, f"operator ports still open after Serve shut down: {listening}"
    assert not files, f"target files left after Serve shut down: {files}"


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _ok(svc: Service, path: str) -> bool:
    try:
        return svc.get(path).status_code == 200
    except httpx.HTTPError:
        return False


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    if code is not None:
        assert body["error"] == code, body
    assert "Traceback" not in response.text


def real_bars(n: int, start_day: date = date(2024, 5, 1)) -> list[dict[str, Any]]:
    frame = simulated_bars(SimConfig(seed=5, anchor_date=start_day), ["SIMAAA"], 1).head(n)
    return [{k: v for k, v in row.items() if k != "symbol"} for row in frame.iter_rows(named=True)]


# -- open routes -----------------------------------------------------------------------------


def test_health_and_readiness(service: Service) -> None:
    assert service.get("/healthz").json() == {"status": "ok"}
    ready = service.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}


def test_operator_port_of_each_replica(service: Service) -> None:
    """Each of the two ingress replicas has its own operator endpoint in the configured range;
    the API port has no /metrics; request counters move on the replicas that served them."""
    assert_error(service.get("/metrics"), 404, "not_found")
    targets = service.operator_targets()
    first = service.operator.port
    assert len(targets) == 2
    assert {int(t.rsplit(":", 1)[1]) for t in targets} <= set(range(first, first + 4))
    for target in targets:
        detail = httpx.get(f"http://{target}/readyz", timeout=10.0)
        assert detail.status_code == 200, detail.text
        body = detail.json()
        assert body["ready"] is True and body["model_version"]
        assert [s["symbol"] for s in body["symbols"]] == SYMBOLS

    def history_422s() -> float:
        total = 0.0
        for text in service.scrape_all():
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if (
                        sample.name == "quant_ai_http_requests_total"
                        and sample.labels["route"] == "/signals/history"
                        and sample.labels["status"] == "422"
                    ):
                        total += sample.value
        return total

    before = history_422s()
    headers = bearer(token())
    for _ in range(6):
        assert_error(service.get("/signals/history?limit=0", headers=headers), 422)
    assert history_422s() == before + 6


def test_unknown_route_is_a_json_404(service: Service) -> None:
    assert_error(service.get("/nope"), 404, "not_found")


# -- tokens ----------------------------------------------------------------------------------


def test_token_endpoint_issues_a_working_token(service: Service) -> None:
    response = service.client.post(
        "/token",
        data={
            "grant_type": "client_credentials",
            "client_id": "full",
            "client_secret": service.secrets["full"],
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "bearer" and body["expires_in"] > 0
    assert service.get("/signal?symbol=SIMAAA", headers=bearer(body["access_token"])).is_success


def test_token_endpoint_errors(service: Service) -> None:
    wrong = {"grant_type": "client_credentials", "client_id": "full", "client_secret": "no"}
    assert_error(service.client.post("/token", data=wrong), 401, "invalid_client")
    unknown = {**wrong, "client_id": "ghost"}
    assert_error(service.client.post("/token", data=unknown), 401, "invalid_client")
    grant = {**wrong, "grant_type": "password"}
    assert_error(service.client.post("/token", data=grant), 422, "unsupported_grant_type")
    too_much = {
        "grant_type": "client_credentials",
        "client_id": "reader",
        "client_secret": service.secrets["reader"],
        "scope": "signals:predict",
    }
    assert_error(service.client.post("/token", data=too_much), 403, "insufficient_scope")


def test_client_changes_reach_every_replica(service: Service) -> None:
    """The clients file is shared by the two ingress replicas (two processes): a client added
    after the start gets a token, and once it is disabled every replica refuses that token and
    its POST /token within the reload interval (1 s by default)."""
    path = service.registry.parent / "clients.yaml"
    secret = ClientStore.load(path).add("late", ["signals:read"])
    form = {"grant_type": "client_credentials", "client_id": "late", "client_secret": secret}
    granted = service.wait_for(
        lambda: (r := service.client.post("/token", data=form)).status_code == 200 and r,
        timeout_s=10,
        what="the new client to be accepted",
    )
    late = bearer(granted.json()["access_token"])
    assert service.get("/signal?symbol=SIMAAA", headers=late).is_success
    ClientStore.load(path).set_disabled("late", True)
    started = time.monotonic()

    def all_refused() -> bool:
        # Requests spread over both replicas: eight in a row refused means each one has reloaded.
        answers = [service.get("/signal?symbol=SIMAAA", headers=late) for _ in range(8)]
        return all(a.status_code == 401 for a in answers)

    service.wait_for(all_refused, timeout_s=10, what="every replica to refuse the token")
    assert time.monotonic() - started < 5
    revoked = service.get("/signal?symbol=SIMAAA", headers=late)
    assert_error(revoked, 401, "revoked_token")
    assert revoked.headers["WWW-Authenticate"].startswith("Bearer")
    assert_error(service.client.post("/token", data=form), 401, "invalid_client")


# -- /signal and auth failures ---------------------------------------------------------------


def test_signal_answers_for_every_symbol(service: Service) -> None:
    for symbol in SYMBOLS:
        response = service.get(f"/signal?symbol={symbol}", headers=bearer(token()))
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) >= SIGNAL_FIELDS
        assert body["symbol"] == symbol
        assert body["signal"] in {"BUY", "SELL", "NEUTRAL"}
        assert 0.0 <= body["confidence"] <= 1.0
        assert body["horizon_minutes"] == 10


def rsa_pem() -> tuple[Any, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, public


def unsigned_token() -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    now = int(time.time())
    claims = {"sub": "x", "aud": AUDIENCE, "iss": ISSUER, "iat": now, "exp": now + 60}
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part({**claims, 'scope': 'signals:read'})}."


# Headers are built when the test runs (lambdas): a token made at collection time would expire,
# or become valid, while earlier tests run.
@pytest.mark.parametrize(
    ("make_headers", "status", "code"),
    [
        (lambda: {}, 401, "missing_token"),
        (lambda: {"Authorization": "Basic dGVzdDp0ZXN0"}, 401, "malformed_header"),
        (lambda: {"Authorization": "Bearer"}, 401, "malformed_header"),
        (lambda: bearer("not.a.jwt"), 401, "invalid_token"),
        (lambda: bearer(token(lifetime_s=-120, issued_offset_s=-600)), 401, "token_expired"),
        (lambda: bearer(token(issued_offset_s=600)), 401, "token_not_yet_valid"),
        (lambda: bearer(token(audience="someone-else")), 401, "invalid_audience"),
        (lambda: bearer(token(scope="profile")), 403, "insufficient_scope"),
        (lambda: bearer(token(secret="forged-" + "y" * 40)), 401, "invalid_token"),
        (lambda: bearer(unsigned_token()), 401, "invalid_token"),
        (lambda: bearer(token(drop=("exp",))), 401, "invalid_token"),
        (lambda: bearer(token(lifetime_s=86_401)), 401, "invalid_token"),
        (lambda: bearer(token(subject="nobody")), 401, "revoked_token"),
        (lambda: bearer("a" * 10_000), 401, "token_too_large"),
    ],
    ids=[
        "no-token",
        "basic-scheme",
        "empty-bearer",
        "garbage",
        "expired",
        "not-yet-valid",
        "wrong-audience",
        "wrong-scope",
        "forged",
        "alg-none",
        "missing-exp",
        "lifetime-over-cap",
        "unknown-client",
        "oversized",
    ],
)
def test_signal_auth_failures(
    service: Service, make_headers: Callable[[], dict[str, str]], status: int, code: str
) -> None:
    assert_error(service.get("/signal?symbol=SIMAAA", headers=make_headers()), status, code)


def test_rs256_token_is_rejected_by_the_hs256_service(service: Service) -> None:
    key, _ = rsa_pem()
    forged = token(algorithm="RS256", key=key)
    assert_error(service.get("/signal?symbol=SIMAAA", headers=bearer(forged)), 401, "invalid_token")


def test_signal_bad_symbols(service: Service) -> None:
    assert_error(
        service.get("/signal?symbol=NOPEUSDT", headers=bearer(token())), 404, "unknown_symbol"
    )
    assert_error(
        service.get("/signal?symbol=btc-usdt", headers=bearer(token())), 422, "invalid_request"
    )
    assert_error(service.get("/signal", headers=bearer(token())), 422, "invalid_request")


# -- /predict --------------------------------------------------------------------------------


def test_predict_on_client_bars(service: Service) -> None:
    response = service.client.post(
        "/predict", json={"symbol": "SIMAAA", "bars": real_bars(300)}, headers=bearer(token())
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) >= SIGNAL_FIELDS and body["signal"] in {"BUY", "SELL", "NEUTRAL"}


def test_predict_errors(service: Service) -> None:
    headers = bearer(token())
    bars = real_bars(300)
    assert_error(
        service.client.post(
            "/predict", json={"symbol": "SIMAAA", "bars": bars[:20]}, headers=headers
        ),
        422,
        "invalid_request",
    )
    broken = [dict(bar) for bar in bars]
    broken[5]["high"] = broken[5]["low"] / 2
    assert_error(
        service.client.post("/predict", json={"symbol": "SIMAAA", "bars": broken}, headers=headers),
        422,
        "invalid_request",
    )
    gap = bars[:100] + bars[101:]
    assert_error(
        service.client.post("/predict", json={"symbol": "SIMAAA", "bars": gap}, headers=headers),
        422,
        "invalid_request",
    )
    assert_error(
        service.client.post("/predict", content=b"{not json", headers=headers),
        422,
        "invalid_request",
    )
    assert_error(
        service.client.post(
            "/predict", json={"symbol": "SIMAAA", "bars": real_bars(1440) * 2}, headers=headers
        ),
        413,
        "payload_too_large",
    )
    assert_error(
        service.client.post(
            "/predict",
            json={"symbol": "SIMAAA", "bars": bars},
            headers=bearer(token(scope="signals:read")),
        ),
        403,
        "insufficient_scope",
    )


def test_predict_engine_rejection_carries_no_replica_traceback(service: Service) -> None:
    """Too few bars is refused by the predict replica, across the handle: the client reads the
    replica's message only, not the remote traceback the handle raises it in."""
    response = service.client.post(
        "/predict", json={"symbol": "SIMAAA", "bars": real_bars(20)}, headers=bearer(token())
    )
    assert_error(response, 422, "invalid_request")
    detail = response.json()["detail"]
    assert detail.startswith("20 bars supplied; the model needs at least"), detail
    assert 'File "' not in detail and "/" not in detail, detail


def flood_predict(url: str, body: dict[str, Any], stop: threading.Event) -> Counter[str]:
    """POST `body` to /predict back to back until `stop`; the answers counted by outcome."""
    outcomes: Counter[str] = Counter()
    headers = bearer(token(lifetime_s=600))
    with httpx.Client(base_url=url, timeout=30.0) as client:
        while not stop.is_set():
            response = client.post("/predict", json=body, headers=headers)
            if response.status_code == 200:
                outcomes["ok"] += 1
            elif (
                response.status_code == 503
                and response.json()["error"] == "busy"
                and int(response.headers["Retry-After"]) >= 1
            ):
                outcomes["busy"] += 1
            else:
                outcomes[f"{response.status_code} {response.text[:200]}"] += 1
    return outcomes


def test_predict_flood_leaves_signal_fresh(service: Service) -> None:
    """Six clients flood /predict with 400-bar windows for 8 s. The /predict deployment runs
    one at a time and refuses the excess with 503 busy; meanwhile /signal keeps following the
    feed (it replays 4 bars a second), answering from snapshots the engine keeps building."""
    body = {"symbol": "SIMAAA", "bars": real_bars(400)}
    headers = bearer(token(lifetime_s=600))
    stop = threading.Event()
    seen: list[tuple[float, int]] = []  # (when, the signal's bar open time in ms)
    latencies: list[float] = []
    with ThreadPoolExecutor(6) as pool:
        floods = [pool.submit(flood_predict, service.url, body, stop) for _ in range(6)]
        time.sleep(1.0)
        deadline = time.monotonic() + 8.0
        while time.monotonic() < deadline:
            started = time.perf_counter()
            response = service.get("/signal?symbol=SIMAAA", headers=headers)
            latencies.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
            assert response.json()["reason"] is None or "stale" not in response.json()["reason"]
            seen.append((time.monotonic(), response.json()["bar_open_time_ms"]))
            time.sleep(0.1)
        stop.set()
        outcomes: Counter[str] = sum((f.result() for f in floods), Counter())
    assert set(outcomes) == {"ok", "busy"}, outcomes
    # The signal kept pace with the feed: over the window it advanced by about as many bars
    # as the replay produced (4 a second), and never stood still for long.
    elapsed_s = seen[-1][0] - seen[0][0]
    advanced_bars = (seen[-1][1] - seen[0][1]) // 60_000
    assert advanced_bars >= 4.0 * (elapsed_s - 3.0), (advanced_bars, elapsed_s)
    advances = [when for (_, before), (when, bar) in itertools.pairwise(seen) if bar > before]
    gaps = [later - earlier for earlier, later in itertools.pairwise(advances)]
    assert gaps and max(gaps) < 3.0, gaps
    latencies.sort()
    assert latencies[len(latencies) // 2] < 0.25, latencies
    assert latencies[-1] < 2.0, latencies


# -- history, models, metrics ----------------------------------------------------------------


def test_history_fills_realised_outcomes(service: Service) -> None:
    def filled() -> list[dict[str, Any]]:
        rows = service.get(
            "/signals/history?symbol=SIMAAA&limit=50", headers=bearer(token())
        ).json()["signals"]
        return [r for r in rows if r["realised_return"] is not None]

    rows = service.wait_for(filled, timeout_s=60, what="a realised outcome")
    row = rows[0]
    assert row["symbol"] == "SIMAAA" and row["model_version"]
    assert row["hit"] in (True, False, None)
    assert_error(
        service.get("/signals/history?symbol=NOPE1&limit=5", headers=bearer(token())),
        404,
        "unknown_symbol",
    )
    assert_error(
        service.get("/signals/history?limit=0", headers=bearer(token())), 422, "invalid_request"
    )


def test_models_current(service: Service) -> None:
    body = service.get("/models/current", headers=bearer(token())).json()
    assert body["version"] and body["family"] == "gru"
    assert body["training_data_range"]["start_ms"] > 0
    assert_error(service.get("/models/current"), 401, "missing_token")


def test_metrics_parse_and_name_every_metric(service: Service) -> None:
    service.get("/signal?symbol=SIMAAA", headers={})  # one auth failure at least

    # Every name but the auth failure counter, which a replica has once it refused a request.
    expected = [name for name in METRIC_NAMES if name != "quant_ai_auth_failures_total"]

    def exports_all(text: str) -> bool:
        exported = exported_sample_names(text)
        return all(
            {name, name + "_total", name + "_bucket", name + "_info"} & exported
            for name in expected
        )

    def metrics_with_outcomes() -> list[str] | None:
        texts = service.scrape_all()
        return texts if all(exports_all(t) for t in texts) else None

    texts = service.wait_for(metrics_with_outcomes, timeout_s=60, what="outcomes in /metrics")
    missing_tokens = 0.0
    for text in texts:
        families = {f.name: f for f in text_string_to_metric_families(text)}
        exported = {sample.name for family in families.values() for sample in family.samples}
        for name in expected:
            stems = {name, name + "_total", name + "_bucket", name + "_info"}
            assert stems & exported, f"{name} not exported"
        assert families["quant_ai_model_loaded"].samples[0].value == 1.0
        if "quant_ai_auth_failures" in families:
            missing_tokens += sum(
                s.value
                for s in families["quant_ai_auth_failures"].samples
                if s.name.endswith("_total") and s.labels["reason"] == "missing_token"
            )
    assert missing_tokens >= 1


# -- hot swap and replica failure ------------------------------------------------------------


def hammer(url: str, headers: dict[str, str], stop: threading.Event) -> tuple[int, int, set[str]]:
    ok = failed = 0
    versions: set[str] = set()
    with httpx.Client(base_url=url, timeout=10.0) as client:
        while not stop.is_set():
            try:
                response = client.get("/signal?symbol=SIMAAA", headers=headers)
                if response.status_code == 200:
                    ok += 1
                    versions.add(response.json()["model_version"])
                else:
                    failed += 1
            except httpx.HTTPError:
                failed += 1
    return ok, failed, versions


def run_load(service: Service, seconds: float, action: Any) -> tuple[int, int, set[str]]:
    stop = threading.Event()
    headers = bearer(token(lifetime_s=600))
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(hammer, service.url, headers, stop) for _ in range(4)]
        time.sleep(1.0)
        action()
        time.sleep(seconds)
        stop.set()
        results = [f.result() for f in futures]
    versions: set[str] = set()
    for _, _, seen in results:
        versions |= seen
    return sum(r[0] for r in results), sum(r[1] for r in results), versions


def predicted_version(service: Service) -> Callable[[], str]:
    """A call that returns the model version /predict answers with now."""
    body = {"symbol": "SIMAAA", "bars": real_bars(300)}

    def version() -> str:
        response = service.client.post("/predict", json=body, headers=bearer(token()))
        assert response.status_code == 200, response.text
        answer: str = response.json()["model_version"]
        return answer

    return version


def test_hot_swap_under_load_fails_no_request(service: Service) -> None:
    registry = ModelRegistry(str(service.registry))
    before = registry.get_alias(MODEL_NAME, "production")
    new_version = register_model(service.registry, seed=2, promote=False)

    def promote() -> None:
        registry.set_alias(MODEL_NAME, "production", new_version, reason="hot-swap test")

    ok, failed, versions = run_load(service, 6.0, promote)
    assert failed == 0, f"{failed} requests failed during the swap ({ok} succeeded)"
    assert ok > 50
    current = service.wait_for(
        lambda: (
            (v := service.get("/models/current", headers=bearer(token())).json()["version"])
            == new_version
            and v
        ),
        timeout_s=30,
        what="the new version in /models/current",
    )
    assert current == new_version and before in versions | {before}
    # Each ingress replica polls its own snapshot, and a signal keeps the version that computed
    # it until the next bar: the next replica asked may still show the old one for a moment.
    # Every symbol moves: each is owned by another engine shard, each following the alias.
    for symbol in SYMBOLS:
        service.wait_for(
            lambda symbol=symbol: (
                service.get(f"/signal?symbol={symbol}", headers=bearer(token())).json()[
                    "model_version"
                ]
                == new_version
            ),
            timeout_s=30,
            what=f"a signal of the new version for {symbol}",
        )
    # The /predict deployment follows the alias on its own, with its own copy of the model.
    predict_version = predicted_version(service)
    service.wait_for(
        lambda: predict_version() == new_version, timeout_s=30, what="/predict on the new version"
    )

    ok, failed, _ = run_load(
        service,
        4.0,
        lambda: registry.rollback(MODEL_NAME, reason="rollback test"),
    )
    assert failed == 0
    service.wait_for(
        lambda: service.get("/models/current", headers=bearer(token())).json()["version"] == before,
        timeout_s=30,
        what="the rollback in /models/current",
    )
    service.wait_for(
        lambda: predict_version() == before, timeout_s=30, what="/predict on the rolled-back one"
    )


def test_killed_ingress_replica_is_restarted(service: Service) -> None:
    import ray

    replicas = [
        actor
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if "SignalIngress" in actor["name"]
    ]
    assert len(replicas) == 2, replicas
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
    ok, failed, _ = run_load(service, 8.0, lambda: ray.kill(victim, no_restart=False))
    # Requests in flight on the killed replica fail; Serve routes the rest to the survivor.
    print(f"replica kill under load: {ok} ok, {failed} failed")
    assert ok > 50
    assert failed <= max(10, ok // 20)
    service.wait_for(
        lambda: (
            len(
                [
                    a
                    for a in ray.util.list_named_actors(all_namespaces=True)
                    if "SignalIngress" in a["name"]
                ]
            )
            == 2
        ),
        timeout_s=90,
        what="Serve to restart the ingress replica",
    )
    service.wait_for(lambda: _ok(service, "/readyz"), timeout_s=60, what="readiness")
    # The new replica has an operator endpoint again (the killed one's file replaced or pruned).
    service.wait_for(
        lambda: _all_scrapeable(service), timeout_s=60, what="two scrapeable operator endpoints"
    )


def engine_replicas() -> dict[str, Any]:
    """The live engine shard replicas' actors by deployment name (`SignalEngine-<shard>`)."""
    import ray

    return {
        actor["name"].split("#")[1]: ray.get_actor(actor["name"], namespace=actor["namespace"])
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if "#SignalEngine-" in actor["name"]
    }


def test_each_engine_shard_owns_only_its_symbols(service: Service) -> None:
    from ray import serve

    from serve.deploy import APP_NAME

    assert service.shards.count == 2 and sorted(engine_replicas()) == [
        "SignalEngine-0",
        "SignalEngine-1",
    ]
    for shard, owned in enumerate(service.shards.symbols):
        handle = serve.get_deployment_handle(f"SignalEngine-{shard}", app_name=APP_NAME)
        snapshot = handle.snapshot.remote().result(timeout_s=30)
        assert snapshot.symbol_names == owned
        assert {count.symbol for count in snapshot.signal_counts} <= set(owned)
    # The ingress merges them: /models/current lists every symbol, history spans both shards.
    current = service.get("/models/current", headers=bearer(token())).json()
    assert sorted(current["symbols"]) == sorted(SYMBOLS)
    history = service.get("/signals/history?limit=1000", headers=bearer(token())).json()
    assert {item["symbol"] for item in history["signals"]} == set(SYMBOLS)


def test_a_killed_engine_shard_leaves_the_other_shards_symbols_served(service: Service) -> None:
    import ray

    (victim_symbol,), (survivor,) = service.shards.symbols
    victim = engine_replicas()["SignalEngine-0"]
    ray.kill(victim, no_restart=False)
    # While shard 0 restarts (its feed, state and model rebuilt), shard 1's symbol keeps a fresh
    # signal: the merged snapshot ages only the silent shard's symbols.
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        answer = service.get(f"/signal?symbol={survivor}", headers=bearer(token()))
        assert answer.status_code == 200, answer.text
        assert "stale" not in (answer.json()["reason"] or ""), answer.json()
        time.sleep(0.2)
    service.wait_for(
        lambda: len(engine_replicas()) == 2, timeout_s=90, what="Serve to restart the shard"
    )
    service.wait_for(lambda: _ok(service, "/readyz"), timeout_s=90, what="readiness")
    answer = service.get(f"/signal?symbol={victim_symbol}", headers=bearer(token()))
    assert answer.status_code == 200, answer.text


def _all_scrapeable(service: Service) -> bool:
    targets = service.operator_targets()
    try:
        return len(targets) == 2 and all(
            "quant_ai_model_loaded" in service.scrape(t) for t in targets
        )
    except httpx.HTTPError:
        return False


# -- monitoring assets against what really runs ----------------------------------------------

# Ray exports these only when there is something to report (a pending or failed node, a GPU).
RAY_CONDITIONAL_METRICS = {
    "ray_cluster_pending_nodes",
    "ray_cluster_failed_nodes",
    "ray_node_gpus_utilization",
}


def exported_sample_names(text: str) -> set[str]:
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


def test_every_metric_in_dashboards_and_rules_is_exported(service: Service) -> None:
    from ray._private.worker import global_worker

    from cluster.monitoring_assets import dashboard_metric_names, rule_metric_names

    referenced = dashboard_metric_names() | rule_metric_names()
    ours = {name for name in referenced if name.startswith("quant_ai_")}
    ray_names = {name for name in referenced if name.startswith("ray_")} - RAY_CONDITIONAL_METRICS
    assert ours and ray_names
    api: set[str] = set()
    for text in service.scrape_all():
        api |= exported_sample_names(text)
    assert ours <= api, f"referenced but not exported by the API: {sorted(ours - api)}"

    port = global_worker.node.metrics_export_port

    missing: set[str] | None = None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        missing = ray_names - exported_sample_names(text)
        if not missing:
            break
        time.sleep(2.0)
    assert not missing, f"referenced but not exported by Ray: {sorted(missing or ())}"
