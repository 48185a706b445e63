"""The signal API on a three-node Ray cluster (`cluster.local_cluster`): a 0-CPU head and two
1-CPU worker nodes, the registry on the SeaweedFS object store, the service deployed by the
`jobs.deploy` stage submitted as a Ray job the way `cluster.ray_jobs` submits it.

Serve's HTTP proxy runs on the head alone (`proxy_location: HeadOnly`): the API port belongs to
the node that is never lost, and worker nodes, which share this machine's address here, do not
compete for it. Every replica reserves a share of a CPU, so none lands on the CPU-less head;
Ray's State API says where each runs. Under a steady load on `/signal` for every symbol, the
worker node holding an ingress replica is SIGKILLed (raylet, object store, workers): its
replicas come back on the surviving worker, fewer than 0.1% of requests fail (every non-2xx
answer and transport error counts; the load generator never retries), and every symbol gets
fresh signals again.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bench.loadgen import LoadResult, latency_percentile_ms, paced_load
from cluster.local_cluster import LocalCluster, NodeSpec
from cluster.ray_jobs import (
    PipelineParams,
    build_runtime_env,
    connect_client,
    stage_entrypoints,
    submission_id_for,
    submit_and_wait,
)
from cluster.ray_runtime import free_port
from configs.schema import (
    AuthConfig,
    EngineShardsConfig,
    FeedConfig,
    GoldConfig,
    JwtConfig,
    OperatorConfig,
    PredictConfig,
    ServeConfig,
    SimConfig,
)
from serve.api.auth import TokenService
from serve.api.clients import ClientStore
from tests.conftest import REPO
from tests.object_store import ObjectStore
from tests.serve_support import MODEL_NAME, free_range, register_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORKERS = ("worker-1", "worker-2")
SYMBOLS = ("SIMAAA", "SIMBBB", "SIMCCC", "SIMDDD")
REPLICAS = {"SignalIngress": 2, "SignalEngine-0": 1, "SignalEngine-1": 1, "Predict": 1}
"""Serve replicas per deployment: two ingress replicas, two engine shards of two symbols each."""
APP = "quant-ai"
SECRET = "cluster-serve-test-" + "s" * 40
LOAD_RATE_PER_S = 40.0
LOAD_S = 30.0
KILL_AFTER_S = 5.0
JOB_TIMEOUT_S = 240.0


@dataclass(frozen=True)
class Service:
    url: str
    headers: dict[str, str]
    submission: str


def _serve_config(tmp: Path, registry: str, port: int) -> ServeConfig:
    (tmp / "jwt_secret").write_text(SECRET)
    return ServeConfig(
        registry=registry,
        model_name=MODEL_NAME,
        port=port,
        ingress_mode="proxy",
        proxy_location="HeadOnly",
        ingress_replicas=2,
        ingress_cpus=0.1,
        predict=PredictConfig(replicas=1, cpus_per_replica=0.1),
        engine=EngineShardsConfig(shards=2, cpus_per_shard=0.1),
        registry_poll_s=5.0,
        snapshot_poll_s=0.25,
        # Replicas on any node of this machine take the first free port of the range.
        operator=OperatorConfig(port=free_range(4), ports_per_node=4, targets_dir=None),
        auth=AuthConfig(
            jwt=JwtConfig(
                secret_env="QUANT_AI_TEST_UNSET_SECRET", secret_file=str(tmp / "jwt_secret")
            ),
            clients_file=str(tmp / "clients.yaml"),
            rate_limit_per_minute=60_000,
            rate_limit_burst=2_000,
        ),
        feed=FeedConfig(
            source="sim",
            symbols=list(SYMBOLS),
            history_bars=320,
            replay_bars_per_s=1.0,
            stale_after_s=30.0,
            sim_days=1,
            sim=SimConfig(seed=11, anchor_date=date(2024, 3, 1), signal_strength=0.2),
        ),
        gold=GoldConfig(url=f"sqlite:///{tmp / 'gold.sqlite'}"),
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster([NodeSpec(name) for name in WORKERS]) as started:
        yield started


@pytest.fixture(scope="module")
def service(
    cluster: LocalCluster, object_store: ObjectStore, tmp_path_factory: pytest.TempPathFactory
) -> Service:
    """The signal API deployed by `jobs.deploy` as a Ray job, answering for every symbol."""
    tmp = tmp_path_factory.mktemp("cluster-serve")
    registry = object_store.uri(f"cluster-serve-{time.time_ns()}/registry")
    with pytest.MonkeyPatch.context() as env:
        for key, value in object_store.environment.items():
            env.setenv(key, value)
        register_model(registry, seed=1)
    ClientStore.load(tmp / "clients.yaml").add("load", ["signals:read"])
    port = free_port()
    config = _serve_config(tmp, registry, port)
    config_path = tmp / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    params = PipelineParams(
        lake=str(tmp / "lake"),
        registry=registry,
        deploy=True,
        serve_config=str(config_path),
        port=port,
        working_dir=str(REPO),
        env_vars=object_store.environment,
        poll_s=0.5,
    )
    submission = submission_id_for("deploy", "cluster-serve-test")
    lines: list[str] = []
    status = submit_and_wait(
        connect_client(cluster.dashboard_url, cluster.token),
        stage_entrypoints(params)["deploy"],
        build_runtime_env(params.working_dir, params.env_vars),
        JOB_TIMEOUT_S,
        params.poll_s,
        submission_id=submission,
        log_sink=lines.append,
        raise_on_failure=False,
    )
    assert status == "SUCCEEDED", "\n".join(lines[-60:])
    jwt, _ = TokenService.from_config(config.auth.jwt).mint("load", ["signals:read"], ttl_s=3600)
    svc = Service(f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {jwt}"}, submission)
    _wait_for(lambda: _fresh_signals(svc) == set(SYMBOLS), "fresh signals for every symbol", 120)
    return svc


def _wait_for(condition: Any, what: str, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(0.5)
    pytest.fail(f"not seen within {timeout_s:.0f} s: {what} (last: {last!r})")


def _fresh_signals(svc: Service) -> set[str]:
    """The symbols whose `/signal` answers 200 with a signal computed from live features."""
    fresh = set()
    for symbol in SYMBOLS:
        try:
            answer = httpx.get(
                f"{svc.url}/signal", params={"symbol": symbol}, headers=svc.headers, timeout=5.0
            )
        except httpx.HTTPError:
            continue
        if answer.status_code == 200 and "stale" not in (answer.json()["reason"] or ""):
            fresh.add(symbol)
    return fresh


def _placement(cluster: LocalCluster) -> dict[str, Counter[str]]:
    """Live Serve actors by role (a replica's deployment name, `ServeController`,
    `ProxyActor`) -> how many on each node (by name), from Ray's State API."""
    names = cluster.node_names_by_id()
    placed: dict[str, Counter[str]] = {}
    for actor in cluster.list_state("actors", [("state", "=", "ALIVE")]):
        class_name = str(actor.class_name)
        if class_name.startswith(f"ServeReplica:{APP}:"):
            role = class_name.removeprefix(f"ServeReplica:{APP}:")
        elif class_name in ("ServeController", "ProxyActor"):
            role = class_name
        else:
            continue
        placed.setdefault(role, Counter())[names.get(actor.node_id, actor.node_id)] += 1
    return placed


