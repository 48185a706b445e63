"""The JSON bodies of the signal API (DESIGN.md §5) as pydantic models: what each route answers
and the one error shape, so the OpenAPI document states them and FastAPI checks every answer.

Field order is the order the JSON has on the wire. Nothing is omitted when None: an unknown value
is sent as null.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from pydantic import BaseModel, Field

from serve.engine.snapshot import ModelInfo, SignalName


class ErrorBody(BaseModel):
    """Every error: a stable machine-readable `error` code and a `detail` for people."""

    error: str
    detail: str


# What each error status means on this API (DESIGN.md §5).
ERROR_MEANINGS = {
    401: "missing, malformed, expired or forged token (or wrong client credentials)",
    403: "the token lacks the scope this route needs",
    404: "the symbol is not served",
    413: "request body too large",
    422: "malformed input",
    429: "rate limited; `Retry-After` gives the seconds to wait",
    503: "not ready: no production model, the engine has not reported, or stale features; "
    "on /predict also `busy` (every prediction worker busy; `Retry-After` gives the seconds)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that can answer each of `statuses` with an ErrorBody."""
    return {
        status: {"model": ErrorBody, "description": ERROR_MEANINGS[status]} for status in statuses
    }


class TokenRequest(BaseModel):
    """The form of POST /token (`application/x-www-form-urlencoded`). Documentation only: the
    handler reads the form itself, after the body size limit."""

    grant_type: Literal["client_credentials"]
    client_id: str = Field(min_length=1)
    client_secret: str = Field(min_length=1)
    scope: str = Field(
        default="", description="space-separated scopes to ask for; all the client's if empty"
    )


FORM = "application/x-www-form-urlencoded"


def request_body(model: type[BaseModel], media_type: str) -> dict[str, Any]:
    """The `openapi_extra` of a route that reads and checks its body itself (after authorisation
    and the body size limit, so FastAPI must not parse it first): the document states the body
    `model` describes. Nested models are inlined: the `#/$defs/...` references pydantic writes
    would resolve against the whole document, where nothing is at `$defs`."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return {"requestBody": {"required": True, "content": {media_type: {"schema": inline(schema)}}}}


class TokenOut(BaseModel):
    """An OAuth2 client-credentials answer; `expires_in` in seconds, `scope` space-separated."""

    access_token: str
    token_type: Literal["bearer"]
    expires_in: int
    scope: str


class HistoryItem(BaseModel):
    """A served signal and, once bar t + horizon is held, its realised outcome (null before).
    Times in epoch milliseconds; `pnl_bps` in basis points, gross of fees."""

    symbol: str
    as_of: str
    bar_open_time_ms: int
    signal: SignalName
    confidence: float
    p_up: float | None
    predicted_return: float | None
    predicted_close: float | None
    close: float
    horizon_minutes: int
    outcome_open_time_ms: int
    model_version: str
    feature_spec_hash: str
    reason: str | None
    served_at_ms: int
    realised_close: float | None
    realised_return: float | None
    hit: bool | None
    pnl_bps: float | None
    filled_at_ms: int | None


class HistoryOut(BaseModel):
    """Served signals, newest first; `symbol` null when all symbols were asked for."""

    symbol: str | None
    signals: list[HistoryItem]


@dataclass(frozen=True)
class CurrentModel(ModelInfo):
    """The serving model (`ModelInfo`'s registry facts and thresholds, `loaded_at_ms` epoch
    milliseconds), then the symbols served and how many models were loaded since start."""

    symbols: tuple[str, ...]
    reloads: int

    @classmethod
    def of(cls, model: ModelInfo, symbols: tuple[str, ...], reloads: int) -> CurrentModel:
        return cls(
            **{f.name: getattr(model, f.name) for f in fields(ModelInfo)},
            symbols=symbols,
            reloads=reloads,
        )


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    """The public readiness: nothing but the status (the details are on the operator port)."""

    status: Literal["ready"]
