"""A sweep's run directory, its Ray Tune/Train storage and the registry on a real S3-compatible
store (SeaweedFS on loopback), against the same sweep on local disk.

- the sweep with `out` and the registry on `s3://` gives the same leaderboard as on local disk
  (same seed), leaves its records, report and Tune's experiment state on the store and nothing
  on local disk, and registers a model that the registry and Serve's production model load
  back from the store;
- a sweep interrupted (SIGINT, as Ctrl-C) after its first trial raises instead of scoring a
  partial sweep, and resumed from its storage on the store it ends with the same leaderboard
  as the undisturbed sweep.

The sweep is the smoke sweep cut down to two one-epoch trials on one fold of one symbol.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from configs.schema import ServeConfig, SimConfig, TuneJobConfig
from market.sim_silver import write_sim_silver
from models.artifact import load_registered
from models.registry import PRODUCTION, ModelRegistry
from models.runs import BUY_AND_HOLD, RunDir
from models.selection import run_selection
from models.sweep import EXPERIMENT_NAME, SweepInterruptedError
from serve.engine.production import ProductionModel
from tests.object_store import ObjectStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "tune" / "smoke.yaml"
SYMBOL = "SIMAAA"
BOARD_COLUMNS = ["trial_index", "status", "iterations", "score", "val_loss", "family"]


def tiny_job() -> TuneJobConfig:
    smoke: dict[str, Any] = yaml.safe_load(SMOKE.read_text())
    smoke.update(num_samples=2, max_epochs=1, asha=False, max_train_windows=1500)
    smoke["search"].update(window_bars=[16], hidden_size=[8])
    smoke["folds"].update(train_bars=2500, val_bars=600, test_bars=1200, max_folds=1)
    return TuneJobConfig.model_validate(smoke)


def board(run: RunDir) -> pd.DataFrame:
    """The leaderboard by trial index (trial ids carry an experiment-specific prefix)."""
    frame = run.read_leaderboard()
    frame["trial_index"] = frame["trial_id"].str.split("_").str[-1]
    return frame.sort_values("trial_index")[BOARD_COLUMNS].reset_index(drop=True)


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lake = tmp_path_factory.mktemp("lake")
    config = SimConfig(seed=3, anchor_date=date(2024, 1, 1), signal_strength=0.3, gap_rate=0.0)
    write_sim_silver(lake, config, [SYMBOL], 4)
    return lake


@pytest.fixture(scope="module")
def local_board(lake: Path, ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("local_sweep")
    run_selection(str(lake), str(root / "registry"), tiny_job(), root / "out", progress=_quiet)
    return board(RunDir(root / "out"))


def _quiet(line: str) -> None:
    pass


def test_a_sweep_on_the_object_store_equals_the_local_one_and_its_model_serves_from_there(
    lake: Path,
    local_board: pd.DataFrame,
    object_store: ObjectStore,
    object_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out, registry_uri = object_store.uri(f"{object_prefix}/run"), object_store.uri(object_prefix)
    registry_uri += "/registry"
    monkeypatch.chdir(tmp_path)
    result = run_selection(
        str(lake),
        registry_uri,
        tiny_job(),
        out,
        object_store=object_store.config,
        progress=_quiet,
    )
    run = RunDir(out, object_store.config)
    pd.testing.assert_frame_equal(board(run), local_board)
    assert result.summary["leaderboard"] == f"{out}/leaderboard.parquet"
    assert run.report.read_text().startswith("<!DOCTYPE html>")
    assert run.reference(BUY_AND_HOLD).has_record() and len(run.reference_names()) > 1
    best = run.trial(result.summary["best_trial"])
    assert best.has_record() and best.config.is_file() and (best.fold(0) / "model.pt").is_file()
    # Tune's and Train's storage went to the store too, so every node of a cluster sees it.
    assert (run.tune_storage / EXPERIMENT_NAME).is_dir() and run.train_storage.is_dir()
    assert list(tmp_path.iterdir()) == [], "nothing local named like the URI"

    version = result.gate.version
    assert version is not None
    registry = ModelRegistry(registry_uri, object_store=object_store.config)
    assert registry.versions("signal") == [version]
    assert registry.metadata("signal", version)["trial_id"] == best.trial_id
    model = load_registered(registry, "signal", version)
    assert model.spec.window_bars == 16
    if not result.gate.promoted:
        registry.set_alias("signal", PRODUCTION, version, "test", action="override")
    assert registry.get_alias("signal", PRODUCTION) == version
    # Serve reaches the store through the standard AWS environment.
    for key, value in object_store.environment.items():
        monkeypatch.setenv(key, value)
    production = ProductionModel(ServeConfig(registry=registry_uri))
    serving = production.fetch()
    assert serving is not None and serving.version == version, production.load_error


def test_an_interrupted_sweep_resumes_from_the_object_store_to_the_undisturbed_leaderboard(
    lake: Path,
    local_board: pd.DataFrame,
    object_store: ObjectStore,
    object_prefix: str,
) -> None:
    out, registry_uri = object_store.uri(f"{object_prefix}/run"), object_store.uri(object_prefix)
    registry_uri += "/registry"
    run = RunDir(out, object_store.config)
    job = tiny_job()

    def interrupt_after_the_first_trial() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if any(
                RunDir(out, object_store.config).trial(t.name).has_record()
                for t in run.trials.iterdir()
            ):
                # What Ctrl-C does: Tune saves the experiment's state and returns early.
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=interrupt_after_the_first_trial, daemon=True)
    watcher.start()
    with pytest.raises(SweepInterruptedError, match="--resume"):
        run_selection(
            str(lake), registry_uri, job, out, object_store=object_store.config, progress=_quiet
        )
    watcher.join()
    assert not run.has_leaderboard()
    registry = ModelRegistry(registry_uri, object_store=object_store.config)
    assert not registry.exists() or registry.versions("signal") == [], "nothing registered"

    result = run_selection(
        str(lake),
        registry_uri,
        job,
        out,
        resume=True,
        object_store=object_store.config,
        progress=_quiet,
    )
    pd.testing.assert_frame_equal(board(run), local_board)
    assert result.summary["trials"] == job.num_samples