def _running_replicas(cluster: LocalCluster) -> dict[str, Counter[str]]:
    """Serve's own view (the dashboard's Serve API): the replicas in state RUNNING, by
    deployment -> how many on each node (by name). A replica actor is alive before its
    constructor has run; Serve routes to it only once it is RUNNING. Empty while the
    dashboard cannot say (it asks the controller, which may be busy replacing replicas)."""
    names = cluster.node_names_by_id()
    try:
        answer = httpx.get(
            f"{cluster.dashboard_url}/api/serve/applications/",
            headers={"Authorization": f"Bearer {cluster.token}"},
            timeout=10.0,
        )
        answer.raise_for_status()
    except httpx.HTTPError:
        return {}
    deployments = answer.json()["applications"][APP]["deployments"]
    return {
        name: Counter(
            names.get(replica["node_id"], replica["node_id"])
            for replica in details["replicas"]
            if replica["state"] == "RUNNING"
        )
        for name, details in deployments.items()
    }


def _replicas_placed(cluster: LocalCluster, nodes: set[str]) -> dict[str, Counter[str]] | None:
    """The placement (State API) once every deployment has all its replicas alive on `nodes`
    alone, each RUNNING for Serve on the node the State API names."""
    placed, running = _placement(cluster), _running_replicas(cluster)
    for deployment, count in REPLICAS.items():
        where = placed.get(deployment, Counter())
        if sum(where.values()) != count or not set(where) <= nodes:
            return None
        if running.get(deployment) != where:
            return None
    return placed


