"""The Airflow DAG `quant_ai_retrain` loaded by a real Airflow, in an environment of its own.

Airflow is not a dependency of the platform (its pins clash with ours), so the session fixture
builds a separate virtualenv with `pip install apache-airflow==AIRFLOW_VERSION` (about a minute
from a package mirror), once, under the user's cache directory (outside the repository), and
reuses it afterwards. Ray is deliberately absent from that environment: the DAG file must load
where only Airflow is installed (the scheduler and DAG processor), importing the Ray Jobs SDK
inside its tasks. A probe script run by that environment's Python fills a `DagBag` from
`cluster/airflow/` and prints the graph as JSON.

The e2e test runs the DAG with Airflow's own `dag.test()` in a second environment, Airflow plus
the Ray client (`ray[default]` at our pin), against a real Ray head: the ingest task submits the
real `jobs.ingest` entrypoint as a Ray job, tune and features are marked successful by Airflow
without running (they take minutes and are covered by their own tests), deploy is skipped.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from cluster.ray_jobs import stage_entrypoints
from tests.conftest import REPO
from tests.integration.test_ray_jobs import ray_jobs_head

pytestmark = pytest.mark.integration

AIRFLOW_VERSION = "3.3.2"
RAY_REQUIREMENT = next(
    dep.replace("[data,train,tune,serve]", "[default]")
    for dep in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    if dep.startswith("ray[")
)
DAG_FOLDER = REPO / "cluster" / "airflow"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quant-ai"
INSTALL_TIMEOUT_S = 900

PROBE = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    from airflow.models import DagBag

    folder, run_params = sys.argv[1], json.loads(sys.argv[2])
    out = {"ray_importable": importlib.util.find_spec("ray") is not None, "loads": {}}
    for label, schedule in (("default", None), ("hourly", "@hourly"), ("manual", "none")):
        if schedule is None:
            os.environ.pop("QUANT_AI_RETRAIN_SCHEDULE", None)
        else:
            os.environ["QUANT_AI_RETRAIN_SCHEDULE"] = schedule
        bag = DagBag(dag_folder=folder)
        dags = {}
        for dag_id, dag in bag.dags.items():
            dags[dag_id] = {
                "tasks": {
                    task.task_id: {
                        "upstream": sorted(task.upstream_task_ids),
                        "downstream": sorted(task.downstream_task_ids),
                        "retries": task.retries,
                    }
                    for task in dag.tasks
                },
                "schedule": dag.schedule if isinstance(dag.schedule, (str, type(None)))
                else str(dag.schedule),
                "catchup": dag.catchup,
                "max_active_runs": dag.max_active_runs,
                "params": {key: dag.params[key] for key in dag.params.keys()},
                "tags": sorted(dag.tags),
                "fileloc": dag.fileloc,
            }
        out["loads"][label] = {
            "import_errors": {str(k): str(v) for k, v in bag.import_errors.items()},
            "dags": dags,
        }
    # The module's own settings resolution, as a task would run it.
    fileloc = out["loads"]["default"]["dags"]["quant_ai_retrain"]["fileloc"]
    spec = importlib.util.spec_from_file_location("quant_ai_dag_probe", fileloc)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    params = module.resolve_params(run_params, {"address": "http://ray-head:8265"})
    out["address"] = params.address
    out["working_dir"] = params.working_dir
    out["entrypoints"] = module.ray_jobs.stage_entrypoints(params)
    print(json.dumps(out))
    """
)


