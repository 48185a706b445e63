"""cluster.ray_jobs against a real Ray Jobs server: a local Ray head with its dashboard, started in
a child process (so that this test session's own Ray, if any, is left alone), and jobs submitted
through `ray.job_submission.JobSubmissionClient`, as the Airflow DAG submits them."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cluster.ray_jobs import (
    PipelineParams,
    RayJobError,
    RayJobTimeoutError,
    build_runtime_env,
    connect_client,
    job_summary,
    run_stages,
    submission_id_for,
    submit_and_wait,
)
from tests.conftest import REPO

pytestmark = pytest.mark.integration

HEAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray._private import parameter

    # ray.init() has no option for the dashboard agent's HTTP port, whose fixed default (52365)
    # clashes with any other Ray on this machine that runs a dashboard; the Jobs API needs that
    # agent. (`ray start --dashboard-agent-listen-port` has one, but a `ray start` head becomes
    # the machine's "current cluster", which every bare ray.init() of other sessions would join.)
    _init = parameter.RayParams.__init__

    def _init_with_free_agent_port(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", int(sys.argv[2]))
        _init(self, *args, **kwargs)

    parameter.RayParams.__init__ = _init_with_free_agent_port
    temp_dir = sys.argv[3]
    context = ray.init(num_cpus=2, include_dashboard=True, dashboard_port=int(sys.argv[1]),
                       namespace="quant-ai-jobs-test", _temp_dir=temp_dir)
    # A job's driver gets RAY_ADDRESS from the "current cluster" file of the head's temp dir,
    # else from any GCS process running on the machine: with other Rays on this machine, the
    # driver could join one of theirs. `ray start` writes that file; ray.init() does not.
    ray._private.utils.write_ray_address(context.address_info["gcs_address"], temp_dir)
    print(json.dumps({"dashboard_url": context.dashboard_url}), flush=True)
    sys.stdin.read()  # serve until the test closes our stdin
    ray.shutdown()
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class RayHead:
    """A running Ray head: its Jobs API address and the token it requires."""

    address: str
    token: str


@contextlib.contextmanager
def ray_jobs_head() -> Iterator[RayHead]:
    """A Ray head (2 CPUs, dashboard and Jobs API on) in a child process, ready to run jobs.

    The head requires a token (RAY_AUTH_MODE=token), as Ray 2.60 does for a local cluster by
    default; the token is the head's own, so the user's ~/.ray/auth_token is neither read nor
    written. The head's PATH starts with this interpreter's directory, as on a node of our image,
    where `python` in an entrypoint is the interpreter that has the project's dependencies.
    """
    token = secrets.token_hex(32)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
    }
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="qa-rj-")  # short: Ray's socket paths live under it
    head = subprocess.Popen(
        [sys.executable, "-c", HEAD_SCRIPT, str(_free_port()), str(_free_port()), temp_dir],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert head.stdout is not None
        line = head.stdout.readline()
        if not line:
            pytest.fail(f"the Ray head exited with {head.wait(timeout=30)} before it was up")
        url = json.loads(line)["dashboard_url"]
        address = url if url.startswith("http") else f"http://{url}"
        _wait_until_jobs_run(connect_client(address, token))
        yield RayHead(address, token)
    finally:
        if head.stdin is not None:
            head.stdin.close()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def jobs_head() -> Iterator[RayHead]:
    """One Ray head for the whole module: each test's jobs end before the next test starts."""
    with ray_jobs_head() as head:
        yield head


@pytest.fixture(scope="module")
def jobs_client(jobs_head: RayHead) -> Any:
    """A JobSubmissionClient, with the token, for the module's Ray head."""
    return connect_client(jobs_head.address, jobs_head.token)


