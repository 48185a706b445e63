"""What the API answers to bad client input and to engine failures: 422 for input it cannot use,
naming the field; authentication before any input check; and never a stack trace, a server path
or the text of a model-load failure in a body."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError

from configs.schema import PredictConfig, ServeConfig
from market.bar_columns import BarColumns
from market.klines import MICROSECOND_THRESHOLD, ONE_MINUTE_MS
from serve.api.auth import TokenService
from serve.api.metrics import ApiMetrics
from serve.api.operator import make_operator_api
from serve.api.routes import make_api
from serve.app import HandleBackend
from serve.engine.engine import SignalEngine
from serve.engine.shards import ShardPlan
from serve.engine.snapshot import (
    NO_MODEL_DETAIL,
    EngineSnapshot,
    InvalidBarsError,
    NoModelError,
    PredictBusyError,
    Signal,
)
from serve.local import LocalBackend
from tests.serve_support import known_clients, register_model
from tests.unit.test_serve_engine import FakeClock, config_for

SERVER_PATH = "/srv/quant-ai/registry/quant-ai/v0002/model.pt"
LOAD_ERROR = f"loading quant-ai v0002 failed: FileNotFoundError: {SERVER_PATH}"
LOAD_FAILED = "the production model could not be loaded; see the service log"


@dataclasses.dataclass
class Served:
    client: TestClient
    tokens: TokenService
    engine: SignalEngine
    config: ServeConfig

    def headers(self, scope: str = "signals:read signals:predict") -> dict[str, str]:
        token, _ = self.tokens.mint("tester", scope.split())
        return {"Authorization": f"Bearer {token}"}


def serve(backend: Any, engine: SignalEngine, config: ServeConfig) -> Served:
    tokens = TokenService.from_config(config.auth.jwt)
    api = make_api(backend, config, tokens, known_clients("tester"))
    return Served(TestClient(api, raise_server_exceptions=False), tokens, engine, config)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The API over an in-process engine serving an untrained model."""
    tmp = tmp_path_factory.mktemp("bad-input")
    register_model(tmp / "registry", seed=1)
    config = config_for(tmp)
    engine = SignalEngine(config, clock=FakeClock())
    backend = LocalBackend(engine)
    backend.step()
    yield serve(backend, engine, config)
    engine.close()


def client_bars(engine: SignalEngine, n: int = 300) -> list[dict[str, Any]]:
    """`n` consecutive bars as a client sends them (the engine's own, without the symbol)."""
    frame = engine.feed.bars("SIMAAA").tail(n)
    return [{k: v for k, v in row.items() if k != "symbol"} for row in frame.iter_rows(named=True)]


def post_predict(served: Served, bars: list[dict[str, Any]]) -> Any:
    return served.client.post(
        "/predict", json={"symbol": "SIMAAA", "bars": bars}, headers=served.headers()
    )


def assert_clean(response: Any) -> None:
    """An error body with nothing of the server in it: no traceback, no frame, no path."""
    assert set(response.json()) == {"error", "detail"}, response.text
    detail = response.json()["detail"]
    assert "Traceback" not in detail and 'File "' not in detail and "/" not in detail, detail


# -- non-finite numbers and open_time bounds -------------------------------------------------


