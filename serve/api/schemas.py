"""The JSON bodies of the signal API (DESIGN.md §5) as pydantic models: what each route answers
and the one error shape, so the OpenAPI document states them and FastAPI checks every answer.

Field order is the order the JSON has on the wire. Nothing is omitted when None: an unknown value
is sent as null.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, JsonValue

from configs.schema import BacktestConfig

SignalName = Literal["BUY", "SELL", "NEUTRAL"]


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
    503: "not ready: no production model, the engine has not reported, or stale features",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that can answer each of `statuses` with an ErrorBody."""
    return {
        status: {"model": ErrorBody, "description": ERROR_MEANINGS[status]} for status in statuses
    }


class TokenOut(BaseModel):
    """An OAuth2 client-credentials answer; `expires_in` in seconds, `scope` space-separated."""

    access_token: str
    token_type: Literal["bearer"]
    expires_in: int
    scope: str


class SignalOut(BaseModel):
    """A signal for the bar that closed at `as_of` (ISO-8601 UTC); `bar_open_time_ms` is that
    bar's open, epoch milliseconds. `predicted_return` is a log return over `horizon_minutes`;
    `confidence` is max(p_up, 1 - p_up), 0 when there is no opinion (`reason` says why)."""

    symbol: str
    signal: SignalName
    confidence: float
    p_up: float | None
    predicted_return: float | None
    predicted_close: float | None
    horizon_minutes: int
    as_of: str
    bar_open_time_ms: int
    close: float
    model_version: str
    feature_spec_hash: str
    reason: str | None


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


class CurrentModel(BaseModel):
    """The serving model: registry facts, the decision thresholds it was selected with, when it
    was loaded (`loaded_at_ms`, epoch milliseconds), the symbols served and models loaded."""

    version: str
    family: str
    window_bars: int
    feature_spec_hash: str | None
    metrics: dict[str, JsonValue]
    training_data_range: JsonValue
    evaluated_range: JsonValue
    gate: JsonValue
    thresholds: BacktestConfig
    loaded_at_ms: int
    symbols: list[str]
    reloads: int


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    model_version: str
