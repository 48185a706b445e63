"""The two apps of one API process: the public app and its operator app, over one backend.

They share one `ApiMetrics`: the public app counts its requests into it and the operator app
exposes it. Serve's ingress replicas (`serve.app`) and the in-process server (`serve.local`)
both build them here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import FastAPI

from configs.schema import ServeConfig
from serve.api.auth import TokenService
from serve.api.clients import ClientStore
from serve.api.metrics import ApiMetrics
from serve.api.operator import make_operator_api
from serve.api.routes import Backend, make_api


@dataclass(frozen=True)
class ApiApps:
    """The public app (API port) and the operator app (operator port) of one process."""

    api: FastAPI
    operator: FastAPI


def make_apps(backend: Backend, config: ServeConfig) -> ApiApps:
    """Both apps over `backend`: key material and the clients file are read here, so a
    missing key or an invalid clients file fails the caller at once."""
    tokens = TokenService.from_config(config.auth.jwt)
    clients = ClientStore.load(
        config.auth.clients_file, reload_interval_s=config.auth.clients_reload_interval_s
    )
    metrics = ApiMetrics(backend.snapshot, time.time)
    return ApiApps(
        api=make_api(backend, config, tokens, clients, metrics=metrics),
        operator=make_operator_api(backend.snapshot, metrics),
    )
