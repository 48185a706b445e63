"""The HTTP API of DESIGN.md §5 as a FastAPI app over a `Backend`.

The same app runs as the Ray Serve ingress (backend: a handle to the engine deployment, with a
snapshot refreshed in the background) and on plain uvicorn (backend: an engine in-process), so
the benchmark compares one handler behind two servers. `/signal` is answered from the snapshot in
memory: no remote call, no model forward per request.

Every error is JSON `{"error": CODE, "detail": "..."}` (`schemas.ErrorBody`) with the status of
DESIGN.md §5; nothing reaches a client as a stack trace. Every answer has a response model in
`serve.api.schemas`, so the OpenAPI document states it and FastAPI checks it.

This is the public port: `/healthz` and a `/readyz` that says only ready or not (with a coarse
reason). Prometheus `/metrics` and the detailed readiness are on the operator port
(`serve.api.operator`), which shares this app's `ApiMetrics`.
"""

from __future__ import annotations

import logging
import math
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from configs.schema import SCOPE_PREDICT, SCOPE_READ, SYMBOL_PATTERN, ServeConfig
from market.bar_columns import BarColumns
from serve.api.auth import AuthError, Claims, TokenService
from serve.api.clients import ClientStore
from serve.api.metrics import ApiMetrics
from serve.api.predict_input import PredictIn, read_predict_body
from serve.api.ratelimit import ClientAddress, ConcurrencyLimit, RateLimiter
from serve.api.readiness import NOT_REPORTED, assess
from serve.api.schemas import (
    FORM,
    CurrentModel,
    ErrorBody,
    Health,
    HistoryOut,
    Ready,
    TokenOut,
    TokenRequest,
    error_responses,
    request_body,
)
from serve.engine.snapshot import (
    EngineSnapshot,
    InvalidBarsError,
    ModelInfo,
    NoModelError,
    PredictBusyError,
    Signal,
    SignalPendingError,
    UnknownSymbolError,
)

log = logging.getLogger(__name__)

# A failed model load is named, not described: its text holds server paths and exception details,
# which the engine logs for operators.
LOAD_FAILED = "the production model could not be loaded; see the service log"
INTERNAL_ERROR = "internal error; see the service log"
ROUTES = (
    "/token",
    "/signal",
    "/predict",
    "/signals/history",
    "/models/current",
    "/healthz",
    "/readyz",
)


class Backend(Protocol):
    """What the API needs from the engine, wherever it runs."""

    def snapshot(self) -> EngineSnapshot | None:
        """The latest engine snapshot held in memory (None before the first one)."""

    async def predict(self, symbol: str, bars: BarColumns) -> Signal:
        """A signal for a client's validated bars of `symbol`; raises InvalidBarsError, whose
        message is meant for the client, for unusable bars, NoModelError when the predictor has
        no model yet, and PredictBusyError when every predictor is busy and no more requests may
        wait. Any other exception is a server fault."""

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
    body = ErrorBody(error=code, detail=detail)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


async def routing_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    """A routing error (unknown path, method not allowed, ...) as `ErrorBody` JSON. Its headers
    are kept: a 405 must name the allowed methods (`Allow`)."""
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_response(
        error.status_code,
        codes.get(error.status_code, "http_error"),
        str(error.detail),
        dict(error.headers or {}),
    )


def no_model(error: NoModelError) -> ApiError:
    """The engine has no model to serve: 503, saying whether nothing is promoted yet or the last
    load failed."""
    return ApiError(503, "no_model", LOAD_FAILED if error.load_error else str(error))


