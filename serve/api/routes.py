"""The HTTP API of DESIGN.md §5 as a FastAPI app over a `Backend`.

The same app runs as the Ray Serve ingress (backend: a handle to the engine deployment, with a
snapshot refreshed in the background) and on plain uvicorn (backend: an engine in-process), so
the benchmark compares one handler behind two servers. `/signal` is answered from the snapshot in
memory: no remote call, no model forward per request.

Every error is JSON `{"error": CODE, "detail": "..."}` with the status of DESIGN.md §5; nothing
reaches a client as a stack trace.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, Protocol

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from configs.schema import SYMBOL_PATTERN, ServeConfig
from market.klines import ONE_MINUTE_MS
from serve.api.auth import AuthError, Claims, TokenService
from serve.api.clients import ClientStore
from serve.api.metrics import ApiMetrics
from serve.api.ratelimit import RateLimiter

log = logging.getLogger(__name__)

READ_SCOPE = "signals:read"
PREDICT_SCOPE = "signals:predict"
ROUTES = (
    "/token",
    "/signal",
    "/predict",
    "/signals/history",
    "/models/current",
    "/healthz",
    "/readyz",
    "/metrics",
)


class Backend(Protocol):
    """What the API needs from the engine, wherever it runs."""

    def snapshot(self) -> dict[str, Any] | None:
        """The latest engine snapshot held in memory (None before the first one)."""

    async def predict(self, symbol: str, bars: list[dict[str, Any]]) -> dict[str, Any]:
        """A signal for client-supplied bars; raises ValueError for unusable bars."""

    async def history(self, symbol: str | None, limit: int) -> list[dict[str, Any]]:
        """Served signals, newest first."""

    async def start(self) -> None:
        """Begin keeping the snapshot current."""

    async def stop(self) -> None:
        """Stop background work."""


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


class BarIn(BaseModel):
    """One closed 1-minute bar supplied to `/predict`; `open_time` in epoch milliseconds."""

    model_config = ConfigDict(extra="forbid")

    open_time: int = Field(ge=0)
    open: float = Field(gt=0)
    high: float = Field(gt=0)
    low: float = Field(gt=0)
    close: float = Field(gt=0)
    volume: float = Field(ge=0)
    quote_volume: float = Field(ge=0)
    trades: int = Field(ge=0)
    taker_buy_base: float = Field(ge=0)
    taker_buy_quote: float = Field(ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> BarIn:
        if self.high < max(self.open, self.close, self.low) or self.low > min(
            self.open, self.close
        ):
            raise ValueError(f"bar {self.open_time}: OHLC inconsistent")
        if self.taker_buy_base > self.volume:
            raise ValueError(f"bar {self.open_time}: taker_buy_base exceeds volume")
        return self


class PredictIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    symbol: str = Field(pattern=SYMBOL_PATTERN)
    bars: list[BarIn] = Field(min_length=1)

    @model_validator(mode="after")
    def _consecutive(self) -> PredictIn:
        times = [bar.open_time for bar in self.bars]
        for earlier, later in itertools.pairwise(times):
            if later - earlier != ONE_MINUTE_MS:
                raise ValueError(
                    "bars must be consecutive 1-minute bars in time order "
                    f"(open_time {earlier} is followed by {later})"
                )
        return self


class MetricsMiddleware:
    """Pure ASGI middleware: request count and latency by route template, method and status."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope.get("path", "")
            # A fixed label set: arbitrary paths must not create new time series.
            route = path if path in ROUTES else "other"
            self.metrics.observe(route, scope["method"], status, time.perf_counter() - started)


