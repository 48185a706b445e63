"""Ingest on a three-node Ray cluster (`cluster.local_cluster`): a 0-CPU head and two 1-CPU worker
nodes, Bronze on the SeaweedFS object store, the stage submitted as a Ray job the way
`cluster.ray_jobs` submits it. Ray's State API says where the ingest tasks ran; a worker node
SIGKILLed while its task writes leaves Bronze equal to a clean run's."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cluster.local_cluster import LocalCluster, NodeSpec
from cluster.ray_jobs import (
    PipelineParams,
    build_runtime_env,
    connect_client,
    submission_id_for,
    submit_and_wait,
)
from cluster.ray_jobs import (
    stage_entrypoints as entrypoints,
)
from configs.schema import IngestConfig
from market.bronze import open_bronze
from market.ingest import INGEST_TASK_PREFIX, build_source
from market.sources.base import ingest_symbol
from tests.conftest import REPO
from tests.ingest_child import stored_rows
from tests.object_store import ObjectStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SYMBOLS = ("SIMA", "SIMB", "SIMC", "SIMD")
SIM_DAYS = 3
WORKERS = ("worker-1", "worker-2")
JOB_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """One cluster for the module: a head without CPUs (tasks must go to the workers) and two
    worker nodes of 1 logical CPU each."""
    with LocalCluster([NodeSpec(name) for name in WORKERS]) as started:
        yield started


@pytest.fixture(scope="module")
def jobs(cluster: LocalCluster) -> Any:
    return connect_client(cluster.dashboard_url, cluster.token)


def _params(lake: str, store: ObjectStore, symbols: tuple[str, ...], days: int) -> PipelineParams:
    return PipelineParams(
        lake=lake,
        registry=store.uri("unused-registry"),
        source="sim",
        symbols=symbols,
        sim_days=days,
        pipeline_config=None,  # the job's defaults: the clean run below uses the same
        working_dir=str(REPO),
        env_vars=store.environment,
        poll_s=0.5,
    )


def _clean_rows(tmp: Path, symbols: tuple[str, ...], days: int) -> Counter[Any]:
    """The rows a clean, undisturbed ingest stores: the same source and symbols, in this
    process, into a local lake."""
    config = IngestConfig(source="sim", symbols=list(symbols), sim_days=days)
    lake = tmp / "clean"
    for symbol in symbols:
        ingest_symbol(build_source(config), symbol, open_bronze(lake))
    return stored_rows(lake)


def _submit(jobs: Any, params: PipelineParams, lines: list[str]) -> tuple[str, str]:
    """Run the ingest stage as a Ray job; returns (submission id, final status)."""
    submission = submission_id_for("ingest", "cluster-test")
    status = submit_and_wait(
        jobs,
        entrypoints(params)["ingest"],
        build_runtime_env(params.working_dir, params.env_vars),
        JOB_TIMEOUT_S,
        params.poll_s,
        submission_id=submission,
        log_sink=lines.append,
    )
    return submission, status


def _ingest_tasks(cluster: LocalCluster, jobs: Any, submission: str) -> list[Any]:
    """Every attempt of the job's ingest tasks, as Ray's State API lists them."""
    job_id = jobs.get_job_info(submission).job_id
    tasks = cluster.list_state("tasks", [("job_id", "=", job_id)])
    return [task for task in tasks if str(task.name).startswith(INGEST_TASK_PREFIX)]


def test_the_ingest_job_runs_its_tasks_on_the_worker_nodes_and_stores_a_clean_runs_rows(
    cluster: LocalCluster, jobs: Any, object_store: ObjectStore, object_prefix: str, tmp_path: Path
) -> None:
    lake = object_store.uri(object_prefix)
    lines: list[str] = []
    submission, status = _submit(jobs, _params(lake, object_store, SYMBOLS, SIM_DAYS), lines)
    assert status == "SUCCEEDED", "\n".join(lines[-40:])

    names = cluster.node_names_by_id()
    tasks = _ingest_tasks(cluster, jobs, submission)
    assert sorted(task.name for task in tasks) == [f"{INGEST_TASK_PREFIX}{s}" for s in SYMBOLS]
    assert {str(task.state) for task in tasks} == {"FINISHED"}
    placed = Counter(names[task.node_id] for task in tasks)
    assert set(placed) == set(WORKERS), f"ingest tasks by node: {placed}"

    # The job's driver runs on the head (its supervisor actor asks for no CPU).
    supervisors = [
        actor
        for actor in cluster.list_state("actors")
        if actor.class_name == "JobSupervisor" and submission in str(actor.name)
    ]
    assert [names[actor.node_id] for actor in supervisors] == ["head"]

    assert stored_rows(lake, object_store.config) == _clean_rows(tmp_path, SYMBOLS, SIM_DAYS)


def _wait_for(condition: Any, what: str, timeout_s: float, job: Future[Any]) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if job.done():
            job.result()  # raises the job's failure
            pytest.fail(f"the job ended before {what}")
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    pytest.fail(f"not seen within {timeout_s:.0f} s: {what}")


def test_a_worker_node_killed_during_ingest_loses_and_duplicates_no_row(
    cluster: LocalCluster, jobs: Any, object_store: ObjectStore, object_prefix: str, tmp_path: Path
) -> None:
    """SIGKILL a worker node (raylet, object store, workers) while its ingest task has stored
    part of its symbol; a replacement node joins; Ray retries the lost task and the job succeeds
    with exactly the clean run's rows."""
    symbols, days = ("SIMK", "SIML"), 30
    lake = object_store.uri(object_prefix)
    params = _params(lake, object_store, symbols, days)
    victim = next(name for name in WORKERS if name in cluster.nodes)
    store = open_bronze(lake, object_store.config)
    lines: list[str] = []
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(_submit, jobs, params, lines)

        def every_symbol_part_way() -> dict[str, int] | None:
            """Parts stored per symbol, once every symbol has some but not all: then each of
            the two 1-CPU workers is running one symbol's task, the victim included."""
            stored = {symbol: len(store.parts("sim", symbol)) for symbol in symbols}
            return stored if all(0 < count < days for count in stored.values()) else None

        before_kill = _wait_for(every_symbol_part_way, "every symbol part-way", 180, job)
        cluster.kill_node(victim)
        cluster.add_node(NodeSpec("worker-3"))
        submission, status = job.result(timeout=JOB_TIMEOUT_S)
    assert status == "SUCCEEDED", "\n".join(lines[-40:])

    names = cluster.node_names_by_id()
    attempts: dict[str, dict[int, tuple[str, str]]] = {}
    for task in _ingest_tasks(cluster, jobs, submission):
        symbol = task.name.removeprefix(INGEST_TASK_PREFIX)
        attempts.setdefault(symbol, {})[task.attempt_number] = (
            str(task.state),
            names[task.node_id],
        )
    lost_with_node = [s for s, tries in attempts.items() if tries.get(0) == ("FAILED", victim)]
    assert len(lost_with_node) == 1, attempts
    retried = attempts[lost_with_node[0]]
    assert retried[max(retried)][0] == "FINISHED" and retried[max(retried)][1] != victim, attempts
    assert before_kill[lost_with_node[0]] < days

    on_store = stored_rows(lake, object_store.config)
    clean = _clean_rows(tmp_path, symbols, days)
    lost, duplicated = clean - on_store, on_store - clean
    assert (sum(lost.values()), sum(duplicated.values())) == (0, 0)
    assert on_store == clean