class MetricsMiddleware:
    """Pure ASGI middleware: request count and latency by route template, method and status
    (unknown routes and non-standard methods each under one "other" label)."""

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
    metrics: ApiMetrics | None = None,
) -> FastAPI:
    """The public FastAPI app of the signal API over `backend`; requests are counted into
    `metrics` (a new `ApiMetrics` when None), which the operator app exposes."""
    limiter = RateLimiter(config.auth.rate_limit_per_minute, config.auth.rate_limit_burst)
    # POST /token is throttled by caller address, not by the client id it names: an id is the
    # caller's to choose (rotating ids would dodge a per-id limit) and a per-id limit would let
    # anyone lock a client out with wrong secrets.
    token_failures = RateLimiter(
        config.auth.token_rate_limit_per_minute_per_address,
        config.auth.token_rate_limit_burst_per_address,
    )
    verifications = ConcurrencyLimit(config.auth.token_max_concurrent_verifications)
    caller_address = ClientAddress(config.auth.trusted_proxies)
    if metrics is None:
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

    api.add_exception_handler(StarletteHTTPException, routing_error)  # type: ignore[arg-type]

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal_error", INTERNAL_ERROR)

    def authorise(request: Request, scope: str) -> Claims:
        # The client store's check runs on signed claims only, so forged tokens never reach it.
        claims = tokens.verify(
            request.headers.get("authorization"), scope, still_valid=clients.check_token
        )
        retry_after = limiter.check(f"sub:{claims.subject}")
        if retry_after is not None:
            raise ApiError(
                429,
                "rate_limited",
                f"rate limit of {config.auth.rate_limit_per_minute:g} requests per minute exceeded",
                {"Retry-After": str(max(1, math.ceil(retry_after)))},
            )
        return claims

    def authorised(scope: str) -> Callable[[Request], Awaitable[None]]:
        """A route dependency that authorises the caller for `scope`. FastAPI runs dependencies
        before it validates the route's own parameters, so a caller without a valid token gets
        401 (or 403, 429) whatever the query holds, never a 422."""

        async def dependency(request: Request) -> None:
            authorise(request, scope)

        return dependency

    def snapshot_or_503() -> EngineSnapshot:
        snap = backend.snapshot()
        if snap is None:
            raise ApiError(503, "not_ready", NOT_REPORTED)
        return snap

    def model_or_503(snap: EngineSnapshot) -> ModelInfo:
        try:
            return snap.require_model()
        except NoModelError as error:
            raise no_model(error) from None

    @api.post(
        "/token",
        response_model=TokenOut,
        responses=error_responses(401, 403, 413, 422, 429),
        openapi_extra=request_body(TokenRequest, FORM),
    )
    async def token(request: Request, response: Response) -> TokenOut:
        body = await _read_body(request, 8192)
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        fields = {key: values[0] for key, values in form.items() if values}
        if fields.get("grant_type") != "client_credentials":
            raise ApiError(422, "unsupported_grant_type", "grant_type must be client_credentials")
        client_id = fields.get("client_id", "")
        secret = fields.get("client_secret", "")
        if not client_id or not secret:
            raise ApiError(422, "invalid_request", "client_id and client_secret are required")
        peer = request.client.host if request.client else None
        address = caller_address.resolve(peer, request.headers.getlist("x-forwarded-for"))
        # Each secret check is an scrypt of 16 MiB and ~50 ms of CPU: a bounded number at once,
        # and the excess refused rather than queued.
        if not verifications.try_acquire():
            raise ApiError(
                429, "rate_limited", "too many token requests in progress", {"Retry-After": "1"}
            )
        try:
            # The attempt is charged before the check (concurrent attempts cannot overdraw) and
            # refunded when it succeeds: only failures count against an address.
            if (retry_after := token_failures.check(address)) is not None:
                raise ApiError(
                    429,
                    "rate_limited",
                    "too many failed token requests",
                    {"Retry-After": str(max(1, math.ceil(retry_after)))},
                )
            client = await run_in_threadpool(clients.authenticate, client_id, secret)
            token_failures.refund(address)
        finally:
            verifications.release()
        requested = fields.get("scope", "").split()
        granted = [s for s in requested if s in client.scopes] if requested else client.scopes
        if requested and len(granted) != len(requested):
            raise AuthError(403, "insufficient_scope", "a requested scope is not granted")
        access_token, expires_in = tokens.mint(client.client_id, granted)
        response.headers["Cache-Control"] = "no-store"
        return TokenOut(
            access_token=access_token,
            token_type="bearer",
            expires_in=expires_in,
            scope=" ".join(granted),
        )

    @api.get(
        "/signal",
        response_model=Signal,
        responses=error_responses(401, 403, 404, 422, 429, 503),
        dependencies=[Depends(authorised(SCOPE_READ))],
    )
    async def signal(symbol: str = Query(pattern=SYMBOL_PATTERN)) -> Signal:
        try:
            return snapshot_or_503().signal(symbol, clock())
        except UnknownSymbolError:
            raise ApiError(
                404, "unknown_symbol", f"{symbol} is not served; see /models/current"
            ) from None
        except NoModelError as error:
            raise no_model(error) from None
        except SignalPendingError as error:
            raise ApiError(503, "not_ready", str(error)) from None

    @api.post(
        "/predict",
        response_model=Signal,
        responses=error_responses(401, 403, 413, 422, 429, 503),
        dependencies=[Depends(authorised(SCOPE_PREDICT))],
        openapi_extra=request_body(PredictIn, "application/json"),
    )
    async def predict(request: Request) -> Signal:
        body = await _read_body(request, config.max_body_bytes)
        try:
            symbol, bars = read_predict_body(body)
        except ValidationError as error:
            raise ApiError(422, "invalid_request", _describe(error.errors())) from None
        if len(bars) > config.max_predict_bars:
            raise ApiError(
                422,
                "too_many_bars",
                f"{len(bars)} bars supplied; at most {config.max_predict_bars}",
            )
        model_or_503(snapshot_or_503())
        try:
            return await backend.predict(symbol, bars)
        except InvalidBarsError as error:
            raise ApiError(422, "invalid_request", str(error)) from None
        except NoModelError as error:
            raise no_model(error) from None
        except PredictBusyError as error:
            retry_after = str(max(1, math.ceil(error.retry_after_s)))
            raise ApiError(503, "busy", str(error), {"Retry-After": retry_after}) from None
        except Exception:
            # Answered here rather than by the catch-all handler, which re-raises into the server
            # after answering; the exception's text (a replica traceback) goes to the log only.
            log.exception("predict failed for %s", symbol)
            raise ApiError(500, "internal_error", INTERNAL_ERROR) from None

    @api.get(
        "/signals/history",
        response_model=HistoryOut,
        responses=error_responses(401, 403, 404, 422, 429, 503),
        dependencies=[Depends(authorised(SCOPE_READ))],
    )
    async def history(
        symbol: str | None = Query(default=None, pattern=SYMBOL_PATTERN),
        limit: int = Query(default=100, ge=1, le=1000),
    ) -> HistoryOut:
        snap = snapshot_or_503()
        if symbol is not None and symbol not in snap.symbol_names:
            raise ApiError(404, "unknown_symbol", f"{symbol} is not served")
        rows = await backend.history(symbol, limit)
        return HistoryOut.model_validate({"symbol": symbol, "signals": rows})

    @api.get(
        "/models/current",
        response_model=CurrentModel,
        responses=error_responses(401, 403, 429, 503),
        dependencies=[Depends(authorised(SCOPE_READ))],
    )
    async def current_model() -> CurrentModel:
        snap = snapshot_or_503()
        model = model_or_503(snap)
        return CurrentModel.of(model, tuple(snap.symbol_names), snap.reloads)

    @api.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(status="ok")

    @api.get("/readyz", response_model=Ready, responses=error_responses(503))
    async def readyz() -> Ready:
        # Ready or not, and a reason from a fixed set: the specifics (model version, symbols,
        # staleness, load errors) are for operators, on the operator port.
        readiness = assess(backend.snapshot(), clock())
        if not readiness.ready:
            raise ApiError(503, "not_ready", readiness.reason or "not ready")
        return Ready(status="ready")

    api.add_middleware(MetricsMiddleware, metrics=metrics)
    return api


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
