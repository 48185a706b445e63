"""The operator port: metrics and the detailed readiness off the public API, and the listener
each ingress replica runs for them (port range, file_sd target files, collisions, stop).

The apps are driven through ASGI test clients over a real in-process engine; the listener binds
loopback ports and is scraped over HTTP. No Ray.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from configs.schema import OperatorConfig, ServeConfig
from serve.api.auth import TokenService
from serve.api.clients import ClientStore
from serve.api.metrics import METRIC_NAMES, ApiMetrics
from serve.api.operator import make_operator_api
from serve.api.readiness import PUBLIC_REASONS
from serve.api.routes import make_api
from serve.engine.engine import SignalEngine
from serve.local import LocalBackend, make_local_apps
from serve.operator import (
    OperatorEndpoint,
    OperatorPortError,
    OperatorServer,
    advertised_host,
    bind_first_free,
    prune_stale_targets,
    read_targets,
    write_target_file,
)
from tests.serve_support import NoEngine, free_range, known_clients, register_model
from tests.unit.test_serve_engine import FakeClock, config_for


@pytest.fixture
def operator_config(tmp_path: Path) -> OperatorConfig:
    return OperatorConfig(
        port=free_range(3), ports_per_node=3, targets_dir=str(tmp_path / "targets")
    )


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# -- the apps --------------------------------------------------------------------------------


class Apps:
    """The public and operator apps over one stepped in-process engine and one registry."""

    def __init__(self, tmp_path: Path, **feed: object) -> None:
        register_model(tmp_path / "registry", seed=1)
        self.clock = FakeClock()
        self.config = config_for(tmp_path, **feed)
        self.engine = SignalEngine(self.config, clock=self.clock)
        self.backend = LocalBackend(self.engine)
        self.backend.step()
        self.tokens = TokenService.from_config(self.config.auth.jwt)
        metrics = ApiMetrics(self.backend.snapshot, self.clock)
        api = make_api(
            self.backend,
            self.config,
            self.tokens,
            known_clients("tester"),
            clock=self.clock,
            metrics=metrics,
        )
        self.api = TestClient(api)
        self.operator = TestClient(
            make_operator_api(self.backend.snapshot, metrics, clock=self.clock)
        )

    def bearer(self) -> dict[str, str]:
        token, _ = self.tokens.mint("tester", ["signals:read"])
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def apps(tmp_path: Path) -> Iterator[Apps]:
    built = Apps(tmp_path, stale_after_s=30.0)
    yield built
    built.engine.close()


def test_the_api_port_has_no_metrics(apps: Apps) -> None:
    response = apps.api.get("/metrics")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    assert "quant_ai_" not in response.text


def test_public_readiness_is_the_status_only(apps: Apps) -> None:
    ready = apps.api.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}
    model = apps.engine.snapshot().require_model()
    assert model.version not in ready.text


def test_public_unreadiness_gives_a_coarse_reason_and_nothing_else(apps: Apps) -> None:
    apps.clock.now += 1140.0 + 5  # past the replay's last bar: the features go stale
    apps.backend.step()
    apps.clock.now += 60.0
    ready = apps.api.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"error": "not_ready", "detail": "features are stale"}
    assert ready.json()["detail"] in PUBLIC_REASONS
    for secret in ("SIMAAA", apps.engine.snapshot().require_model().version, "pnl", " s)"):
        assert secret not in ready.text


def test_public_readiness_before_the_engine_reports(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    tokens = TokenService(config.auth.jwt, secret="operator-secret-" + "x" * 40)
    api = make_api(NoEngine(), config, tokens, ClientStore.load(config.auth.clients_file))
    ready = TestClient(api).get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {
        "error": "not_ready",
        "detail": "the signal engine has not reported yet",
    }


def test_operator_readiness_has_the_details(apps: Apps) -> None:
    model = apps.engine.snapshot().require_model()
    ready = apps.operator.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] is True and body["reason"] is None and body["problems"] == []
    assert body["model_version"] == model.version and body["load_error"] is None
    assert [s["symbol"] for s in body["symbols"]] == ["SIMAAA"]
    assert body["snapshot_age_s"] == pytest.approx(0.0)

    apps.clock.now += 1140.0 + 5
    apps.backend.step()
    apps.clock.now += 60.0
    stale = apps.operator.get("/readyz")
    assert stale.status_code == 503
    body = stale.json()
    assert body["ready"] is False and body["reason"] == "features are stale"
    assert body["problems"][0].startswith("SIMAAA: stale features (")
    assert body["symbols"][0]["stale"] is True and body["snapshot_age_s"] == pytest.approx(60.0)


def test_operator_metrics_count_the_public_requests(apps: Apps) -> None:
    def requests_of(route: str) -> float:
        text = apps.operator.get("/metrics").text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        return sum(
            s.value
            for s in families["quant_ai_http_requests"].samples
            if s.name.endswith("_total") and s.labels["route"] == route
        )

    before = requests_of("/signal")
    for _ in range(3):
        assert apps.api.get("/signal?symbol=SIMAAA", headers=apps.bearer()).status_code == 200
    assert requests_of("/signal") == before + 3
    assert apps.api.get("/signal?symbol=SIMAAA").status_code == 401  # one auth failure
    scrape = apps.operator.get("/metrics")
    assert scrape.headers["content-type"].startswith("text/plain; version=0.0.4")
    exported = {s.name for f in text_string_to_metric_families(scrape.text) for s in f.samples}
    # The request metrics and the snapshot's (realised outcomes need ten more bars: the full
    # set is checked over a complete snapshot in test_monitoring_assets and on Serve).
    assert {
        "quant_ai_http_requests_total",
        "quant_ai_http_request_duration_seconds_bucket",
        "quant_ai_auth_failures_total",
        "quant_ai_model_info",
        "quant_ai_model_loaded",
        "quant_ai_feature_staleness_seconds",
        "quant_ai_snapshot_age_seconds",
    } <= exported
    assert {n for n in exported if n.startswith("quant_ai_")} <= {
        n + suffix
        for n in METRIC_NAMES
        for suffix in ("", "_bucket", "_sum", "_count", "_created", "_info")
    } | {n.removesuffix("_total") + "_created" for n in METRIC_NAMES}
    # scrapes of the operator port are not API traffic
    assert requests_of("/metrics") == 0.0


def test_operator_app_answers_only_its_routes(apps: Apps) -> None:
    assert apps.operator.get("/healthz").json() == {"status": "ok"}
    missing = apps.operator.get("/signal?symbol=SIMAAA")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


def test_local_apps_share_one_registry(tmp_path: Path) -> None:
    register_model(tmp_path / "registry", seed=1)
    config = config_for(tmp_path)
    engine = SignalEngine(config, clock=FakeClock())
    local = make_local_apps(config, engine)
    TestClient(local.api).get("/healthz")
    text = TestClient(local.operator).get("/metrics").text
    assert 'quant_ai_http_requests_total{method="GET",route="/healthz",status="200"} 1.0' in text
    assert TestClient(local.api).get("/metrics").status_code == 404
    engine.close()


# -- configuration ---------------------------------------------------------------------------


def test_operator_config_defaults_and_checks() -> None:
    default = ServeConfig().operator
    assert (default.bind_address, default.port, default.ports_per_node) == ("127.0.0.1", 9470, 8)
    assert ServeConfig.model_validate({"operator": {"bind_address": "::", "port": 9100}})
    with pytest.raises(ValidationError, match="not an IP address"):
        OperatorConfig(bind_address="localhost")
    with pytest.raises(ValidationError, match="exceed 65535"):
        OperatorConfig(port=65530, ports_per_node=8)
    with pytest.raises(ValidationError, match="extra"):
        ServeConfig.model_validate({"operator": {"metrics_port": 1}})


# -- the listener ----------------------------------------------------------------------------


def metrics_app() -> tuple[object, ApiMetrics]:
    metrics = ApiMetrics(lambda: None, time.time)
    return make_operator_api(lambda: None, metrics), metrics


def test_replicas_of_one_node_take_consecutive_ports(operator_config: OperatorConfig) -> None:
    servers = [OperatorServer(metrics_app()[0], operator_config) for _ in range(2)]
    try:
        endpoints = [server.start() for server in servers]
        first = operator_config.port
        assert [e.port for e in endpoints] == [first, first + 1]
        for endpoint in endpoints:
            response = httpx.get(endpoint.metrics_url, timeout=5.0)
            assert response.status_code == 200
            assert "quant_ai_model_loaded 0.0" in response.text
        assert read_targets(Path(str(operator_config.targets_dir))) == [
            f"127.0.0.1:{first}",
            f"127.0.0.1:{first + 1}",
        ]
    finally:
        for server in servers:
            server.stop()


def test_target_file_is_file_sd_and_goes_with_the_server(operator_config: OperatorConfig) -> None:
    server = OperatorServer(metrics_app()[0], operator_config, labels={"replica": "abc"})
    endpoint = server.start()
    path = server.target_path
    assert path is not None and path.parent == Path(str(operator_config.targets_dir))
    assert json.loads(path.read_text()) == [
        {"targets": [f"127.0.0.1:{endpoint.port}"], "labels": {"replica": "abc"}}
    ]
    threads = {t.name for t in threading.enumerate()}
    assert "operator-http" in threads
    server.stop()
    assert not path.exists()
    assert not accepts(endpoint.port)
    assert not server.running
    assert "operator-http" not in {t.name for t in threading.enumerate()}
    server.stop()  # a second stop (Serve may call __del__ again) is harmless


def test_a_full_range_is_a_clear_error(operator_config: OperatorConfig) -> None:
    holders = []
    try:
        for port in range(operator_config.port, operator_config.port + 3):
            sock = socket.socket()
            sock.bind(("127.0.0.1", port))
            sock.listen()
            holders.append(sock)
        server = OperatorServer(metrics_app()[0], operator_config)
        first, last = operator_config.port, operator_config.port + 2
        with pytest.raises(
            OperatorPortError, match=f"no free operator port on 127.0.0.1 in {first}-{last}"
        ):
            server.start()
        assert not server.running
        assert read_targets(Path(str(operator_config.targets_dir))) == []
    finally:
        for sock in holders:
            sock.close()


def test_an_address_of_no_interface_is_a_clear_error() -> None:
    # 192.0.2.0/24 is TEST-NET-1: never an address of this machine.
    with pytest.raises(
        OperatorPortError, match=re.escape("cannot bind the operator port 192.0.2.1")
    ):
        bind_first_free("192.0.2.1", free_range(1), 1)


def test_stale_target_files_of_this_host_are_pruned(tmp_path: Path) -> None:
    port = free_range(2)
    live = socket.socket()
    live.bind(("127.0.0.1", port))
    live.listen()
    try:
        alive = write_target_file(tmp_path, OperatorEndpoint("127.0.0.1", port, "127.0.0.1"), {})
        dead = write_target_file(tmp_path, OperatorEndpoint("127.0.0.1", port + 1, "127.0.0.1"), {})
        elsewhere = write_target_file(
            tmp_path, OperatorEndpoint("0.0.0.0", port + 1, "10.9.9.9"), {}
        )
        assert prune_stale_targets(tmp_path, "127.0.0.1") == [dead]
        assert alive.exists() and elsewhere.exists() and not dead.exists()
    finally:
        live.close()


def test_a_wildcard_bind_advertises_the_node_address() -> None:
    assert advertised_host("0.0.0.0", "10.0.0.12") == "10.0.0.12"
    assert advertised_host("0.0.0.0", None) == "127.0.0.1"
    assert advertised_host("127.0.0.1", "10.0.0.12") == "127.0.0.1"
    assert OperatorEndpoint("::", 9470, "fd00::5").target == "[fd00::5]:9470"
