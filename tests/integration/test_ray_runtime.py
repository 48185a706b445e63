"""A local Ray started by `connect` keeps Ray's State API working beside another Ray instance.

Ray Train's placement-group cleaner asks the State API whether a stopped trial's controller is
gone. Without a pinned API address the API auto-detects "the" local Ray and fails when a second
instance runs on the machine, so the CPUs of every trial ASHA stops leak and the sweep stalls.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from cluster.ray_runtime import connect, shutdown
from configs.schema import RayConfig

pytestmark = pytest.mark.integration

OTHER_RAY = """
import sys, time, ray
ray.init(num_cpus=1, include_dashboard=False)
print("up", flush=True)
time.sleep(float(sys.argv[1]))
"""


@pytest.fixture
def other_ray_instance() -> Iterator[None]:
    process = subprocess.Popen(
        [sys.executable, "-c", OTHER_RAY, "300"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "up"
        yield
    finally:
        process.terminate()
        process.wait(timeout=60)


# A parent process running its own Ray (a test session, a service starting a job) passes its
# State API address on to the children it spawns.
INHERITED_API_ADDRESS = "http://127.0.0.1:9"


@pytest.mark.parametrize("inherited", [None, INHERITED_API_ADDRESS])
def test_state_api_finds_its_own_cluster_beside_another_ray(
    other_ray_instance: None, monkeypatch: pytest.MonkeyPatch, inherited: str | None
) -> None:
    import ray

    if inherited is None:
        monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_API_SERVER_ADDRESS", inherited)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    connect(RayConfig(num_cpus=2, include_dashboard=True))
    assert os.environ["RAY_API_SERVER_ADDRESS"] != inherited
    try:

        @ray.remote(num_cpus=0)
        def own_actor_count() -> int:
            from ray.util.state import list_actors

            return len(list_actors(limit=1000))

        @ray.remote(num_cpus=0)
        class Marker:
            def ping(self) -> bool:
                return True

        marker = Marker.remote()  # type: ignore[attr-defined]
        assert ray.get(marker.ping.remote())
        deadline = time.monotonic() + 60
        while True:
            try:
                # In a worker, as Ray Train's cleaner runs it: must reach this cluster's API.
                assert ray.get(own_actor_count.remote()) >= 1
                break
            except ray.exceptions.RayTaskError as error:
                assert "multiple active Ray instances" not in str(error), error
                if time.monotonic() > deadline:  # the dashboard may still be starting
                    raise
                time.sleep(2)
    finally:
        shutdown()
    # The caller's own value is back once the local Ray is gone.
    assert os.environ.get("RAY_API_SERVER_ADDRESS") == inherited