def make_api(
    backend: Backend,
    config: ServeConfig,
    tokens: TokenService,
    clients: ClientStore,
    *,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The FastAPI app of the signal API over `backend`."""
    limiter = RateLimiter(config.auth.rate_limit_per_minute, config.auth.rate_limit_burst)
    metrics = ApiMetrics(backend.snapshot, clock)

    async def lifespan(_: FastAPI) -> Any:
        await backend.start()
        try:
            yield
        finally:
            await backend.stop()

    api = FastAPI(
        title="Quant-AI signal API",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @api.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.code, error.detail, error.headers)

    @api.exception_handler(AuthError)
    async def _auth_error(_: Request, error: AuthError) -> JSONResponse:
        metrics.auth_failures.labels(error.code).inc()
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return error_response(error.status, error.code, error.detail, headers)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", _describe(error.errors()))

    @api.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(
            error.status_code, codes.get(error.status_code, "http_error"), str(error.detail)
        )

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal_error", "internal error; see the service log")

    def authorise(request: Request, scope: str) -> Claims:
        claims = tokens.verify(request.headers.get("authorization"), scope)
        retry_after = limiter.check(f"sub:{claims.subject}")
        if retry_after is not None:
            raise ApiError(
                429,
                "rate_limited",
                f"rate limit of {config.auth.rate_limit_per_minute:g} requests per minute exceeded",
                {"Retry-After": str(max(1, math.ceil(retry_after)))},
            )
        return claims

    def snapshot_or_503() -> dict[str, Any]:
        snap = backend.snapshot()
        if snap is None:
            raise ApiError(503, "not_ready", "the signal engine has not reported yet")
        return snap

    @api.post("/token")
    async def token(request: Request) -> JSONResponse:
        body = await _read_body(request, 8192)
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        fields = {key: values[0] for key, values in form.items() if values}
        if fields.get("grant_type") != "client_credentials":
            raise ApiError(422, "unsupported_grant_type", "grant_type must be client_credentials")
        client_id = fields.get("client_id", "")
        secret = fields.get("client_secret", "")
        if not client_id or not secret:
            raise ApiError(422, "invalid_request", "client_id and client_secret are required")
        if (retry_after := limiter.check(f"token:{client_id}")) is not None:
            raise ApiError(
                429,
                "rate_limited",
                "too many token requests",
                {"Retry-After": str(max(1, math.ceil(retry_after)))},
            )
        # scrypt costs ~50 ms of CPU: off the event loop.
        client = await run_in_threadpool(clients.authenticate, client_id, secret)
        requested = fields.get("scope", "").split()
        granted = [s for s in requested if s in client.scopes] if requested else client.scopes
        if requested and len(granted) != len(requested):
            raise AuthError(403, "insufficient_scope", "a requested scope is not granted")
        access_token, expires_in = tokens.mint(client.client_id, granted)
        return JSONResponse(
            {
                "access_token": access_token,
                "token_type": "bearer",
                "expires_in": expires_in,
                "scope": " ".join(granted),
            },
            headers={"Cache-Control": "no-store"},
        )

    @api.get("/signal")
    async def signal(
        request: Request, symbol: str = Query(pattern=SYMBOL_PATTERN)
    ) -> dict[str, Any]:
        authorise(request, READ_SCOPE)
        snap = snapshot_or_503()
        if symbol not in snap["symbols"]:
            raise ApiError(404, "unknown_symbol", f"{symbol} is not served; see /models/current")
        if not snap["model"]:
            raise ApiError(503, "no_model", snap.get("load_error") or "no production model")
        current = snap["signals"].get(symbol)
        if current is None:
            raise ApiError(503, "not_ready", f"no signal for {symbol} yet: waiting for bars")
        staleness, stale = staleness_of(snap, symbol, clock())
        if stale:
            return {
                **current,
                "signal": "NEUTRAL",
                "confidence": 0.0,
                "reason": f"stale features: no new bar for {staleness:.0f} s",
            }
        answer: dict[str, Any] = current
        return answer

    @api.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        authorise(request, PREDICT_SCOPE)
        body = await _read_body(request, config.max_body_bytes)
        try:
            payload = PredictIn.model_validate_json(body)
        except ValidationError as error:
            raise ApiError(422, "invalid_request", _describe(error.errors())) from None
        if len(payload.bars) > config.max_predict_bars:
            raise ApiError(
                422,
                "too_many_bars",
                f"{len(payload.bars)} bars supplied; at most {config.max_predict_bars}",
            )
        snap = snapshot_or_503()
        if not snap["model"]:
            raise ApiError(503, "no_model", snap.get("load_error") or "no production model")
        try:
            return await backend.predict(payload.symbol, [bar.model_dump() for bar in payload.bars])
        except ValueError as error:
            raise ApiError(422, "invalid_request", str(error)) from None

    @api.get("/signals/history")
    async def history(
        request: Request,
        symbol: str | None = Query(default=None, pattern=SYMBOL_PATTERN),
        limit: int = Query(default=100, ge=1, le=1000),
    ) -> dict[str, Any]:
        authorise(request, READ_SCOPE)
        snap = snapshot_or_503()
        if symbol is not None and symbol not in snap["symbols"]:
            raise ApiError(404, "unknown_symbol", f"{symbol} is not served")
        return {"symbol": symbol, "signals": await backend.history(symbol, limit)}

    @api.get("/models/current")
    async def current_model(request: Request) -> dict[str, Any]:
        authorise(request, READ_SCOPE)
        snap = snapshot_or_503()
        if not snap["model"]:
            raise ApiError(503, "no_model", snap.get("load_error") or "no production model")
        return {**snap["model"], "symbols": snap["symbols"], "reloads": snap["reloads"]}

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz() -> JSONResponse:
        snap = backend.snapshot()
        problems = []
        if snap is None:
            problems.append("the signal engine has not reported yet")
        else:
            if not snap["model"]:
                problems.append(snap.get("load_error") or "no production model loaded")
            for symbol in snap["symbols"]:
                staleness, stale = staleness_of(snap, symbol, clock())
                if stale:
                    problems.append(f"{symbol}: stale features ({staleness:.0f} s)")
        if problems:
            return error_response(503, "not_ready", "; ".join(problems))
        return JSONResponse({"status": "ready", "model_version": snap["model"]["version"]})  # type: ignore[index]

    @api.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    api.add_middleware(MetricsMiddleware, metrics=metrics)
    return api


def staleness_of(snap: dict[str, Any], symbol: str, now: float) -> tuple[float, bool]:
    """Seconds since `symbol`'s newest bar as of `now` (the snapshot's figure plus the
    snapshot's own age, so a stalled engine reads as stale too) and whether that is stale."""
    staleness = float(snap["staleness_s"].get(symbol, 0.0)) + max(0.0, now - snap["taken_at"])
    stale = bool(snap["stale"].get(symbol)) or staleness > float(snap["stale_after_s"])
    return staleness, stale


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(422, "invalid_request", "malformed Content-Length")
        if int(declared) > limit:
            raise ApiError(413, "payload_too_large", f"body over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _describe(errors: Any) -> str:
    """Validation errors as one line: where and what, never the offending input."""
    parts = []
    for error in list(errors)[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body",))
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else error.get("msg", ""))
    return "; ".join(parts) or "invalid request"
