"""However the service stops, none of its processes (HAProxy included) outlives it.

The service is `python -m jobs.deploy` over a registry holding an untrained model, on a local Ray
and Serve's HAProxy ingress, in a new process group as a terminal would run it. Stopping it:
SIGTERM to the whole group, or SIGKILL of the driver alone; either way the port must come free
and a new service must start on it and answer /signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from cluster.ray_runtime import free_port
from configs.schema import JwtConfig
from serve.api.auth import TokenService
from serve.api.clients import ClientStore
from tests.conftest import REPO
from tests.process_support import named, process_tree, wait_all_gone
from tests.serve_support import MODEL_NAME, register_model

pytestmark = pytest.mark.integration

SYMBOL = "SIMAAA"
# Serve waits up to 30 s for its controller, which a group SIGTERM has already stopped.
STOP_WITHIN_S = 60.0


class Service:
    """One `jobs.deploy` process group and what it started."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.port = port
        with log.open("ab") as out:
            self.driver = subprocess.Popen(
                [sys.executable, "-m", "jobs.deploy", "--config", str(config), "--port", str(port)],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.log = log

    def processes(self) -> list[psutil.Process]:
        """The driver, everything it started, and the HAProxy serving its port."""
        return process_tree(self.driver.pid, self.port)

    def wait_for_signal(self, token: str, timeout_s: float = 240.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            assert self.driver.poll() is None, self.log.read_text()[-3000:]
            try:
                response = httpx.get(
                    f"http://127.0.0.1:{self.port}/signal",
                    params={"symbol": SYMBOL},
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=5.0,
                )
                if response.status_code == 200:
                    body: dict[str, object] = response.json()
                    return body
                last = f"{response.status_code} {response.text[:200]}"
            except httpx.HTTPError as error:
                last = repr(error)
            time.sleep(1.0)
        raise AssertionError(f"no signal in {timeout_s:.0f} s: {last}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("stop")
    register_model(tmp / "registry", seed=1)
    (tmp / "jwt_secret").write_text("s" * 48)
    jwt = {"secret_env": "QUANT_AI_TEST_UNSET_SECRET", "secret_file": str(tmp / "jwt_secret")}
    config = {
        "ray": {"num_cpus": 2},
        "registry": str(tmp / "registry"),
        "model_name": MODEL_NAME,
        "auth": {"jwt": jwt, "clients_file": str(tmp / "clients.yaml")},
        "feed": {"source": "sim", "symbols": [SYMBOL], "history_bars": 320, "sim_days": 1},
        "gold": {"url": f"sqlite:///{tmp / 'gold.sqlite'}"},
    }
    (tmp / "serve.yaml").write_text(yaml.safe_dump(config))
    ClientStore.load(tmp / "clients.yaml").add("tester", ["signals:read"])
    token, _ = TokenService.from_config(JwtConfig.model_validate(jwt)).mint(
        "tester", ["signals:read"]
    )
    return tmp / "serve.yaml", token


@pytest.fixture
def services() -> Iterator[list[Service]]:
    """The services a test starts; whatever is left of them is stopped afterwards."""
    started: list[Service] = []
    yield started
    for service in reversed(started):
        with_children = []
        if service.driver.poll() is None:
            with_children = service.processes()
            os.killpg(service.driver.pid, signal.SIGTERM)
        wait_all_gone(with_children, service.port, STOP_WITHIN_S)


def test_sigterm_to_the_group_leaves_nothing_and_the_port_is_reused(
    setup: tuple[Path, str], services: list[Service], tmp_path: Path
) -> None:
    config, token = setup
    port = free_port()
    first = Service(config, port, tmp_path / "first.log")
    services.append(first)
    first.wait_for_signal(token)
    processes = first.processes()
    assert named(processes, "haproxy"), "HAProxy serves the port"
    os.killpg(first.driver.pid, signal.SIGTERM)
    seconds = wait_all_gone(processes, port, STOP_WITHIN_S)
    print(f"all processes gone {seconds:.1f} s after SIGTERM")

    second = Service(config, port, tmp_path / "second.log")
    services.append(second)
    assert second.wait_for_signal(token)["symbol"] == SYMBOL


def test_a_start_after_the_driver_was_killed_serves_on_the_same_port(
    setup: tuple[Path, str], services: list[Service], tmp_path: Path
) -> None:
    config, token = setup
    port = free_port()
    first = Service(config, port, tmp_path / "first.log")
    services.append(first)
    first.wait_for_signal(token)
    haproxies = named(first.processes(), "haproxy")
    assert haproxies, "HAProxy serves the port"
    first.driver.kill()
    first.driver.wait()

    second = Service(config, port, tmp_path / "second.log")
    services.append(second)
    assert second.wait_for_signal(token)["symbol"] == SYMBOL
    # Ray's own dashboard and runtime-env agents of a killed driver may outlive it; they hold
    # no port of the service. Its HAProxy must not.
    seconds = wait_all_gone(haproxies, port=None, timeout_s=STOP_WITHIN_S)
    print(f"the killed service's HAProxy was gone {seconds:.1f} s after the new start")