@pytest.mark.parametrize("field", ["high", "close", "volume", "taker_buy_quote"])
@pytest.mark.parametrize("literal", ["Infinity", '"inf"', "NaN", "1e999"])
def test_predict_rejects_non_finite_numbers(served: Served, field: str, literal: str) -> None:
    bars = client_bars(served.engine)
    bars[-1][field] = "NON_FINITE"
    body = json.dumps({"symbol": "SIMAAA", "bars": bars}).replace('"NON_FINITE"', literal)
    response = served.client.post(
        "/predict",
        content=body,
        headers={**served.headers(), "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json() == {
        "error": "invalid_request",
        "detail": f"bars.{len(bars) - 1}.{field}: Input should be a finite number",
    }


def test_predict_still_checks_bounds_and_consistency(served: Served) -> None:
    bars = client_bars(served.engine)
    bars[3]["low"] = -1.0
    bars[5]["high"] = bars[5]["low"] / 2
    response = post_predict(served, bars)
    assert response.status_code == 422
    assert response.json()["detail"] == (
        "bars.3.low: Input should be greater than 0; "
        f"bars.5: Value error, bar {bars[5]['open_time']}: OHLC inconsistent"
    )


@pytest.mark.parametrize("first_open", [MICROSECOND_THRESHOLD, 10**17, 2**63, 2**70])
def test_predict_bounds_open_time(served: Served, first_open: int) -> None:
    """Epoch milliseconds at or past 1e14 (year 5138) are refused: Binance's microsecond
    timestamps start there, and datetime and Int64 overflow not far beyond."""
    bars = client_bars(served.engine)
    for k, bar in enumerate(bars):
        bar["open_time"] = first_open + k * ONE_MINUTE_MS
    response = post_predict(served, bars)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_request"
    assert response.json()["detail"].startswith(
        f"bars.0.open_time: Input should be less than {MICROSECOND_THRESHOLD}"
    )


@pytest.mark.parametrize("trades", [2**63, 2**64, 10**40])
def test_predict_bounds_trades_to_int64(served: Served, trades: int) -> None:
    """A trade count past Int64 is refused as input, not a server error in the engine."""
    bars = client_bars(served.engine)
    bars[-1]["trades"] = trades
    response = post_predict(served, bars)
    assert response.status_code == 422, response.text
    assert response.json() == {
        "error": "invalid_request",
        "detail": f"bars.{len(bars) - 1}.trades: Input should be less than {2**63}",
    }
    bars[-1]["trades"] = 2**63 - 1
    assert post_predict(served, bars).status_code == 200


def test_predict_accepts_the_last_millisecond_time(served: Served) -> None:
    bars = client_bars(served.engine)
    last = MICROSECOND_THRESHOLD - ONE_MINUTE_MS
    for k, bar in enumerate(bars):
        bar["open_time"] = last - (len(bars) - 1 - k) * ONE_MINUTE_MS
    response = post_predict(served, bars)
    assert response.status_code == 200, response.text
    assert response.json()["bar_open_time_ms"] == last


# -- errors from the engine ------------------------------------------------------------------


def test_too_few_bars_is_a_422_with_the_engine_message_only(served: Served) -> None:
    with pytest.raises(InvalidBarsError):
        bars = BarColumns.from_frame(served.engine.feed.bars("SIMAAA").tail(20))
        served.engine.predict("SIMAAA", bars)
    response = post_predict(served, client_bars(served.engine, 20))
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_request"
    assert response.json()["detail"].startswith("20 bars supplied; the model needs at least")
    assert_clean(response)


def replica_error(cause: Exception) -> RayTaskError:
    """What awaiting a Serve handle raises when the replica's method raised `cause`: a
    RayTaskError that is also an instance of the cause's class, its text a remote traceback."""
    traceback_text = (
        "Traceback (most recent call last):\n"
        '  File "/work/serve/app.py", line 71, in predict\n'
        f"{type(cause).__name__}: {cause}"
    )
    error = RayTaskError("predict", traceback_text, cause, proctitle="ray::x", pid=1, ip="1.2.3.4")
    dual: RayTaskError = error.as_instanceof_cause()
    return dual


class FakeHandle:
    """A DeploymentHandle to a predictor whose `predict` raises `error`."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.predict = self

    async def remote(self, *_: Any) -> Signal:
        raise self.error


def run(coro: Any) -> Any:
    return asyncio.new_event_loop().run_until_complete(coro)


def predicting_backend(error: Exception) -> HandleBackend:
    """A HandleBackend whose predictor raises `error` (its engine is never called)."""
    engine = FakeHandle(AssertionError("the engine must not predict"))
    plan = ShardPlan.of(ServeConfig())
    return HandleBackend([engine], FakeHandle(error), 1.0, plan)  # type: ignore[list-item,arg-type]


@pytest.mark.parametrize(
    "cause", [InvalidBarsError("20 bars supplied"), NoModelError(None)], ids=["bars", "no-model"]
)
def test_handle_backend_unwraps_client_errors_from_the_replica(cause: Exception) -> None:
    wrapped = replica_error(cause)
    assert isinstance(wrapped, type(cause)) and "File" in str(wrapped)
    with pytest.raises(type(cause)) as caught:
        run(predicting_backend(wrapped).predict("SIMAAA", []))
    assert str(caught.value) == str(cause)
    assert not isinstance(caught.value, RayTaskError)


def test_handle_backend_turns_back_pressure_into_busy() -> None:
    """Serve's router refuses a call past `max_queued_requests` with BackPressureError."""
    refused = BackPressureError(num_queued_requests=8, max_queued_requests=8, retry_after_s=2.5)
    with pytest.raises(PredictBusyError) as caught:
        run(predicting_backend(refused).predict("SIMAAA", []))
    assert caught.value.retry_after_s == 2.5


def test_handle_backend_passes_other_engine_errors_on() -> None:
    wrapped = replica_error(ValueError("shape mismatch in /srv/model.py"))
    backend = predicting_backend(wrapped)
    with pytest.raises(RayTaskError) as caught:
        run(backend.predict("SIMAAA", []))
    assert not isinstance(caught.value, InvalidBarsError)


def test_local_backend_refuses_predictions_past_its_limit(tmp_path: Path) -> None:
    """In-process, as on Serve: at most max_ongoing + max_queued predictions at once; the next
    is refused at once rather than queued."""
    register_model(tmp_path / "registry", seed=1)
    config = config_for(tmp_path).model_copy(
        update={"predict": PredictConfig(max_ongoing_requests=1, max_queued_requests=0)}
    )
    engine = SignalEngine(config, clock=FakeClock())
    engine.tick()
    bars = BarColumns.from_frame(engine.feed.bars("SIMAAA").tail(5))
    release = threading.Event()
    answer = engine.snapshot()  # any value: what the held prediction returns

    def held_prediction(*_: Any) -> Any:
        release.wait(10.0)
        return answer

    engine.predict = held_prediction  # type: ignore[method-assign]
    backend = LocalBackend(engine)

    async def scenario() -> Any:
        first = asyncio.create_task(backend.predict("SIMAAA", bars))
        await asyncio.sleep(0.05)  # the first holds the only slot now
        with pytest.raises(PredictBusyError):
            await backend.predict("SIMAAA", bars)
        release.set()
        return await first

    assert run(scenario()) is answer
    engine.close()


class FailingBackend:
    """The served engine's snapshot, with a `predict` that raises `error`."""

    def __init__(self, snapshot: EngineSnapshot, error: Exception) -> None:
        self._snapshot = snapshot
        self.error = error

    def snapshot(self) -> EngineSnapshot | None:
        return self._snapshot

    async def predict(self, symbol: str, bars: BarColumns) -> Signal:
        raise self.error

    async def history(self, symbol: str | None, limit: int) -> list[dict[str, Any]]:
        return []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


@pytest.mark.parametrize(
    ("error", "status", "code", "detail"),
    [
        (InvalidBarsError("20 bars supplied"), 422, "invalid_request", "20 bars supplied"),
        (
            replica_error(ValueError(f"cannot read {SERVER_PATH}")),
            500,
            "internal_error",
            "internal error; see the service log",
        ),
        (
            RuntimeError(f"cannot read {SERVER_PATH}"),
            500,
            "internal_error",
            "internal error; see the service log",
        ),
        (NoModelError(None), 503, "no_model", NO_MODEL_DETAIL),
        (PredictBusyError(2.5), 503, "busy", "every prediction worker is busy; retry later"),
    ],
    ids=["invalid-bars", "replica-value-error", "engine-fault", "no-model", "busy"],
)
def test_predict_translates_engine_errors(
    served: Served,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
    status: int,
    code: str,
    detail: str,
) -> None:
    snapshot = served.engine.snapshot()
    failing = serve(FailingBackend(snapshot, error), served.engine, served.config)
    response = post_predict(failing, client_bars(served.engine))
    assert response.status_code == status, response.text
    assert response.json() == {"error": code, "detail": detail}
    if code == "busy":  # seconds, rounded up
        assert response.headers["Retry-After"] == "3"
    if status == 500:  # the operator's copy: the full text, with the traceback
        assert SERVER_PATH in caplog.text and "Traceback" in caplog.text


# -- model-load failures ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("load_error", "detail"), [(LOAD_ERROR, LOAD_FAILED), (None, NO_MODEL_DETAIL)]
)
def test_no_model_answers_name_no_server_path(
    served: Served, load_error: str | None, detail: str
) -> None:
    snapshot = dataclasses.replace(served.engine.snapshot(), model=None, load_error=load_error)
    bare = serve(FailingBackend(snapshot, AssertionError()), served.engine, served.config)
    headers = bare.headers()
    for response in (
        bare.client.get("/signal?symbol=SIMAAA", headers=headers),
        bare.client.get("/models/current", headers=headers),
        bare.client.post(
            "/predict",
            json={"symbol": "SIMAAA", "bars": client_bars(served.engine)},
            headers=headers,
        ),
    ):
        assert response.status_code == 503, response.text
        assert response.json() == {"error": "no_model", "detail": detail}
    ready = bare.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"error": "not_ready", "detail": "no production model loaded"}
    backend = FailingBackend(snapshot, AssertionError())
    assert SERVER_PATH not in ApiMetrics(backend.snapshot, time.time).render().decode()
    # The operator port is for operators: its readiness carries the load error as it came.
    detail = TestClient(
        make_operator_api(backend.snapshot, ApiMetrics(backend.snapshot, time.time))
    ).get("/readyz")
    assert detail.status_code == 503 and detail.json()["load_error"] == load_error


