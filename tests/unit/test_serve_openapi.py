"""The API's OpenAPI document states every route's answer and its error bodies, and the response
models carry exactly the fields the engine and the Gold store produce, in wire order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from configs.schema import SYMBOL_PATTERN, AuthConfig, GoldConfig, JwtConfig, ServeConfig
from market.klines import MICROSECOND_THRESHOLD
from serve.api.auth import TokenService
from serve.api.clients import ClientStore
from serve.api.predict_input import BarIn
from serve.api.routes import ROUTES, make_api
from serve.api.schemas import ErrorBody, HistoryItem
from serve.engine.gold import GoldStore, SignalRecord
from tests.serve_support import NoEngine

# route -> (method, 200 schema, the error statuses it can answer)
EXPECTED = {
    "/token": ("post", "TokenOut", {401, 403, 413, 422, 429}),
    "/signal": ("get", "Signal", {401, 403, 404, 422, 429, 503}),
    "/predict": ("post", "Signal", {401, 403, 413, 422, 429, 503}),
    "/signals/history": ("get", "HistoryOut", {401, 403, 404, 422, 429, 503}),
    "/models/current": ("get", "CurrentModel", {401, 403, 429, 503}),
    "/healthz": ("get", "Health", set()),
    "/readyz": ("get", "Ready", {503}),
}


@pytest.fixture
def api_config(tmp_path: Path) -> ServeConfig:
    return ServeConfig(
        registry=str(tmp_path / "registry"),
        auth=AuthConfig(
            jwt=JwtConfig(secret_env="QUANT_AI_UNSET_FOR_TESTS"),
            clients_file=str(tmp_path / "clients.yaml"),
        ),
        gold=GoldConfig(url=f"sqlite:///{tmp_path / 'gold.sqlite'}"),
    )


def openapi(config: ServeConfig) -> dict[str, Any]:
    tokens = TokenService(config.auth.jwt, secret="openapi-secret-" + "x" * 40)
    api = make_api(NoEngine(), config, tokens, ClientStore.load(config.auth.clients_file))
    document: dict[str, Any] = api.openapi()
    return document


def test_every_route_documents_its_answer_and_errors(api_config: ServeConfig) -> None:
    document = openapi(api_config)
    assert set(document["paths"]) == set(ROUTES)
    for route, (method, schema, errors) in EXPECTED.items():
        responses = document["paths"][route][method]["responses"]
        ok = responses["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": f"#/components/schemas/{schema}"}, route
        assert {int(status) for status in responses} - {200} == errors, route
        for status in errors:
            body = responses[str(status)]["content"]["application/json"]["schema"]
            assert body == {"$ref": "#/components/schemas/ErrorBody"}, (route, status)
    error = document["components"]["schemas"]["ErrorBody"]
    assert set(error["properties"]) == {"error", "detail"}
    assert set(error["required"]) == {"error", "detail"}


def test_public_document_has_no_operator_routes(api_config: ServeConfig) -> None:
    """Metrics and the detailed readiness live on the operator port only; the public readiness
    answer is the status and nothing else."""
    document = openapi(api_config)
    assert "/metrics" not in document["paths"]
    assert set(document["components"]["schemas"]["Ready"]["properties"]) == {"status"}


def test_error_bodies_have_the_documented_shape(api_config: ServeConfig) -> None:
    tokens = TokenService(api_config.auth.jwt, secret="openapi-secret-" + "x" * 40)
    api = make_api(NoEngine(), api_config, tokens, ClientStore.load(api_config.auth.clients_file))
    client = TestClient(api)
    for response in (
        client.get("/readyz"),
        client.get("/signal?symbol=SIMAAA"),
        client.get("/nowhere"),
        client.get("/metrics"),
    ):
        assert list(response.json()) == list(ErrorBody.model_fields), response.text
        ErrorBody.model_validate(response.json())


def test_history_item_has_the_gold_store_fields_in_order(tmp_path: Path) -> None:
    store = GoldStore(f"sqlite:///{tmp_path / 'gold.sqlite'}")
    store.record(
        SignalRecord(
            symbol="SIMAAA",
            bar_open_time_ms=1_709_269_860_000,
            signal="BUY",
            confidence=0.6,
            p_up=0.6,
            predicted_return=0.001,
            predicted_close=101.0,
            close=100.9,
            horizon_minutes=10,
            model_version="v0001",
            feature_spec_hash="abc",
            reason=None,
            served_at_ms=1_709_269_920_000,
        )
    )
    (row,) = store.history("SIMAAA", 10)
    store.close()
    assert list(HistoryItem.model_fields) == list(row)
    assert HistoryItem.model_validate(row).model_dump() == row


def test_query_parameters_state_their_constraints(api_config: ServeConfig) -> None:
    """Authorisation runs before the query is checked, yet the document still states what the
    query must hold."""
    paths = openapi(api_config)["paths"]

    def parameter(route: str, name: str) -> dict[str, Any]:
        (found,) = [p for p in paths[route]["get"]["parameters"] if p["name"] == name]
        return found

    signal = parameter("/signal", "symbol")
    assert signal["required"] is True and signal["schema"]["pattern"] == SYMBOL_PATTERN
    history = parameter("/signals/history", "symbol")
    assert history["required"] is False
    assert {"type": "string", "pattern": SYMBOL_PATTERN} in history["schema"]["anyOf"]
    limit = parameter("/signals/history", "limit")["schema"]
    assert (limit["minimum"], limit["maximum"]) == (1, 1000)


def test_request_bodies_are_documented(api_config: ServeConfig) -> None:
    """/token and /predict read their bodies themselves, yet the document states them: the form
    of the client-credentials grant and the bars, with every bound of `BarIn` and no reference
    left dangling."""
    paths = openapi(api_config)["paths"]
    token = paths["/token"]["post"]["requestBody"]
    assert token["required"] is True
    form = token["content"]["application/x-www-form-urlencoded"]["schema"]
    assert set(form["required"]) == {"grant_type", "client_id", "client_secret"}
    assert form["properties"]["grant_type"]["const"] == "client_credentials"
    assert set(form["properties"]) == {"grant_type", "client_id", "client_secret", "scope"}

    predict = paths["/predict"]["post"]["requestBody"]
    assert predict["required"] is True
    body = predict["content"]["application/json"]["schema"]
    assert "$ref" not in json.dumps(body) and "$defs" not in body
    assert body["additionalProperties"] is False
    assert body["properties"]["symbol"]["pattern"] == SYMBOL_PATTERN
    assert body["properties"]["bars"]["minItems"] == 1
    bar = body["properties"]["bars"]["items"]
    assert bar["additionalProperties"] is False
    assert set(bar["required"]) == set(BarIn.model_fields)
    assert bar["properties"]["open_time"]["exclusiveMaximum"] == MICROSECOND_THRESHOLD
    assert bar["properties"]["trades"]["exclusiveMaximum"] == 2**63
    assert bar["properties"]["close"]["exclusiveMinimum"] == 0


def test_a_wrong_method_is_a_json_405_naming_the_allowed_ones(api_config: ServeConfig) -> None:
    tokens = TokenService(api_config.auth.jwt, secret="openapi-secret-" + "x" * 40)
    api = make_api(NoEngine(), api_config, tokens, ClientStore.load(api_config.auth.clients_file))
    client = TestClient(api)
    for method, path, allowed in (("GET", "/token", "POST"), ("DELETE", "/signal", "GET")):
        response = client.request(method, path)
        assert response.status_code == 405
        assert response.json() == {"error": "method_not_allowed", "detail": "Method Not Allowed"}
        assert response.headers["Allow"] == allowed
