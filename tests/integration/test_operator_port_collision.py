"""A taken operator port on a real Ray Serve deployment: the ingress replica fails with the
reason, Serve gives up after three tries, and `deploy` raises with that reason (serve.run alone
names only the failed deployment) instead of Serve restarting the replica for ever."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from configs.schema import OperatorConfig
from tests.integration.test_serve_app import free_port, serve_config
from tests.serve_support import register_model

pytestmark = pytest.mark.integration


def test_a_taken_operator_port_fails_the_deploy_with_the_reason(tmp_path: Path) -> None:
    from ray import serve

    from cluster.ray_runtime import shutdown
    from serve.deploy import DeployFailedError, deploy

    register_model(tmp_path / "registry", seed=1)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    base = serve_config(tmp_path, free_port())
    config = base.model_copy(
        update={
            "ingress_replicas": 1,
            "operator": OperatorConfig(
                port=taken, ports_per_node=1, targets_dir=str(tmp_path / "targets")
            ),
        }
    )
    timeout_s = 300.0
    started = time.monotonic()
    try:
        with pytest.raises(DeployFailedError) as failure:
            deploy(config, address=None, timeout_s=timeout_s)
        elapsed = time.monotonic() - started
        message = str(failure.value)
        print(f"deploy failed after {elapsed:.0f} s: {message[:300]}")
        assert "SignalIngress" in message
        assert f"no free operator port on 127.0.0.1 in {taken}-{taken}" in message
        assert elapsed < timeout_s / 2
        assert not list((tmp_path / "targets").glob("*.json"))
    finally:
        holder.close()
        serve.shutdown()
        shutdown()
