"""What `make run` runs, end to end: `python -m jobs.pipeline` on a local Ray with simulator data.

Ingest -> Silver (RayDP) -> smoke sweep and gate -> the Serve application -> one /signal per
symbol; then, as an operator would stop it, SIGTERM (a container stop) or SIGINT (Ctrl-C in
a terminal) to its process group: it must end with status 128 + the signal and a one-line
message, no traceback, leave no process (Ray's and HAProxy included) and free its port, so a
new service starts on the same port and answers. The configs are the shipped ones with every
location moved into a temporary directory and the API on a free port. A last test holds the
API port first: the pipeline must refuse at once, naming the holder, before any stage runs.

The first run starts from nothing and is stopped by SIGTERM; everything the pipeline produces is
checked on it. The SIGINT run is a second `make run` over a copy of the first run's lake and
registry with a one-trial sweep: every stage still runs in the driver (the ingest finds its
bars stored, Spark on Ray builds nothing new, Ray Tune and Ray Train run one trial and the
service serves the promoted model), so Ctrl-C meets the same process, with the signal handlers
Tune and PySpark leave behind, for minutes less than a second full sweep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cluster.ray_runtime import free_port
from configs.schema import JwtConfig
from serve.api.auth import TokenService
from tests.conftest import REPO
from tests.process_support import named, process_tree, wait_all_gone

pytestmark = pytest.mark.e2e

UP = "Quant-AI is up."
# Seconds from the signal until the driver has exited and nothing it started is left. Ctrl-C
# in a terminal must be quick; a container stop allows more before its SIGKILL (Docker: 10 s
# by default, Kubernetes: 30 s), and Serve may wait for a controller the signal has stopped.
STOP_WITHIN_S = {signal.SIGINT: 30.0, signal.SIGTERM: 60.0}


def write_configs(
    tmp_path: Path, port: int, tune: Path | None = None
) -> tuple[Path, Path, dict[str, Any]]:
    """The shipped pipeline and serve configs with every location under `tmp_path`, and the
    sweep config `tune` instead of the shipped one when given."""
    serve_config: dict[str, Any] = yaml.safe_load(
        (REPO / "configs" / "serve" / "local.yaml").read_text()
    )
    serve_config["port"] = port
    serve_config["auth"]["jwt"]["secret_env"] = "QUANT_AI_E2E_UNSET_SECRET"
    serve_config["auth"]["jwt"]["secret_file"] = str(tmp_path / "secrets" / "jwt_secret")
    serve_config["auth"]["clients_file"] = str(tmp_path / "secrets" / "clients.yaml")
    serve_path = tmp_path / "serve.yaml"
    serve_path.write_text(yaml.safe_dump(serve_config))

    pipeline: dict[str, Any] = yaml.safe_load(
        (REPO / "configs" / "pipeline" / "local.yaml").read_text()
    )
    pipeline.update(
        lake=str(tmp_path / "lake"),
        registry=str(tmp_path / "registry"),
        runs=str(tmp_path / "runs"),
        serve=str(serve_path),
    )
    if tune is not None:
        pipeline["tune"] = str(tune)
    pipeline_path = tmp_path / "pipeline.yaml"
    pipeline_path.write_text(yaml.safe_dump(pipeline))
    return pipeline_path, serve_path, pipeline


def wait_for(path: Path, text: str, driver: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in path.read_text(errors="replace"):
        assert driver.poll() is None, path.read_text(errors="replace")[-6000:]
        assert time.monotonic() < deadline, f"no {text!r} in {timeout_s:.0f} s"
        time.sleep(1.0)


@dataclass(frozen=True)
class StoppedRun:
    """A `make run` that came up and was stopped by a signal, as the checks below see it."""

    directory: Path
    port: int
    serve_path: Path
    pipeline: dict[str, Any]
    stderr: str
    summary: dict[str, Any]


def run_until_up_then_stop(
    directory: Path, stop: signal.Signals, tune: Path | None = None
) -> StoppedRun:
    """Run the pipeline in `directory` until it serves, then send `stop` to its process group.

    Fails unless the driver exits with 128 + the signal and every process it started (Ray's and
    HAProxy's included) has ended, and the API port is free, within `STOP_WITHIN_S`.
    """
    port = free_port()
    pipeline_path, serve_path, pipeline = write_configs(directory, port, tune)
    stdout, stderr = directory / "stdout.log", directory / "stderr.log"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        driver = subprocess.Popen(
            [sys.executable, "-m", "jobs.pipeline", "--config", str(pipeline_path)],
            cwd=REPO,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    try:
        wait_for(stderr, UP, driver, timeout_s=1200)
        service = process_tree(driver.pid, port)
        assert named(service, "haproxy"), "HAProxy serves the API port"
        stopped_at = time.monotonic()
        os.killpg(driver.pid, stop)
        assert driver.wait(timeout=STOP_WITHIN_S[stop]) == 128 + stop
        wait_all_gone(service, port, STOP_WITHIN_S[stop] - (time.monotonic() - stopped_at))
        print(f"make run: nothing left {time.monotonic() - stopped_at:.1f} s after {stop.name}")
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    summary = json.loads(stdout.read_text().strip().splitlines()[-1])
    return StoppedRun(
        directory, port, serve_path, pipeline, stderr.read_text(errors="replace"), summary
    )


def assert_served_then_stopped(run: StoppedRun, stop: signal.Signals) -> None:
    """What every `make run` must show: all four stages, a valid signal for each symbol from
    the service, private secrets, a Gold store, and a stop reported in one line with no
    traceback once the service was up."""
    assert f"[pipeline] stopped by {stop.name}" in run.stderr
    assert "Traceback" not in run.stderr.split(UP)[-1]
    stages = run.summary["stages"]
    assert set(run.summary["stage_seconds"]) == {"ingest", "features", "tune", "serve"}
    signals = stages["serve"]["signals"]
    assert set(signals) == set(run.pipeline["ingest"]["symbols"])
    for symbol, answer in signals.items():
        assert answer["symbol"] == symbol
        assert answer["signal"] in {"BUY", "SELL", "NEUTRAL"}
    assert "dev_client_secret" not in stages["serve"]
    for line in ("[pipeline] 1/4 ingest", "[pipeline] 3/4 tune", UP, "stop:"):
        assert line in run.stderr
    assert (run.directory / "secrets" / "jwt_secret").stat().st_mode & 0o077 == 0
    assert (run.directory / "lake" / "gold" / "signals.sqlite").exists()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> StoppedRun:
    """`make run` from an empty directory, stopped by SIGTERM (a container stop)."""
    return run_until_up_then_stop(tmp_path_factory.mktemp("first_run"), signal.SIGTERM)


def test_pipeline_ingests_trains_gates_serves_and_stops_on_sigterm(first_run: StoppedRun) -> None:
    assert_served_then_stopped(first_run, signal.SIGTERM)
    stages = first_run.summary["stages"]
    assert stages["features"]["rows_written"] > 0
    # The demo market has a planted signal: the smoke sweep must find it and the gate promote.
    assert stages["tune"]["gate"]["promoted"] is True
    for answer in stages["serve"]["signals"].values():
        assert answer["model_version"] == stages["tune"]["gate"]["version"]


def test_a_start_after_the_stop_serves_the_promoted_model_on_the_same_port(
    first_run: StoppedRun,
) -> None:
    command = [sys.executable, "-m", "jobs.deploy", "--config", str(first_run.serve_path)]
    lake, registry = first_run.directory / "lake", first_run.directory / "registry"
    command += ["--lake", str(lake), "--registry", str(registry)]
    log = first_run.directory / "deploy.log"
    with log.open("wb") as sink:
        deploy = subprocess.Popen(
            command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for(log, "Ctrl-C to stop", deploy, timeout_s=300)
        jwt = JwtConfig.model_validate(
            yaml.safe_load(first_run.serve_path.read_text())["auth"]["jwt"]
        )
        # The pipeline's first run registered the dev client; the API accepts only clients' tokens.
        token, _ = TokenService.from_config(jwt).mint("dev", ["signals:read"])
        symbol = first_run.pipeline["ingest"]["symbols"][0]
        deadline = time.monotonic() + 120
        while True:
            answer = httpx.get(
                f"http://127.0.0.1:{first_run.port}/signal",
                params={"symbol": symbol},
                headers={"Authorization": f"Bearer {token}"},
                timeout=10.0,
            )
            if answer.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(1.0)  # 503 until the engine holds enough bars
        assert answer.status_code == 200, answer.text
        version = first_run.summary["stages"]["tune"]["gate"]["version"]
        assert answer.json()["model_version"] == version
    finally:
        os.killpg(deploy.pid, signal.SIGTERM)
        deploy.wait(timeout=STOP_WITHIN_S[signal.SIGTERM])


def test_pipeline_over_a_trained_lake_stops_on_sigint(
    first_run: StoppedRun, tmp_path: Path
) -> None:
    for kept in ("lake", "registry"):
        shutil.copytree(first_run.directory / kept, tmp_path / kept)
    smoke: dict[str, Any] = yaml.safe_load((REPO / "configs" / "tune" / "smoke.yaml").read_text())
    smoke.update(num_samples=1, max_epochs=1, asha=False)
    one_trial = tmp_path / "one_trial.yaml"
    one_trial.write_text(yaml.safe_dump(smoke))

    run = run_until_up_then_stop(tmp_path, signal.SIGINT, tune=one_trial)

    assert_served_then_stopped(run, signal.SIGINT)
    stages = run.summary["stages"]
    # The costly stages found their work done: only the one-trial sweep trained.
    assert stages["ingest"]["rows_written"] == 0
    assert stages["features"]["symbols_processed"] == []
    assert stages["tune"]["trials"] == 1
    # The service follows the production alias: the first run's model unless this sweep's won.
    gate = stages["tune"]["gate"]
    assert gate["production_before"] == first_run.summary["stages"]["tune"]["gate"]["version"]
    served = {answer["model_version"] for answer in stages["serve"]["signals"].values()}
    assert served == {gate["production_after"]}


def test_pipeline_refuses_a_busy_api_port_before_any_stage(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        pipeline_path, _, _ = write_configs(tmp_path, port)
        started = time.monotonic()
        completed = subprocess.run(
            [sys.executable, "-m", "jobs.pipeline", "--config", str(pipeline_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert time.monotonic() - started < 60
    assert f"port {port} on 127.0.0.1 is in use by pid {os.getpid()}" in completed.stderr
    assert "1/4 ingest" not in completed.stderr
    assert "Traceback" not in completed.stderr