def _wait_until_jobs_run(client: Any, timeout_s: float = 90.0) -> None:
    """Block until the head accepts and runs a job (its dashboard agent starts after ray.init)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            submit_and_wait(client, "python -c pass", None, timeout_s=60, poll_s=0.2)
            return
        except RuntimeError as exc:  # "No available agent to submit job, please try again later"
            if time.monotonic() > deadline:
                raise
            print(f"Ray Jobs API not ready yet: {exc}", file=sys.stderr)
            time.sleep(1.0)


def _wait_for_status(client: Any, job_id: str, wanted: str, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    status = ""
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status == wanted:
            break
        time.sleep(0.5)
    return status


def test_a_job_succeeds_with_its_log_streamed_and_bulky_dirs_left_behind(
    jobs_client: Any, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    (work / "lake" / "bronze").mkdir(parents=True)
    (work / "lake" / "bronze" / "big.bin").write_bytes(b"\0" * 1024)
    (work / ".secrets").mkdir()
    (work / ".secrets" / "jwt_secret").write_text("not for the cluster")
    (work / "probe.py").write_text(
        textwrap.dedent(
            """
            import json, os, time
            for i in range(3):
                print(f"line {i}", flush=True)
                time.sleep(0.4)
            print(json.dumps({
                "job": "probe",
                "has_lake": os.path.exists("lake"),
                "has_secrets": os.path.exists(".secrets"),
                "stage_env": os.environ.get("QUANT_AI_STAGE"),
            }))
            """
        )
    )
    lines: list[str] = []
    started = time.perf_counter()
    status = submit_and_wait(
        jobs_client,
        "python probe.py",
        build_runtime_env(str(work), {"QUANT_AI_STAGE": "probe"}),
        timeout_s=120,
        poll_s=0.2,
        submission_id=submission_id_for("probe", "manual__test"),
        metadata={"stage": "probe"},
        log_sink=lines.append,
    )
    assert status == "SUCCEEDED"
    assert time.perf_counter() - started < 60
    assert [line for line in lines if line.startswith("line ")] == ["line 0", "line 1", "line 2"]
    assert job_summary("\n".join(lines)) == {
        "job": "probe",
        "has_lake": False,
        "has_secrets": False,
        "stage_env": "probe",
    }


def test_the_client_reaches_its_own_cluster_when_another_ray_is_named_in_the_environment(
    jobs_head: RayHead, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As in a process that started its own local Ray (cluster.ray_runtime.connect names that
    # Ray's dashboard here): Ray's SDK would send this cluster's jobs and token there.
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:9")
    client = connect_client(jobs_head.address, jobs_head.token)
    assert isinstance(client.list_jobs(), list)
    assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:9"


def test_a_failing_job_raises_with_its_exit_and_log_tail(jobs_client: Any) -> None:
    entrypoint = "python -c \"import sys; print('boom: bad input'); sys.exit(3)\""
    with pytest.raises(RayJobError) as failure:
        submit_and_wait(jobs_client, entrypoint, None, timeout_s=60, poll_s=0.2)
    error = failure.value
    assert error.status == "FAILED"
    assert "boom: bad input" in error.logs_tail and "boom: bad input" in str(error)
    assert "exit code 3" in error.message, error.message
    assert not isinstance(error, RayJobTimeoutError)

    status = submit_and_wait(
        jobs_client, entrypoint, None, timeout_s=60, poll_s=0.2, raise_on_failure=False
    )
    assert status == "FAILED"


def test_a_job_past_its_timeout_is_stopped(jobs_client: Any) -> None:
    job_id = submission_id_for("sleeper")
    started = time.perf_counter()
    with pytest.raises(RayJobTimeoutError, match="not finished after 3 s") as timeout:
        submit_and_wait(
            jobs_client,
            "python -c \"import time; print('sleeping', flush=True); time.sleep(600)\"",
            None,
            timeout_s=3,
            poll_s=0.5,
            submission_id=job_id,
        )
    assert time.perf_counter() - started < 30
    assert timeout.value.submission_id == job_id
    assert _wait_for_status(jobs_client, job_id, "STOPPED") == "STOPPED"


def test_the_ingest_stage_runs_as_a_ray_job_from_the_repository(
    jobs_client: Any, tmp_path: Path
) -> None:
    """The real entrypoint, uploaded working dir and cluster connection (RAY_ADDRESS) of a stage."""
    params = PipelineParams.from_layers(
        {
            "lake": str(tmp_path / "lake"),
            "registry": str(tmp_path / "registry"),
            "symbols": "SIMBTC",
            "start": "2024-01-01",
            "end": "2024-01-01T23:59",
            "working_dir": str(REPO),
            "poll_s": 0.5,
            "timeouts_s": {"ingest": 300},
        }
    )
    lines: list[str] = []
    assert run_stages(jobs_client, params, ["ingest"], run_id="test", log_sink=lines.append) == {
        "ingest": "SUCCEEDED"
    }
    summary = job_summary("\n".join(lines))
    assert summary is not None, "\n".join(lines[-30:])
    assert summary["rows_written"] == 1440 and summary["symbols"] == ["SIMBTC"]
    assert any((tmp_path / "lake" / "bronze").rglob("*")), "nothing written to Bronze"


def test_jobs_pipeline_submits_its_stages_as_ray_jobs(jobs_head: RayHead, tmp_path: Path) -> None:
    """`python -m jobs.pipeline --ray-jobs URL`: ingest and Silver run as Ray jobs on a cluster."""
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        "\n".join(
            [
                f"lake: {tmp_path / 'lake'}",
                f"registry: {tmp_path / 'registry'}",
                "spark: {executors: 1, executor_cores: 1, executor_memory: 1g}",
                "ingest: {source: sim, symbols: [SIMJOB], sim_days: 1}",
            ]
        )
    )
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.pipeline",
            "--config",
            str(config),
            "--skip-tune",
            "--ray-jobs",
            jobs_head.address,
        ],
        cwd=REPO,
        env={**os.environ, "RAY_AUTH_TOKEN": jobs_head.token},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["mode"] == "ray-jobs"
    assert summary["stages"] == {"ingest": "SUCCEEDED", "features": "SUCCEEDED"}
    assert list((tmp_path / "lake" / "silver").rglob("*.parquet")), "no Silver written"
