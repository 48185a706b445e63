"""The job CLIs as a user runs them: `python -m jobs.ingest` then `python -m jobs.features`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def run_job(*args: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last_line = result.stdout.strip().splitlines()[-1]
    summary: dict[str, object] = json.loads(last_line)
    return summary


def test_ingest_then_features_from_the_command_line(tmp_path: Path) -> None:
    lake = str(tmp_path / "lake")
    ingest_args = (
        "jobs.ingest",
        "--source",
        "sim",
        "--symbols",
        "SIMA,SIMB",
        "--start",
        "2024-01-01",
        "--end",
        "2024-01-02T23:59",
        "--lake",
        lake,
    )
    ingest = run_job(*ingest_args)
    assert ingest["rows_written"] == 2 * 2 * 1440 and ingest["symbols"] == ["SIMA", "SIMB"]
    again = run_job(*ingest_args)
    assert again["rows_written"] == 0, "a rerun over the same range is a no-op"
    features = run_job("jobs.features", "--lake", lake)
    assert features["rows_out"] == 2 * 2 * 1440
    assert features["symbols_processed"] == ["SIMA", "SIMB"]
    assert features["quarantined"] == {}


def test_help_works_for_every_job() -> None:
    for job in ("jobs.ingest", "jobs.features", "jobs.pipeline"):
        result = subprocess.run(
            [sys.executable, "-m", job, "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0 and "usage" in result.stdout


def test_bad_arguments_get_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.ingest",
            "--source",
            "dump",
            "--symbols",
            "BTCUSDT",
            "--lake",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode != 0
    assert "--path is required" in result.stderr
