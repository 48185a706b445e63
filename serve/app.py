"""The Ray Serve application: a FastAPI ingress composed with the signal engine shards and
the `/predict` deployment.

    SignalIngress (FastAPI, JWT, rate limit)  --handles->  SignalEngineDeployment x shards
        answers /signal from a snapshot in memory,        each: its share of the symbols'
        merged from every shard's, refreshed every        live bars, its model copy, Gold
        `snapshot_poll_s`;                                writes, registry watch
        operator port (serve.operator): /metrics and
        the detailed /readyz, one listener per replica
                                              --handle-->  PredictDeployment
        /predict                                           its own replicas and copy of the
                                                           production model, registry watch

`/predict` never reaches the engine: a flood of client bars cannot delay the snapshots `/signal`
reads. Its replicas run at most `predict.max_ongoing_requests` each; past that each ingress
replica queues `predict.max_queued_requests` and refuses the rest with 503 `busy`.

`build_app(config)` returns the bound application for `serve.run`; `app_builder(args)` is the
import path for a Serve config file (`serve deploy` / `serve run configs/serve/...`), taking the
ServeConfig YAML path as its argument. Nothing runs at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import ray
import torch
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from configs.schema import REVEAL_SECRETS, ServeConfig, load_config
from market.bar_columns import BarColumns
from serve.api.apps import make_apps
from serve.engine.engine import SignalEngine
from serve.engine.production import ProductionModel
from serve.engine.shards import ShardPlan
from serve.engine.snapshot import (
    EngineSnapshot,
    InvalidBarsError,
    NoModelError,
    PredictBusyError,
    Signal,
    SnapshotUnchanged,
    UnknownSymbolError,
    merge_snapshots,
    unavailable_symbols,
)
from serve.operator import OperatorServer

log = logging.getLogger(__name__)

ENGINE_DEPLOYMENT = "SignalEngine"
PREDICT_DEPLOYMENT = "Predict"
POLARS_THREADS_ENV = "POLARS_MAX_THREADS"
INGRESS_DEPLOYMENT = "SignalIngress"
# How long the ingress waits for one engine shard's answer (seconds): a shard without a live
# replica (Serve queues calls until one is up) must not hold up the ingress' start-up, the other
# shards' snapshots or the all-symbols history.
ENGINE_CALL_TIMEOUT_S = 10.0


@serve.deployment(name=ENGINE_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0})
class SignalEngineDeployment:
    """Owns the SignalEngine; a background task keeps bars, signals and the model current."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = ServeConfig.model_validate(config)
        self.engine = SignalEngine(self.config)
        self.engine.refresh_model()
        self._task: asyncio.Task[None] | None = None
        with contextlib.suppress(RuntimeError):  # no running loop: started on first call
            self._ensure_loop()

    def _ensure_loop(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        next_registry_check = 0.0
        while True:
            try:
                now = time.monotonic()
                if now >= next_registry_check:
                    await asyncio.to_thread(self.engine.refresh_model)
                    next_registry_check = now + self.config.registry_poll_s
                await asyncio.to_thread(self.engine.tick)
            except Exception:  # the loop must outlive any one bad tick; the next one retries
                log.exception("engine tick failed")
            await asyncio.sleep(self.config.engine.tick_interval_s)

    async def snapshot(
        self, held_sequence: int | None = None
    ) -> EngineSnapshot | SnapshotUnchanged:
        """The engine's snapshot, or SnapshotUnchanged when the caller's (`held_sequence`) is
        still current: thousands of symbols' states cross the handle only when they changed."""
        self._ensure_loop()
        snapshot = self.engine.snapshot()
        if held_sequence is not None and snapshot.sequence == held_sequence:
            return SnapshotUnchanged(self.engine.clock())
        return snapshot

    def history(self, symbol: str | None, limit: int) -> list[dict[str, Any]]:
        return self.engine.history(symbol, limit)

    async def check_health(self) -> None:
        self._ensure_loop()
        if self._task is not None and self._task.done():
            raise RuntimeError("the engine loop stopped")


@serve.deployment(name=PREDICT_DEPLOYMENT, ray_actor_options={"num_cpus": 0})
class PredictDeployment:
    """Answers `/predict`: its own copy of the production model, following the registry's
    alias as the engine does (`ProductionModel`), and features from the batch engine.

    Predictions run in worker threads, so the replica's event loop stays free for the registry
    watch and Serve's health checks however long a forward takes.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = ServeConfig.model_validate(config)
        # This process only answers /predict, one small request at a time per thread (polars'
        # pool is sized from the environment build_app gives the replica).
        torch.set_num_threads(self.config.predict.threads)
        self.model = ProductionModel(self.config)
        self.model.refresh()
        self._task: asyncio.Task[None] | None = None
        with contextlib.suppress(RuntimeError):  # no running loop: started on first call
            self._ensure_loop()

    def _ensure_loop(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch_registry())

    async def _watch_registry(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.model.refresh)
            except Exception:  # the watch must outlive any one failed check; the next retries
                log.exception("registry check failed")
            await asyncio.sleep(self.config.registry_poll_s)

    async def predict(self, symbol: str, bars: BarColumns) -> Signal:
        self._ensure_loop()
        return await asyncio.to_thread(self.model.predict, symbol, bars)

    async def check_health(self) -> None:
        self._ensure_loop()
        if self._task is not None and self._task.done():
            raise RuntimeError("the registry watch stopped")


class HandleBackend:
    """The ingress' view of the engine shards, one snapshot merged from each shard's, refreshed
    in the background over their handles, and of the `/predict` deployment.

    Each shard is polled by a task of its own, so a slow or restarting shard delays only its own
    symbols: the merged snapshot keeps that shard's last snapshot (its symbols turn stale as it
    ages, `merge_snapshots`) and, before its first one, lists its symbols as not ready.
    """

    def __init__(
        self,
        engines: Sequence[DeploymentHandle],
        predictor: DeploymentHandle,
        poll_s: float,
        plan: ShardPlan,
    ) -> None:
        if len(engines) != plan.count:
            raise ValueError(f"{plan.count} engine shards planned, {len(engines)} handles given")
        self.engines = tuple(engines)
        self.predictor = predictor
        self.poll_s = poll_s
        self.plan = plan
        self._order = tuple(symbol for owned in plan.symbols for symbol in owned)
        self._parts: list[EngineSnapshot | None] = [None] * plan.count
        self._snapshot: EngineSnapshot | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def snapshot(self) -> EngineSnapshot | None:
        return self._snapshot

    def _merge(self) -> None:
        reported = [part for part in self._parts if part is not None]
        if not reported:
            return
        unavailable = [
            state
            for shard, part in enumerate(self._parts)
            if part is None
            for state in unavailable_symbols(
                self.plan.symbols[shard], f"engine shard {shard} has not reported yet"
            )
        ]
        self._snapshot = merge_snapshots(
            reported,
            symbol_order=self._order if len(self.engines) > 1 else (),
            unavailable=unavailable,
        )

    async def _fetch(self, shard: int) -> None:
        held = self._parts[shard]
        try:
            answer = await asyncio.wait_for(
                self.engines[shard].snapshot.remote(held.sequence if held else None),
                ENGINE_CALL_TIMEOUT_S,
            )
        except Exception as error:  # the shard restarts: keep its last snapshot meanwhile
            log.warning("engine shard %d snapshot failed: %s", shard, error)
            return
        if isinstance(answer, SnapshotUnchanged):
            if held is None:
                return
            # Confirmed current: its age restarts from the engine's check.
            answer = held.restated(max(answer.checked_at, held.taken_at))
        self._parts[shard] = answer
        self._merge()

    async def _refresh(self, shard: int) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self._fetch(shard)

    async def start(self) -> None:
        await asyncio.gather(*(self._fetch(shard) for shard in range(len(self.engines))))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._refresh(shard)) for shard in range(len(self.engines))]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def predict(self, symbol: str, bars: BarColumns) -> Signal:
        """The `/predict` deployment's signal for client bars; InvalidBarsError (its client
        message only) when it cannot use them, NoModelError when it has no model, and
        PredictBusyError when its replicas are busy and this replica's queue for them is full.
        Any other failure is raised as it came."""
        try:
            result: Signal = await self.predictor.predict.remote(symbol, bars)
        except BackPressureError as error:
            raise PredictBusyError(error.retry_after_s or 1.0) from None
        except RayTaskError as error:
            # The handle raises the replica's exception as a RayTaskError that is also an instance
            # of its class, but whose text is the remote traceback (frames, server paths): hand on
            # the original exception, whose message is the one meant for the client.
            if isinstance(error.cause, InvalidBarsError | NoModelError):
                raise error.cause from None
            raise
        return result

    async def history(self, symbol: str | None, limit: int) -> list[dict[str, Any]]:
        """Served signals, newest first: from the owner shard of `symbol`, or when it is None
        the newest `limit` across every shard's own symbols (by decision bar, then by when
        served). A shard that fails or does not answer within `ENGINE_CALL_TIMEOUT_S` is left
        out of the latter (logged): its symbols are missing, the others' are listed; only when
        every shard fails is its error raised."""
        if symbol is not None:
            owner = self.plan.owner(symbol)
            if owner is None:
                raise UnknownSymbolError(symbol)
            return await self._history(owner, symbol, limit)
        answers = await asyncio.gather(
            *(self._history(shard, None, limit) for shard in range(len(self.engines))),
            return_exceptions=True,
        )
        parts = [answer for answer in answers if not isinstance(answer, BaseException)]
        if not parts:
            error = answers[0]
            assert isinstance(error, BaseException)
            raise error
        for shard, answer in enumerate(answers):
            if isinstance(answer, BaseException):
                log.warning("engine shard %d history failed: %r", shard, answer)
        merged = [item for part in parts for item in part]
        merged.sort(key=lambda item: (item["bar_open_time_ms"], item["served_at_ms"]), reverse=True)
        return merged[:limit]

    async def _history(self, shard: int, symbol: str | None, limit: int) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await asyncio.wait_for(
            self.engines[shard].history.remote(symbol, limit), ENGINE_CALL_TIMEOUT_S
        )
        return result


@serve.deployment(name=INGRESS_DEPLOYMENT, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class SignalIngress:
    """The FastAPI ingress: auth, rate limits and metrics here; signals from the snapshot.

    Each replica serves its metrics and detailed readiness on an operator port of its own
    (`serve.operator`), started here so that a range without a free port fails the replica
    with `OperatorPortError`, and stopped by `__del__`, which Serve calls when it stops the
    replica.
    """

    def __init__(
        self,
        engines: list[DeploymentHandle],
        predictor: DeploymentHandle,
        config: dict[str, Any],
    ) -> None:
        self.config = ServeConfig.model_validate(config)
        self.backend = HandleBackend(
            engines, predictor, self.config.snapshot_poll_s, ShardPlan.of(self.config)
        )
        self.apps = make_apps(self.backend, self.config)
        context = serve.get_replica_context()
        self.operator = OperatorServer(
            self.apps.operator,
            self.config.operator,
            labels={
                "service": "quant-ai",
                "app": context.app_name,
                "deployment": context.deployment,
                "replica": context.replica_id.unique_id,
            },
            node_ip=ray.util.get_node_ip_address(),
        )
        self.operator.start()

    def __serve_build_asgi_app__(self) -> Any:
        return self.apps.api

    def __del__(self) -> None:
        # Also reached by garbage collection of a replica whose constructor failed early.
        operator: OperatorServer | None = getattr(self, "operator", None)
        if operator is not None:
            operator.stop()


def engine_deployment_name(shard: int, shards: int) -> str:
    """The Serve deployment of engine shard `shard` of `shards`: `SignalEngine` when there is
    one, else `SignalEngine-<shard>` (a shard's name is its identity across restarts)."""
    return ENGINE_DEPLOYMENT if shards == 1 else f"{ENGINE_DEPLOYMENT}-{shard}"


def replica_args(config: ServeConfig) -> dict[str, Any]:
    """`config` as the plain mapping a deployment is bound with, the object store's secret key
    in clear: the driver resolved it (config or environment) once, and a replica on another
    node must reach the same registry whatever its own environment holds."""
    return config.model_dump(mode="json", context={REVEAL_SECRETS: True})


def build_app(config: ServeConfig) -> Any:
    """The bound Serve application (engine shards + predictor + ingress) for `serve.run`.

    Each engine shard is a deployment of one replica bound with its share of the feed's symbols
    (`serve.engine.shards`): Serve's replicas of one deployment are interchangeable, so a shard
    that owns particular symbols is a deployment of its own."""
    data = replica_args(config)
    plan = ShardPlan.of(config)
    engines = [
        SignalEngineDeployment.options(  # type: ignore[attr-defined]
            name=engine_deployment_name(shard, plan.count),
            ray_actor_options={"num_cpus": config.engine.cpus_per_shard},
        ).bind(replica_args(plan.shard_config(config, shard)))
        for shard in range(plan.count)
    ]
    predictor = PredictDeployment.options(  # type: ignore[attr-defined]
        num_replicas=config.predict.replicas,
        max_ongoing_requests=config.predict.max_ongoing_requests,
        max_queued_requests=config.predict.max_queued_requests,
        ray_actor_options={
            "num_cpus": config.predict.cpus_per_replica,
            # Read once, when polars starts its pool: it must be in the process' environment.
            "runtime_env": {"env_vars": {POLARS_THREADS_ENV: str(config.predict.threads)}},
        },
    ).bind(data)
    ingress = SignalIngress.options(  # type: ignore[attr-defined]
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.ingress_cpus},
    )
    return ingress.bind(engines, predictor, data)


def app_builder(args: dict[str, str]) -> Any:
    """Entry point for Serve config files: `import_path: serve.app:app_builder`,
    `args: {config: configs/serve/local.yaml}`."""
    return build_app(load_config(args.get("config", "configs/serve/local.yaml"), ServeConfig))
