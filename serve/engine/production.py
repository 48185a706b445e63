"""The registry's production model, followed: loaded beside the old one and swapped whole.

`ProductionModel` is the one place a serving process loads models. The signal engine holds one
(it recomputes its symbols' signals on a swap) and so does each replica of the `/predict`
deployment (`serve.app.PredictDeployment`), so both follow the `production` alias the same way:
a promotion or a rollback is loaded and checked next to the model being served, then a single
reference is swapped, and a request in flight sees either the old model or the new one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from configs.schema import BacktestConfig, ServeConfig
from market.bar_columns import BarColumns
from market.features.spec import spec_hash
from models.artifact import LoadedModel, load_registered
from models.registry import PRODUCTION, ModelRegistry
from serve.engine.online_features import min_history_bars
from serve.engine.signals import compute_signal
from serve.engine.snapshot import InvalidBarsError, ModelInfo, Signal, require_loaded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingModel:
    """The model being served, with the registry facts `/models/current` shows."""

    version: str
    model: LoadedModel
    metadata: dict[str, Any]
    thresholds: BacktestConfig
    loaded_at_ms: int

    def info(self) -> ModelInfo:
        meta = self.metadata
        return ModelInfo(
            version=self.version,
            family=self.model.spec.family,
            window_bars=self.model.spec.window_bars,
            horizon_minutes=self.model.spec.horizon_bars,
            feature_spec_hash=meta.get("feature_spec_hash"),
            metrics=meta.get("metrics", {}),
            training_data_range=meta.get("training_data_range"),
            evaluated_range=meta.get("evaluated_range"),
            gate=meta.get("gate"),
            thresholds=self.thresholds,
            loaded_at_ms=self.loaded_at_ms,
        )


class ProductionModel:
    """The model the registry's `production` alias of `config.model_name` names, kept current.

    `serving` is None until a version loads; `load_error` says why the last load failed (None
    after a success); `reloads` counts swaps. `fetch` (slow: reads the registry and the
    artifact) and `install` are separate so that an owner can install under its own lock.
    """

    def __init__(self, config: ServeConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.registry = ModelRegistry(config.registry, object_store=config.object_store)
        self.spec_hash = spec_hash()
        self.serving: ServingModel | None = None
        self.load_error: str | None = None
        self.reloads = 0
        # Threads that have set torch's intra-op thread count (see `_use_compute_threads`).
        self._threads_set = threading.local()

    def fetch(self) -> ServingModel | None:
        """The version the alias names now, loaded and checked, when it is not the one being
        served; None when the alias has not moved, names nothing, or the new version cannot be
        served (then `load_error` says why, and the current model stays)."""
        name = self.config.model_name
        try:
            version = self.registry.get_alias(name, PRODUCTION)
        except Exception as error:  # a registry on shared storage can blip; keep serving
            log.warning("registry %s unreadable: %s", self.config.registry, error)
            return None
        current = self.serving.version if self.serving else None
        if version is None or version == current:
            return None
        try:
            metadata = self.registry.metadata(name, version)
            model = load_registered(self.registry, name, version)
            thresholds = self.config.backtest or BacktestConfig.model_validate(
                metadata.get("backtest", {})
            )
        except Exception as error:
            self.load_error = f"loading {name} {version} failed: {type(error).__name__}: {error}"
            log.error("%s; still serving %s", self.load_error, current)
            return None
        if metadata.get("feature_spec_hash") not in (None, self.spec_hash):
            self.load_error = (
                f"{name} {version} was trained on feature spec {metadata['feature_spec_hash']}, "
                f"this service computes {self.spec_hash}: refusing it (training/serving skew)"
            )
            log.error(self.load_error)
            return None
        return ServingModel(version, model, metadata, thresholds, int(self.clock() * 1000))

    def install(self, serving: ServingModel) -> None:
        """Serve `serving` from now on (one reference swapped)."""
        previous = self.serving.version if self.serving else None
        self.serving = serving
        self.load_error = None
        self.reloads += 1
        log.info("serving %s %s (was %s)", self.config.model_name, serving.version, previous)

    def refresh(self) -> bool:
        """Follow the production alias; True when a new version was swapped in."""
        serving = self.fetch()
        if serving is None:
            return False
        self.install(serving)
        return True

    def predict(self, symbol: str, bars: BarColumns) -> Signal:
        """The signal the serving model gives a window of bars of `symbol` supplied by a
        client (sorted by open time).

        Raises NoModelError, or InvalidBarsError when there are too few bars for the model."""
        serving = require_loaded(self.serving, self.load_error)
        self._use_compute_threads()
        needed = min_history_bars(serving.model.spec.window_bars)
        if len(bars) < needed:
            raise InvalidBarsError(
                f"{len(bars)} bars supplied; the model needs at least {needed} consecutive "
                f"1-minute bars ({serving.model.spec.window_bars} in its window plus warm-up)"
            )
        return compute_signal(
            symbol, bars, serving.model, serving.thresholds, serving.version, self.spec_hash
        )

    def _use_compute_threads(self) -> None:
        """Give the calling thread torch's intra-op thread count of the config
        (`predict.threads`), once per thread. OpenMP keeps that count per thread: set in the
        process' main thread, it leaves the worker threads predictions run on at one thread per
        core, and a forward there wakes a team whose idle members spin on the other cores
        (measured: 7.3 ms of CPU per 400-bar /predict forward on a worker thread against 0.4 ms
        with the count set in that thread)."""
        if not getattr(self._threads_set, "done", False):
            torch.set_num_threads(self.config.predict.threads)
            self._threads_set.done = True