DAG_RUN = textwrap.dedent(
    """
    import json, sys
    from airflow.models import DagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    folder, run_conf, variables = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    bag = DagBag(dag_folder=folder)
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags["quant_ai_retrain"]
    run = dag.test(
        run_conf=run_conf,
        variable_file_path=variables,
        mark_success_pattern="^(features|tune)$",
    )
    with create_session() as session:
        states = {ti.task_id: str(ti.state) for ti in run.get_task_instances(session=session)}
        query = XComModel.get_many(
            run_id=run.run_id, key="return_value", dag_ids=dag.dag_id, task_ids="ingest"
        )
        values = [XComModel.deserialize_value(row) for row in session.scalars(query)]
    print("RESULT " + json.dumps(
        {"state": str(run.state), "tasks": states, "ingest_xcom": values}, default=str
    ))
    """
)


def build_venv(venv: Path, requirements: list[str]) -> Path:
    """A virtualenv at `venv` with `requirements`, built once (under a lock) and then reused.

    Returns its Python; skips the calling test, with pip's reason, when the install fails.
    """
    python = venv / "bin" / "python"
    ready = venv / ".quant-ai-ready"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time across test sessions
        wanted = ";".join(requirements)
        if ready.exists() and python.exists() and ready.read_text().splitlines()[0] == wanted:
            return python
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        result = subprocess.run(
            [str(python), "-m", "pip", "install", *requirements],
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            pytest.skip(
                f"could not install {requirements} into {venv} (pip exit {result.returncode}): "
                f"{result.stderr.strip()[-1500:]}"
            )
        seconds = time.perf_counter() - started
        ready.write_text(f"{wanted}\ninstalled in {seconds:.0f} s\n")
        print(f"{requirements} installed into {venv} in {seconds:.0f} s", flush=True)
    return python


def airflow_env(home: Path) -> dict[str, str]:
    """The environment of an Airflow process: its own home, our DAG folder, no examples."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AIRFLOW", "PYTHONPATH", "RAY_", "QUANT_AI_"))
    }
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FOLDER),
        }
    )
    return env


@pytest.fixture(scope="session")
def airflow_python() -> Path:
    """The Python of a virtualenv with Apache Airflow and no Ray, as a DAG processor has."""
    venv = Path(
        os.environ.get("QUANT_AI_AIRFLOW_VENV") or CACHE / f"airflow-{AIRFLOW_VERSION}-venv"
    )
    return build_venv(venv, [f"apache-airflow=={AIRFLOW_VERSION}"])


@pytest.fixture(scope="session")
def airflow_ray_python() -> Path:
    """The Python of a virtualenv with Apache Airflow and the Ray client, as a worker has."""
    ray_version = RAY_REQUIREMENT.split("==")[1]
    venv = CACHE / f"airflow-{AIRFLOW_VERSION}-ray-{ray_version}-venv"
    return build_venv(venv, [f"apache-airflow=={AIRFLOW_VERSION}", RAY_REQUIREMENT])


@pytest.fixture(scope="session")
def loaded(airflow_python: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What the Airflow probe saw: DAGs, import errors, the graph, params, resolved settings."""
    home = tmp_path_factory.mktemp("airflow-home")
    env = airflow_env(home)
    run_params = {"lake": "s3://bucket/lake", "registry": "s3://bucket/registry", "symbols": None}
    result = subprocess.run(
        [str(airflow_python), "-c", PROBE, str(DAG_FOLDER), json.dumps(run_params)],
        capture_output=True,
        text=True,
        cwd=home,  # not the repository: the DAG must find its checkout by itself
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    probe: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return probe


def test_the_dag_loads_without_import_errors_and_without_ray(loaded: dict[str, Any]) -> None:
    assert loaded["ray_importable"] is False, "the Airflow venv must not need Ray"
    for label, load in loaded["loads"].items():
        assert load["import_errors"] == {}, (label, load["import_errors"])
        assert list(load["dags"]) == ["quant_ai_retrain"], label


def test_the_graph_is_ingest_features_tune_deploy(loaded: dict[str, Any]) -> None:
    tasks = loaded["loads"]["default"]["dags"]["quant_ai_retrain"]["tasks"]
    assert tasks == {
        "ingest": {"upstream": [], "downstream": ["features"], "retries": 2},
        "features": {"upstream": ["ingest"], "downstream": ["tune"], "retries": 0},
        "tune": {"upstream": ["features"], "downstream": ["deploy"], "retries": 0},
        "deploy": {"upstream": ["tune"], "downstream": [], "retries": 0},
    }


def test_schedule_run_policy_and_params(loaded: dict[str, Any]) -> None:
    schedules = {
        label: load["dags"]["quant_ai_retrain"]["schedule"]
        for label, load in loaded["loads"].items()
    }
    assert schedules == {"default": "@daily", "hourly": "@hourly", "manual": None}
    dag = loaded["loads"]["default"]["dags"]["quant_ai_retrain"]
    assert dag["catchup"] is False and dag["max_active_runs"] == 1
    assert dag["tags"] == ["quant-ai", "ray"]
    assert Path(dag["fileloc"]).resolve() == (DAG_FOLDER / "quant_ai_dag.py").resolve()
    params = dag["params"]
    for key in ("address", "working_dir", "lake", "registry", "symbols", "tune_config", "deploy"):
        assert key in params and params[key] is None, key  # None: the Variable or default wins


def test_tasks_submit_the_same_entrypoints_as_the_library(loaded: dict[str, Any]) -> None:
    assert loaded["address"] == "http://ray-head:8265"  # from the Variable layer
    assert Path(loaded["working_dir"]).resolve() == REPO.resolve()  # the DAG's own checkout
    assert loaded["entrypoints"] == stage_entrypoints(
        {"lake": "s3://bucket/lake", "registry": "s3://bucket/registry"}
    )


@pytest.mark.e2e
def test_airflow_runs_the_dag_against_a_real_ray_cluster(
    airflow_ray_python: Path, tmp_path: Path
) -> None:
    """`dag.test()`: ingest as a real Ray job, features/tune marked done, deploy skipped."""
    home = tmp_path / "airflow-home"
    home.mkdir()
    env = airflow_env(home)
    migrate = subprocess.run(
        [str(airflow_ray_python), "-m", "airflow", "db", "migrate"],
        capture_output=True,
        text=True,
        env=env,
        cwd=home,
        timeout=300,
        check=False,
    )
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    lake = tmp_path / "lake"
    with ray_jobs_head() as head:
        variables = tmp_path / "variables.json"
        variables.write_text(
            json.dumps(
                {
                    # As an operator stores it: the settings as a JSON string, the token apart.
                    "quant_ai_retrain": json.dumps(
                        {
                            "address": head.address,
                            "lake": str(lake),
                            "registry": str(tmp_path / "registry"),
                            "source": "sim",
                        }
                    ),
                    "quant_ai_ray_auth_token": head.token,
                }
            )
        )
        run_conf = {
            "symbols": "SIMBTC",
            "start": "2024-01-01",
            "end": "2024-01-01T23:59",
            "poll_s": 0.5,
            "timeouts_s": {"ingest": 300},
        }
        result = subprocess.run(
            [
                str(airflow_ray_python),
                "-c",
                DAG_RUN,
                str(DAG_FOLDER),
                json.dumps(run_conf),
                str(variables),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=home,
            timeout=600,
            check=False,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    run = json.loads(line.removeprefix("RESULT "))
    assert run["state"] == "success", output[-5000:]
    assert run["tasks"] == {
        "ingest": "success",
        "features": "success",
        "tune": "success",
        "deploy": "skipped",
    }
    [ingest] = run["ingest_xcom"]
    assert ingest["status"] == "SUCCEEDED"
    assert ingest["submission_id"].startswith("quant-ai-ingest-manual__")
    assert ingest["summary"]["job"] == "ingest" and ingest["summary"]["rows_written"] == 1440
    assert "[ingest] " in output, "the job's log lines are in the task log"
    assert "deploy is off" in output
    assert any((lake / "bronze").rglob("*")), "nothing written to Bronze"
