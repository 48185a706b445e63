"""Set-up shared by the signal-service tests."""

from __future__ import annotations

import socket
from typing import Any

from market.bar_columns import BarColumns
from models.untrained import EAGER_THRESHOLDS, MODEL_NAME, register_model
from serve.api.clients import ClientEntry, ClientStore
from serve.engine.snapshot import EngineSnapshot, Signal

__all__ = [
    "EAGER_THRESHOLDS",
    "MODEL_NAME",
    "NoEngine",
    "free_range",
    "known_clients",
    "register_model",
]


def known_clients(*client_ids: str) -> ClientStore:
    """An in-memory client store listing `client_ids` with every scope and no usable secret:
    the API accepts only the tokens of clients its store lists."""
    return ClientStore(
        ClientEntry(
            client_id=client_id,
            secret_hash="not-a-hash",
            scopes=["signals:read", "signals:predict"],
        )
        for client_id in client_ids
    )


class NoEngine:
    """An API backend that never reports: enough to build the app, its OpenAPI document and
    the routes that need no engine (/token, /healthz, /metrics)."""

    def snapshot(self) -> EngineSnapshot | None:
        return None

    async def predict(self, symbol: str, bars: BarColumns) -> Signal:
        raise AssertionError("not called")

    async def history(self, symbol: str | None, limit: int) -> list[dict[str, Any]]:
        raise AssertionError("not called")

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def free_range(count: int) -> int:
    """The first of `count` consecutive loopback ports that are free now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = int(probe.getsockname()[1])
        if first + count > 65535:
            continue
        sockets = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no free port range")
