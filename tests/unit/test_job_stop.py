"""Stopping a job: Ctrl-C and SIGTERM run its cleanup and end it with a message, no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve.deploy import serve_until_stopped

ROOT = Path(__file__).resolve().parents[2]

# A job whose main waits in serve_until_stopped-like fashion; the signal arrives while it waits,
# and its `finally` block stands for the job's cleanup (stopping Serve, the local Ray).
_JOB = """
import os, signal, sys, threading
from jobs._cli import run

def main() -> int:
    try:
        os.kill(os.getpid(), signal.{signal})
        threading.Event().wait(30)
        return 0
    finally:
        print("cleanup ran", file=sys.stderr, flush=True)

run(main, "demo")
"""


@pytest.mark.parametrize(("name", "status"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_runs_the_cleanup_and_exits_with_the_shell_status(name: str, status: int) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _JOB.format(signal=name)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == status, result.stderr
    assert "cleanup ran" in result.stderr
    assert f"[demo] stopped by {name}" in result.stderr
    assert "Traceback" not in result.stderr


def test_output_after_the_summary_goes_to_stderr_so_the_summary_stays_last() -> None:
    # What Ray forwards to a serving driver is written to its stdout by Python and by C++.
    job = (
        "import os\n"
        "from jobs._cli import print_summary, summary_stays_last\n"
        "print('before')\n"
        "print_summary({'job': 'demo'})\n"
        "summary_stays_last()\n"
        "print('(raylet) forwarded', flush=True)\n"
        "os.write(1, b'written to fd 1\\n')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", job], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.splitlines() == ["before", '{"job": "demo"}']
    assert result.stderr.splitlines() == ["(raylet) forwarded", "written to fd 1"]


def test_serve_until_stopped_repeats_until_interrupted_then_propagates() -> None:
    calls: list[int] = []

    def repeat() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt(signal.Signals.SIGTERM.name)

    with pytest.raises(KeyboardInterrupt):
        serve_until_stopped(shutdown=False, repeat=repeat, every_s=0.01)
    assert len(calls) == 3


def test_serve_until_stopped_takes_ctrl_c_back_from_a_handler_left_installed() -> None:
    swallowed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _: swallowed.append(signum))

    def interrupt() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1.0)  # the KeyboardInterrupt arrives here

    try:
        with pytest.raises(KeyboardInterrupt):
            serve_until_stopped(shutdown=False, repeat=interrupt, every_s=0.01)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert swallowed == []
