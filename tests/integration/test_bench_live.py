"""`python -m bench.live` at a tiny size: the real Serve application, real HTTP, the accelerated
bar clock; the last stdout line is the JSON summary with the keys BENCHMARKS.md quotes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

BENCH = [sys.executable, "-m", "bench.live"]
KEYS = {
    "symbols",
    "p50_close_to_signal_ms",
    "p99_close_to_signal_ms",
    "cpu_ms_per_symbol_bar",
    "late_bars",
    "errors",
}


def test_bench_live_prints_its_json_line_at_a_tiny_size() -> None:
    run = subprocess.run(
        [*BENCH, "--symbols", "20", "--bars", "3", "--bar-interval-s", "1", "--setup-s", "5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(summary) >= KEYS
    assert summary["symbols"] == 20 and [size["symbols"] for size in summary["sizes"]] == [20]
    assert summary["errors"] == 0 and summary["dropped_bars"] == 0
    # 20 symbols x 3 bars were published; the HTTP sampler saw some of them served.
    assert summary["sampled_symbol_bars"] > 0
    assert 0 < summary["p50_close_to_signal_ms"] <= summary["p99_close_to_signal_ms"]
    assert summary["cpu_ms_per_symbol_bar"] > 0
