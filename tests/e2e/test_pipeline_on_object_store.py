"""The whole pipeline with every location on a real S3-compatible store (SeaweedFS on loopback).

`python -m jobs.pipeline --exit` with its lake, registry and sweep runs on `s3://`: the store's
endpoint comes from the pipeline YAML, its credentials from the standard AWS environment (the
two sources every job merges). Ingest -> Silver (RayDP) -> a small sweep and the gate -> the
registry -> Serve loading the promoted model from the store and answering `/signal` for every
symbol. Every artefact must be in the bucket and nothing on local disk under a name like a URI.

Then, in this process, the same sweep over the same Silver is interrupted (SIGINT, as Ctrl-C)
after its first trial, which must raise instead of scoring a partial sweep and register nothing;
resumed from its Ray Tune storage on the store (`Tuner.restore`) it must end with the
pipeline's undisturbed leaderboard (same seed).

The sweep is the smoke sweep cut to two two-epoch trials on one fold; its gate asks only that
the best candidate beat every reference (this test is about storage, not the gate's power; on
these six simulated days the best scores 80 against the best reference's 54).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs as pafs
import pytest
import yaml

from cluster.ray_runtime import connect, free_port, shutdown
from configs.schema import RayConfig, TuneJobConfig
from models.registry import PRODUCTION, ModelRegistry
from models.runs import BUY_AND_HOLD, RunDir
from models.selection import run_selection
from models.sweep import EXPERIMENT_NAME, SweepInterruptedError
from tests.conftest import REPO
from tests.object_store import ObjectStore

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SYMBOLS = ["SIMBTC", "SIMETH"]
BOARD_COLUMNS = ["trial_index", "status", "iterations", "score", "val_loss", "family"]


def small_sweep() -> dict[str, Any]:
    smoke: dict[str, Any] = yaml.safe_load((REPO / "configs/tune/smoke.yaml").read_text())
    smoke.update(num_samples=2, max_epochs=2, asha=False, max_train_windows=3000)
    smoke["search"].update(window_bars=[16], hidden_size=[8])
    smoke["folds"].update(train_bars=2500, val_bars=600, test_bars=1200, max_folds=1)
    smoke["gate"].update(min_dsr=0.0, min_trades=0)
    return smoke


def board(run: RunDir) -> pd.DataFrame:
    """The leaderboard by trial index (trial ids carry an experiment-specific prefix)."""
    frame = run.read_leaderboard()
    frame["trial_index"] = frame["trial_id"].str.split("_").str[-1]
    return frame.sort_values("trial_index")[BOARD_COLUMNS].reset_index(drop=True)


@dataclass(frozen=True)
class PipelineOnStore:
    directory: Path
    prefix: str
    summary: dict[str, Any]
    tune: TuneJobConfig
    stderr: str


def write_configs(directory: Path, store: ObjectStore, prefix: str) -> Path:
    serve: dict[str, Any] = yaml.safe_load((REPO / "configs/serve/local.yaml").read_text())
    serve["port"] = free_port()
    serve["auth"]["jwt"]["secret_env"] = "QUANT_AI_E2E_UNSET_SECRET"
    serve["auth"]["jwt"]["secret_file"] = str(directory / "secrets" / "jwt_secret")
    serve["auth"]["clients_file"] = str(directory / "secrets" / "clients.yaml")
    (directory / "serve.yaml").write_text(yaml.safe_dump(serve))
    (directory / "tune.yaml").write_text(yaml.safe_dump(small_sweep()))
    pipeline: dict[str, Any] = yaml.safe_load((REPO / "configs/pipeline/local.yaml").read_text())
    pipeline.update(
        lake=store.uri(f"{prefix}/lake"),
        registry=store.uri(f"{prefix}/registry"),
        runs=store.uri(f"{prefix}/runs"),
        # The endpoint from the YAML; the credentials from the environment (see `run`).
        object_store={"endpoint_url": store.endpoint_url},
        tune=str(directory / "tune.yaml"),
        serve=str(directory / "serve.yaml"),
    )
    pipeline["ingest"].update(symbols=SYMBOLS, sim_days=6)
    path = directory / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


@pytest.fixture(scope="module")
def module_ray() -> Iterator[None]:
    """A local Ray for this module's in-process sweeps, shut down after the module. The session's
    `ray_local` would stay up through every later module, and later modules start Rays of their
    own (some in this process, some as clusters beside it) and expect none here."""
    import ray

    if ray.is_initialized():  # an earlier module's Ray: used as is, left to its owner
        yield
        return
    connect(RayConfig(num_cpus=2))
    try:
        yield
    finally:
        shutdown()


@pytest.fixture(scope="module")
def pipeline_run(
    object_store: ObjectStore, tmp_path_factory: pytest.TempPathFactory
) -> PipelineOnStore:
    directory = tmp_path_factory.mktemp("pipeline_on_store")
    prefix = f"pipeline-{uuid.uuid4().hex[:8]}"
    config = write_configs(directory, object_store, prefix)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    credentials = {k: v for k, v in object_store.environment.items() if k != "AWS_ENDPOINT_URL"}
    completed = subprocess.run(
        [sys.executable, "-m", "jobs.pipeline", "--config", str(config), "--exit"],
        # Relative paths (Serve's default Gold store) land in the test's directory.
        cwd=directory,
        env=env | credentials | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-6000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    tune = TuneJobConfig.model_validate(small_sweep())
    return PipelineOnStore(directory, prefix, summary, tune, completed.stderr)


def stored_keys(store: ObjectStore, prefix: str) -> list[str]:
    """Every object under `prefix`, relative to it."""
    root = f"{store.bucket}/{prefix}"
    selector = pafs.FileSelector(root, recursive=True)
    infos = store.filesystem().get_file_info(selector)
    return sorted(info.path[len(root) + 1 :] for info in infos if info.is_file)


def test_every_stage_writes_to_the_store_and_serve_loads_the_promoted_model_from_it(
    pipeline_run: PipelineOnStore, object_store: ObjectStore
) -> None:
    stages = pipeline_run.summary["stages"]
    assert stages["ingest"]["rows_written"] > 0 and stages["features"]["rows_written"] > 0
    gate = stages["tune"]["gate"]
    assert gate["promoted"] is True, gate
    for symbol in SYMBOLS:
        answer = stages["serve"]["signals"][symbol]
        assert answer["signal"] in {"BUY", "SELL", "NEUTRAL"}, answer
        assert answer["model_version"] == gate["version"], "served from the store's registry"

    keys = stored_keys(object_store, pipeline_run.prefix)
    lake = [k.removeprefix("lake/") for k in keys if k.startswith("lake/")]
    for symbol in SYMBOLS:
        assert any(k.startswith(f"bronze/source=sim/symbol={symbol}/") for k in lake)
        assert any(k.startswith(f"bronze/_committed/source=sim/symbol={symbol}/") for k in lake)
        assert any(k.startswith(f"silver/symbol={symbol}/month=") for k in lake)
    assert "silver/_state.json" in lake

    out = stages["tune"]["leaderboard"].rsplit("/", 1)[0]
    assert out.startswith(object_store.uri(f"{pipeline_run.prefix}/runs/tune-"))
    run = RunDir(out, object_store.config)
    assert run.report.read_text().startswith("<!DOCTYPE html>")
    assert run.reference(BUY_AND_HOLD).has_record() and len(run.reference_names()) > 1
    best = run.trial(stages["tune"]["best_trial"])
    assert best.has_record() and (best.fold(0) / "model.pt").is_file()
    # Tune's and Train's storage are on the store too, so every node of a cluster sees them.
    assert (run.tune_storage / EXPERIMENT_NAME).is_dir() and run.train_storage.is_dir()
    registry = ModelRegistry(
        object_store.uri(f"{pipeline_run.prefix}/registry"), object_store=object_store.config
    )
    assert registry.get_alias("signal", PRODUCTION) == gate["version"]

    named_like_a_uri = [
        p for p in pipeline_run.directory.rglob("*") if p.name.startswith(("s3:", "gs:", "file:"))
    ]
    assert named_like_a_uri == [] and not (REPO / "s3:").exists()
    for zone in ("lake", "registry", "runs", "bronze", "silver"):
        assert not (pipeline_run.directory / zone).exists(), f"a local {zone}"


def test_an_interrupted_sweep_resumes_from_the_store_to_the_undisturbed_leaderboard(
    pipeline_run: PipelineOnStore, object_store: ObjectStore, module_ray: None
) -> None:
    """The pipeline's sweep is the undisturbed run; this one reads the same Silver."""
    pipeline_out = pipeline_run.summary["stages"]["tune"]["leaderboard"].rsplit("/", 1)[0]
    undisturbed = board(RunDir(pipeline_out, object_store.config))
    lake = object_store.uri(f"{pipeline_run.prefix}/lake")
    out = object_store.uri(f"{pipeline_run.prefix}/resumed")
    registry_uri = object_store.uri(f"{pipeline_run.prefix}/resumed-registry")
    run = RunDir(out, object_store.config)

    def interrupt_after_the_first_trial() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if any(run.trial(t.name).has_record() for t in run.trials.iterdir()):
                # What Ctrl-C does: Tune saves the experiment's state and returns early.
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.2)

    def sweep(resume: bool) -> Any:
        return run_selection(
            lake,
            registry_uri,
            pipeline_run.tune,
            out,
            resume=resume,
            object_store=object_store.config,
            progress=lambda _: None,
        )

    watcher = threading.Thread(target=interrupt_after_the_first_trial, daemon=True)
    watcher.start()
    with pytest.raises(SweepInterruptedError, match="--resume"):
        sweep(resume=False)
    watcher.join()
    assert not run.has_leaderboard()
    registry = ModelRegistry(registry_uri, object_store=object_store.config)
    assert not registry.exists() or registry.versions("signal") == [], "nothing registered"

    result = sweep(resume=True)
    assert result.summary["trials"] == pipeline_run.tune.num_samples
    pd.testing.assert_frame_equal(board(run), undisturbed)
