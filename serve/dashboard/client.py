"""The dashboard's client of the signal API (DESIGN.md §5) and the served signals as frames.

`SignalApiClient` calls `POST /token`, `GET /signal`, `GET /signals/history` and
`GET /models/current` over httpx; every failure becomes a `SignalApiError` whose `message` is
one readable sentence (never a traceback). `signals_frame` turns /signals/history items into a
polars frame with each signal's realised outcome.

Units: times are UTC (epoch milliseconds where a name ends in `_ms`); `timeout_s` is seconds;
`realised_return` is the 10-bar log return; `pnl_bps` is basis points (1e-4).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Literal

import httpx
import polars as pl

from configs.schema import SCOPE_READ

Outcome = Literal["hit", "miss", "pending", "none"]
SCORED_SIGNALS: Final = ("BUY", "SELL")
"""Signals that take a position and so have an outcome (NEUTRAL has none)."""
OUTCOMES: Final[tuple[Outcome, ...]] = ("hit", "miss", "pending")
"""The outcomes of a BUY or SELL: scored against bar t+10, or still waiting for it."""

_HINTS: Final[Mapping[int, str]] = {
    401: "log in again (the token is missing, expired or was not issued by this service)",
    403: f"this client lacks the `{SCOPE_READ}` scope",
    404: "pick another symbol",
    422: "the request was malformed",
    503: "the service is not ready yet; it recovers on its own once a model and fresh bars are in",
}


class SignalApiError(Exception):
    """A call to the signal API that failed, as the client saw it: `status` (None when no HTTP
    answer came), the API's error `code` and `detail`, and `retry_after_s` (seconds) on a 429.
    """

    def __init__(
        self, status: int | None, code: str, detail: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.retry_after_s = retry_after_s

    @classmethod
    def from_response(cls, response: httpx.Response) -> SignalApiError:
        """The error of a 4xx/5xx answer, from the API's JSON error body (`error`, `detail`)
        when it has one, else from the status line and text."""
        code, detail = "http_error", response.text[:300] or response.reason_phrase
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            code = str(body.get("error") or code)
            detail = str(body.get("detail") or detail)
        retry = response.headers.get("retry-after")
        retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
        return cls(response.status_code, code, detail, retry_after)

    @property
    def message(self) -> str:
        """One readable sentence for the dashboard: what failed and what to do about it."""
        if self.status is None:
            return f"Signal API unavailable ({self.code}): {self.detail}"
        hint = _HINTS.get(self.status, "")
        if self.code == "invalid_client":
            hint = "check the client id and secret"
        if self.status == 429:
            wait = f" in {self.retry_after_s:.0f} s" if self.retry_after_s is not None else ""
            hint = f"rate limited; try again{wait}"
        text = f"Signal API answered {self.status} {self.code}: {self.detail}"
        return f"{text} — {hint}." if hint else f"{text}."

    def __str__(self) -> str:
        return self.message


class SignalApiClient:
    """A small synchronous client of the signal API; `timeout_s` bounds every call (seconds).

    `transport` lets tests answer without a server (httpx.MockTransport).
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token or None
        self.timeout_s = timeout_s
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s, transport=transport)

    def __enter__(self) -> SignalApiClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def login(self, client_id: str, client_secret: str, scope: str = SCOPE_READ) -> str:
        """POST /token (OAuth2 client credentials); keeps and returns the bearer token."""
        if not client_id or not client_secret:
            raise SignalApiError(
                None, "no_credentials", "a client id and a client secret are needed"
            )
        body = self._call(
            "POST",
            "/token",
            data={
                "grant_type": "client_credentials",
                "client_id": client_id,
                "client_secret": client_secret,
                "scope": scope,
            },
        )
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise SignalApiError(
                200, "bad_response", "POST /token answered without an access_token"
            )
        self.token = token
        return token

    def signal(self, symbol: str) -> dict[str, Any]:
        """GET /signal: the latest signal of `symbol`."""
        return self._object("/signal", {"symbol": symbol})

    def history(self, symbol: str | None, limit: int = 500) -> list[dict[str, Any]]:
        """GET /signals/history: served signals with outcomes, newest first (at most `limit`)."""
        params: dict[str, Any] = {"limit": limit}
        if symbol:
            params["symbol"] = symbol
        rows = self._object("/signals/history", params).get("signals")
        if not isinstance(rows, list):
            raise SignalApiError(200, "bad_response", "/signals/history answered without `signals`")
        return [row for row in rows if isinstance(row, dict)]

    def current_model(self) -> dict[str, Any]:
        """GET /models/current: version, metrics and data range of the serving model."""
        return self._object("/models/current", None)

    def _object(self, path: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
        if not self.token:
            raise SignalApiError(
                None, "not_logged_in", "log in first (client id and secret, or token)"
            )
        body = self._call(
            "GET", path, params=params, headers={"Authorization": f"Bearer {self.token}"}
        )
        if not isinstance(body, dict):
            raise SignalApiError(200, "bad_response", f"{path} did not answer with a JSON object")
        return body

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise SignalApiError(
                None, "timeout", f"{self.base_url}{path} gave no answer within {self.timeout_s:g} s"
            ) from None
        except httpx.HTTPError as error:
            raise SignalApiError(
                None,
                "unreachable",
                f"cannot reach {self.base_url} ({type(error).__name__}: {error})",
            ) from None
        if response.status_code >= 400:
            raise SignalApiError.from_response(response)
        try:
            body = response.json()
        except ValueError:
            body = None
        if body is None:
            raise SignalApiError(
                response.status_code, "bad_response", f"{path} did not answer JSON"
            )
        return body


def signal_outcome(record: Mapping[str, Any]) -> Outcome:
    """The realised outcome of a served signal (a /signals/history item).

    `none` for NEUTRAL (no position, nothing to score), `pending` until bar t+10 is in and the
    outcome filled, then `hit` or `miss` (the Gold store's `hit`).
    """
    if record.get("signal") not in SCORED_SIGNALS:
        return "none"
    if record.get("filled_at_ms") is None or record.get("hit") is None:
        return "pending"
    return "hit" if bool(record["hit"]) else "miss"


def signals_frame(history: Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    """/signals/history items as a frame, oldest first: `time` (the decision bar's open time,
    UTC), signal, confidence, p_up, close, realised_return, pnl_bps and `outcome`."""
    schema: dict[str, Any] = {
        "time": pl.Datetime("ms", "UTC"),
        "symbol": pl.String,
        "signal": pl.String,
        "confidence": pl.Float64,
        "p_up": pl.Float64,
        "close": pl.Float64,
        "realised_return": pl.Float64,
        "pnl_bps": pl.Float64,
        "model_version": pl.String,
        "outcome": pl.String,
    }
    rows = [
        {
            "time": datetime.fromtimestamp(int(item["bar_open_time_ms"]) / 1000, tz=UTC),
            "symbol": item.get("symbol"),
            "signal": item.get("signal"),
            "confidence": _float_or_none(item.get("confidence")),
            "p_up": _float_or_none(item.get("p_up")),
            "close": _float_or_none(item.get("close")),
            "realised_return": _float_or_none(item.get("realised_return")),
            "pnl_bps": _float_or_none(item.get("pnl_bps")),
            "model_version": item.get("model_version"),
            "outcome": signal_outcome(item),
        }
        for item in history
        if item.get("bar_open_time_ms") is not None
    ]
    return pl.DataFrame(rows, schema=schema).sort("time")


def outcome_counts(signals: pl.DataFrame) -> dict[str, int]:
    """Number of BUY/SELL signals per outcome (hit, miss, pending) in a `signals_frame`."""
    counts: dict[str, int] = {name: 0 for name in OUTCOMES}
    for name, count in signals.group_by("outcome").len().iter_rows():
        if name in counts:
            counts[name] = int(count)
    return counts


def _float_or_none(value: object) -> float | None:
    """A finite float, or None for anything else (missing, NaN, text, booleans)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
