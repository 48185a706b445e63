"""The processes of a service started by a test, listed and awaited without racing their exit.

A service's short-lived children (Ray's helpers, a HAProxy reload) can end between being listed
and being asked their name: every query here treats a vanished process as gone, not as an error.
"""

from __future__ import annotations

import time

import psutil

from cluster.processes import gone, listeners, port_is_free


def process_tree(pid: int, port: int | None = None) -> list[psutil.Process]:
    """The process `pid`, everything it started, and (when `port` is given) whoever listens on
    that port, each once. Empty when `pid` has already ended."""
    try:
        root = psutil.Process(pid)
        found = [root, *root.children(recursive=True)]
    except psutil.Error:
        found = []
    if port is not None:
        found += listeners(port)
    unique: dict[int, psutil.Process] = {}
    for process in found:
        unique.setdefault(process.pid, process)
    return list(unique.values())


def named(processes: list[psutil.Process], fragment: str) -> list[psutil.Process]:
    """The processes whose executable name contains `fragment`; ended ones are skipped."""
    matching = []
    for process in processes:
        try:
            if fragment in process.name():
                matching.append(process)
        except psutil.Error:
            continue
    return matching


def wait_all_gone(processes: list[psutil.Process], port: int | None, timeout_s: float) -> float:
    """Seconds until every process has ended and `port` (if given) is free to bind on
    127.0.0.1; fails the test after `timeout_s` seconds, naming what is left."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        free = port is None or port_is_free("127.0.0.1", port)
        if all(gone(p) for p in processes) and free:
            return time.monotonic() - started
        time.sleep(0.25)
    left = [p for p in processes if not gone(p)]
    raise AssertionError(f"still running after {timeout_s:.0f} s: {left}; port {port} free: {free}")