# -- authentication comes first --------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/signal?symbol=btc-usdt",
        "/signal",
        "/signals/history?symbol=btc-usdt",
        "/signals/history?limit=0",
        "/signals/history?limit=many",
    ],
)
def test_unauthenticated_bad_query_is_401(served: Served, path: str) -> None:
    response = served.client.get(path)
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "missing_token"


@pytest.mark.parametrize(
    ("path", "detail"),
    [
        ("/signal?symbol=btc-usdt", "query.symbol: String should match pattern '^[A-Z0-9]{2,20}$'"),
        ("/signal", "query.symbol: Field required"),
        (
            "/signals/history?symbol=btc-usdt",
            "query.symbol: String should match pattern '^[A-Z0-9]{2,20}$'",
        ),
        ("/signals/history?limit=0", "query.limit: Input should be greater than or equal to 1"),
    ],
)
def test_authorised_bad_query_is_422(served: Served, path: str, detail: str) -> None:
    response = served.client.get(path, headers=served.headers())
    assert response.status_code == 422, response.text
    assert response.json() == {"error": "invalid_request", "detail": detail}


def test_wrong_scope_is_403_before_query_checks(served: Served) -> None:
    response = served.client.get("/signal?symbol=btc-usdt", headers=served.headers("profile"))
    assert response.status_code == 403
