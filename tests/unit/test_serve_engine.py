"""The signal engine and the API over it in-process (no Ray): signals per new bar, Gold records,
stale data, no model, and the metrics the engine feeds. Time is a fake clock."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from configs.schema import AuthConfig, FeedConfig, GoldConfig, JwtConfig, ServeConfig, SimConfig
from serve.api.auth import TokenService
from serve.api.metrics import ApiMetrics
from serve.api.operator import make_operator_api
from serve.api.routes import make_api
from serve.engine.engine import SignalEngine
from serve.engine.snapshot import NoModelError, UnknownSymbolError
from serve.local import LocalBackend
from tests.serve_support import known_clients, register_model

SECRET = "unit-secret-" + "z" * 40


class FakeClock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def config_for(tmp_path: Path, **feed: Any) -> ServeConfig:
    (tmp_path / "secret").write_text(SECRET)
    feed_config: dict[str, Any] = {
        "source": "sim",
        "symbols": ["SIMAAA"],
        "history_bars": 300,
        "replay_bars_per_s": 1.0,
        "stale_after_s": 30.0,
        "sim_days": 1,
        "sim": SimConfig(seed=3, anchor_date=date(2024, 3, 1)),
    }
    feed_config.update(feed)
    return ServeConfig(
        registry=str(tmp_path / "registry"),
        auth=AuthConfig(
            jwt=JwtConfig(
                secret_env="QUANT_AI_UNSET_FOR_TESTS", secret_file=str(tmp_path / "secret")
            ),
            clients_file=str(tmp_path / "clients.yaml"),
        ),
        feed=FeedConfig(**feed_config),
        gold=GoldConfig(url=f"sqlite:///{tmp_path / 'gold.sqlite'}"),
    )


def test_engine_serves_one_signal_per_new_bar_and_records_it(tmp_path: Path) -> None:
    version = register_model(tmp_path / "registry", seed=1)
    clock = FakeClock()
    engine = SignalEngine(config_for(tmp_path), clock=clock)
    assert engine.refresh_model()
    engine.tick()
    first = engine.signal("SIMAAA")
    assert first.model_version == version and first.p_up is not None
    clock.now += 1.0
    engine.tick()
    second = engine.signal("SIMAAA")
    assert second.bar_open_time_ms == first.bar_open_time_ms + 60_000
    for _ in range(11):  # one bar a second: one new signal each
        clock.now += 1.0
        engine.tick()
    rows = engine.history("SIMAAA", 100)
    assert len(rows) == 13
    assert [r["bar_open_time_ms"] for r in rows][::-1] == [
        first.bar_open_time_ms + 60_000 * k for k in range(13)
    ]
    assert sum(r["realised_return"] is not None for r in rows) == 3  # bar t+10 held for 3
    with pytest.raises(UnknownSymbolError):
        engine.signal("NOPE")
    engine.close()


def test_engine_without_a_production_model(tmp_path: Path) -> None:
    register_model(tmp_path / "registry", seed=1, promote=False)
    engine = SignalEngine(config_for(tmp_path), clock=FakeClock())
    assert not engine.refresh_model()
    engine.tick()
    with pytest.raises(NoModelError):
        engine.signal("SIMAAA")
    assert engine.snapshot().model is None
    engine.close()


def run(coro: Any) -> Any:
    return asyncio.new_event_loop().run_until_complete(coro)


def test_stale_feed_turns_signals_neutral_and_readiness_off(tmp_path: Path) -> None:
    register_model(tmp_path / "registry", seed=1)
    clock = FakeClock()
    # One simulated day at 1 bar/s runs out after 1140 s: then no bar arrives any more.
    config = config_for(tmp_path, stale_after_s=30.0)
    engine = SignalEngine(config, clock=clock)
    backend = LocalBackend(engine)
    backend.step()
    metrics = ApiMetrics(backend.snapshot, clock)
    api = make_api(
        backend,
        config,
        TokenService.from_config(config.auth.jwt),
        known_clients("tester"),
        clock=clock,
        metrics=metrics,
    )
    operator = TestClient(make_operator_api(backend.snapshot, metrics, clock=clock))
    token, _ = TokenService.from_config(config.auth.jwt).mint("tester", ["signals:read"])
    headers = {"Authorization": f"Bearer {token}"}
    client = TestClient(api)  # no context manager: the engine is stepped by hand
    fresh = client.get("/signal?symbol=SIMAAA", headers=headers)
    assert fresh.status_code == 200 and fresh.json()["reason"] in (
        None,
        "edge below the cost threshold",
    )
    assert client.get("/readyz").status_code == 200

    clock.now += 1140.0 + 5  # the replay's last bar
    backend.step()
    clock.now += 60.0
    backend.step()
    stale = client.get("/signal?symbol=SIMAAA", headers=headers)
    assert stale.status_code == 200
    body = stale.json()
    assert body["signal"] == "NEUTRAL" and body["confidence"] == 0.0
    assert body["reason"].startswith("stale features")
    ready = client.get("/readyz")
    assert ready.json() == {"error": "not_ready", "detail": "features are stale"}
    assert ready.status_code == 503
    detail = operator.get("/readyz")
    assert detail.status_code == 503
    (symbol,) = detail.json()["symbols"]
    assert symbol["symbol"] == "SIMAAA" and symbol["stale"] and symbol["staleness_s"] >= 60.0
    families = {f.name: f for f in text_string_to_metric_families(operator.get("/metrics").text)}
    staleness = families["quant_ai_feature_staleness_seconds"].samples[0]
    assert staleness.labels == {"symbol": "SIMAAA"} and staleness.value >= 60.0
    engine.close()


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    register_model(tmp_path / "registry", seed=1)
    clock = FakeClock()
    base = config_for(tmp_path)
    config = base.model_copy(
        update={
            "auth": base.auth.model_copy(
                update={"rate_limit_per_minute": 60.0, "rate_limit_burst": 3}
            )
        }
    )
    engine = SignalEngine(config, clock=clock)
    backend = LocalBackend(engine)
    backend.step()
    tokens = TokenService.from_config(config.auth.jwt)
    api = make_api(backend, config, tokens, known_clients("client-a", "client-b"), clock=clock)
    client = TestClient(api)
    first, _ = tokens.mint("client-a", ["signals:read"])
    second, _ = tokens.mint("client-b", ["signals:read"])
    statuses = [
        client.get("/signal?symbol=SIMAAA", headers={"Authorization": f"Bearer {first}"})
        for _ in range(4)
    ]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429]
    limited = statuses[-1]
    assert limited.json()["error"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1
    # The limit is per client: another subject is still served.
    other = client.get("/signal?symbol=SIMAAA", headers={"Authorization": f"Bearer {second}"})
    assert other.status_code == 200
    engine.close()


def test_engine_and_api_apply_one_staleness_rule(tmp_path: Path) -> None:
    """`engine.signal` and GET /signal give the same answer, fresh and stale, also while the API's
    snapshot ages without a new engine round; /readyz turns on the same threshold."""
    register_model(tmp_path / "registry", seed=1)
    clock = FakeClock()
    config = config_for(tmp_path, stale_after_s=30.0)
    engine = SignalEngine(config, clock=clock)
    backend = LocalBackend(engine)
    backend.step()
    tokens = TokenService.from_config(config.auth.jwt)
    api = make_api(backend, config, tokens, known_clients("tester"), clock=clock)
    token, _ = tokens.mint("tester", ["signals:read"])
    client = TestClient(api)
    clock.now += 1140.0 + 5  # past the replay's last bar: no new bar from here on
    backend.step(check_registry=False)
    answers = []
    for _ in range(4):  # the snapshot ages by 10 s a step; it crosses 30 s of staleness
        clock.now += 10.0
        served = client.get("/signal?symbol=SIMAAA", headers={"Authorization": f"Bearer {token}"})
        assert served.status_code == 200
        assert served.json() == dataclasses.asdict(engine.signal("SIMAAA"))
        staleness, stale = engine.snapshot().staleness("SIMAAA", clock())
        held = backend.snapshot()  # the API's snapshot, one engine round old
        assert held is not None and held.staleness("SIMAAA", clock()) == (staleness, stale)
        assert client.get("/readyz").status_code == (503 if stale else 200)
        answers.append(served.json()["signal"] == "NEUTRAL")
    assert answers[0] is False and answers[-1] is True
    engine.close()


def test_engine_snapshot_survives_pickling(tmp_path: Path) -> None:
    """The snapshot crosses a Serve handle: a real one, with model facts and signals, pickles."""
    register_model(tmp_path / "registry", seed=1)
    engine = SignalEngine(config_for(tmp_path), clock=FakeClock())
    engine.refresh_model()
    engine.tick()
    snap = engine.snapshot()
    assert snap.model is not None and snap.state("SIMAAA").signal is not None
    assert pickle.loads(pickle.dumps(snap)) == snap
    engine.close()
