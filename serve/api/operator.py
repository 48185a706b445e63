"""The operator app: what operators and Prometheus read, kept off the public API port.

    GET /metrics   Prometheus text exposition of the replica's `ApiMetrics` (the request
                   metrics the public app counts, and the engine snapshot's figures)
    GET /readyz    the detailed readiness (`ReadyDetail`): 200 when ready, else 503, same body
    GET /healthz   liveness of the operator listener itself

It runs on the operator port of each ingress replica (`serve.operator`), never on the public
port. Its own requests are not counted: scrapes are not API traffic.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.api.metrics import MEDIA_TYPE, ApiMetrics
from serve.api.readiness import ReadyDetail, assess
from serve.api.routes import routing_error
from serve.api.schemas import Health
from serve.engine.snapshot import EngineSnapshot

OPERATOR_ROUTES = ("/metrics", "/readyz", "/healthz")


def make_operator_api(
    snapshot: Callable[[], EngineSnapshot | None],
    metrics: ApiMetrics,
    *,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The operator app over the replica's snapshot source and its `metrics`."""
    api = FastAPI(
        title="Quant-AI operator endpoint",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    api.add_exception_handler(StarletteHTTPException, routing_error)  # type: ignore[arg-type]

    @api.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition",
                "content": {MEDIA_TYPE: {"schema": {"type": "string"}}},
            }
        },
    )
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=MEDIA_TYPE)

    @api.get(
        "/readyz",
        response_model=ReadyDetail,
        responses={503: {"model": ReadyDetail, "description": "not ready; `problems` say why"}},
    )
    async def readyz() -> JSONResponse:
        detail = assess(snapshot(), clock())
        return JSONResponse(detail.model_dump(), status_code=200 if detail.ready else 503)

    @api.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(status="ok")

    return api
