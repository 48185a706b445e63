"""The API on plain uvicorn: the engine in-process, driven by a background thread.

For the benchmark's "plain FastAPI" side and for single-process use without Ray. The handler code
is the same `make_api` the Serve ingress runs; only the backend differs. `/predict` is routed as
on Serve: never through the engine thread that builds the snapshots, but on worker threads with
the engine's production model, at most `predict.max_ongoing_requests +
predict.max_queued_requests` at once, the rest refused with 503 `busy`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import torch

from configs.schema import ServeConfig
from market.bar_columns import BarColumns
from serve.api.apps import ApiApps, make_apps
from serve.api.ratelimit import ConcurrencyLimit
from serve.engine.engine import SignalEngine
from serve.engine.snapshot import EngineSnapshot, PredictBusyError, Signal

log = logging.getLogger(__name__)


class LocalBackend:
    """Runs a SignalEngine in this process; the snapshot is refreshed by the engine thread."""

    def __init__(self, engine: SignalEngine, tick_s: float = 0.5) -> None:
        self.engine = engine
        self.tick_s = tick_s
        self._snapshot: EngineSnapshot | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        predict = engine.config.predict
        # The process answers /predict, one window per forward; the engine's batched forward
        # shares the setting (PredictConfig.threads; polars' pool is sized by
        # POLARS_MAX_THREADS in the environment the process starts with).
        torch.set_num_threads(predict.threads)
        self._predictions = ConcurrencyLimit(
            predict.max_ongoing_requests + predict.max_queued_requests
        )

    def snapshot(self) -> EngineSnapshot | None:
        return self._snapshot

    def step(self, check_registry: bool = True) -> None:
        """One engine round: registry, feed, snapshot (the thread's body; tests call it)."""
        if check_registry:
            self.engine.refresh_model()
        self.engine.tick()
        self._snapshot = self.engine.snapshot()

    def _run(self) -> None:
        next_registry_check = 0.0
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                check = now >= next_registry_check
                if check:
                    next_registry_check = now + self.engine.config.registry_poll_s
                self.step(check_registry=check)
            except Exception:  # keep serving the last snapshot; the next round retries
                log.exception("engine round failed")
            self._stop.wait(self.tick_s)

    async def start(self) -> None:
        await asyncio.to_thread(self.step)
        self._thread = threading.Thread(target=self._run, name="signal-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)

    async def predict(self, symbol: str, bars: BarColumns) -> Signal:
        if not self._predictions.try_acquire():
            raise PredictBusyError()
        try:
            return await asyncio.to_thread(self.engine.predict, symbol, bars)
        finally:
            self._predictions.release()

    async def history(self, symbol: str | None, limit: int) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.engine.history, symbol, limit)


def make_local_apps(config: ServeConfig, engine: SignalEngine | None = None) -> ApiApps:
    """The public app and the operator app over an in-process engine, sharing one metrics
    registry; serve them on two ports (`serve.operator.OperatorServer` runs the operator app
    beside a uvicorn of the public one)."""
    return make_apps(LocalBackend(engine or SignalEngine(config)), config)


def make_local_api(config: ServeConfig, engine: SignalEngine | None = None) -> Any:
    """The public FastAPI app over an in-process engine (serve it with uvicorn)."""
    return make_local_apps(config, engine).api
