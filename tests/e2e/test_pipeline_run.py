"""What `make run` runs, end to end: `python -m jobs.pipeline` on a local Ray with simulator data.

Ingest -> Silver (RayDP) -> smoke sweep and gate -> the Serve application -> one /signal per
symbol, then `--exit`. The configs are the shipped ones with every location moved into a
temporary directory and the API on a free port.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_pipeline_ingests_trains_gates_and_serves(tmp_path: Path) -> None:
    serve_config: dict[str, Any] = yaml.safe_load(
        (REPO / "configs" / "serve" / "local.yaml").read_text()
    )
    serve_config["port"] = free_port()
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
    pipeline_path = tmp_path / "pipeline.yaml"
    pipeline_path.write_text(yaml.safe_dump(pipeline))

    completed = subprocess.run(
        [sys.executable, "-m", "jobs.pipeline", "--config", str(pipeline_path), "--exit"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert completed.returncode == 0, completed.stderr[-6000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    stages = summary["stages"]
    assert set(summary["stage_seconds"]) == {"ingest", "features", "tune", "serve"}
    assert stages["features"]["rows_written"] > 0
    # The demo market has a planted signal: the smoke sweep must find it and the gate promote.
    assert stages["tune"]["gate"]["promoted"] is True
    signals = stages["serve"]["signals"]
    assert set(signals) == set(pipeline["ingest"]["symbols"])
    for symbol, answer in signals.items():
        assert answer["symbol"] == symbol
        assert answer["signal"] in {"BUY", "SELL", "NEUTRAL"}
        assert answer["model_version"] == stages["tune"]["gate"]["version"]
    assert "dev_client_secret" not in stages["serve"]
    for line in ("[pipeline] 1/4 ingest", "[pipeline] 3/4 tune", "Quant-AI is up.", "stop:"):
        assert line in completed.stderr
    assert (tmp_path / "secrets" / "jwt_secret").stat().st_mode & 0o077 == 0
    assert (tmp_path / "lake" / "gold" / "signals.sqlite").exists()