def test_the_deploy_job_places_every_replica_on_the_worker_nodes(
    cluster: LocalCluster, service: Service
) -> None:
    placed = _wait_for(lambda: _replicas_placed(cluster, set(WORKERS)), "replicas placed", 60)
    # The controller and the one HTTP proxy (HeadOnly) run on the head, which has no CPU.
    assert placed["ServeController"] == Counter({"head": 1}), placed
    assert placed["ProxyActor"] == Counter({"head": 1}), placed
    # Ray spreads a deployment's replicas over the nodes that fit them.
    assert set(placed["SignalIngress"]) == set(WORKERS), placed
    print(f"placement: {json.dumps({role: dict(nodes) for role, nodes in placed.items()})}")


def test_a_worker_node_killed_under_load_fails_under_a_thousandth_of_requests(
    cluster: LocalCluster, service: Service
) -> None:
    placed = _wait_for(lambda: _replicas_placed(cluster, set(WORKERS)), "replicas placed", 60)
    # The victim holds an ingress replica and, when one does, an engine shard too.
    candidates = sorted(
        placed["SignalIngress"],
        key=lambda node: -sum(placed.get(f"SignalEngine-{i}", Counter())[node] for i in (0, 1)),
    )
    victim = candidates[0]
    survivor = next(name for name in WORKERS if name != victim)
    paths = [f"/signal?symbol={symbol}" for symbol in SYMBOLS]
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(
            paced_load, service.url, paths, service.headers, LOAD_RATE_PER_S, LOAD_S, concurrency=4
        )
        time.sleep(KILL_AFTER_S)
        killed_at = time.time()
        cluster.kill_node(victim)
        marked_dead_s = time.time() - killed_at
        _wait_for(lambda: _replicas_placed(cluster, {survivor}), "replicas rescheduled", 120)
        rescheduled_s = time.time() - killed_at
        result: LoadResult = load.result(timeout=LOAD_S + 60)

    kill_offset_s = killed_at - result.started_at
    window = [
        s for s in result.samples if kill_offset_s <= s.sent_s <= kill_offset_s + rescheduled_s
    ]
    failures = [s for s in result.samples if not s.ok]
    measured = {
        "victim": victim,
        "requests": result.requests,
        "failed": len(failures),
        "failed_share": round(len(failures) / max(1, result.requests), 5),
        "failures": [(round(s.sent_s - kill_offset_s, 2), s.status, s.path) for s in failures],
        "marked_dead_s": round(marked_dead_s, 1),
        "rescheduled_s": round(rescheduled_s, 1),
        "p99_ms": round(result.p99_ms, 1),
        "p99_kill_window_ms": round(latency_percentile_ms(window, 99.0), 1),
        "max_kill_window_ms": round(max((s.latency_s for s in window), default=0.0) * 1e3, 1),
        "kill_window_requests": len(window),
    }
    print(f"node kill under load: {json.dumps(measured)}")
    # The paced client falls behind its rate when the cores are busy (978 of 1200 once beside a
    # parallel build, 723 beside a whole test run); the load must still run through the kill
    # and the rescheduling.
    assert result.requests >= 0.5 * LOAD_RATE_PER_S * LOAD_S, measured
    loaded_after_kill_s = min(rescheduled_s, LOAD_S - kill_offset_s)
    assert len(window) >= 0.5 * LOAD_RATE_PER_S * loaded_after_kill_s, measured
    assert len(failures) < 0.001 * result.requests, measured
    # Signals resume for every symbol, those of the shard that died with the node included.
    _wait_for(lambda: _fresh_signals(service) == set(SYMBOLS), "fresh signals again", 60)
    assert cluster.node_state(victim) == "DEAD"
