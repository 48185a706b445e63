"""Benchmark: the batch feature engine on the real BTCUSDT year, one thread, vs TA-Lib.

`compute_features` (market.features.polars_engine) runs on one core: polars' thread pool is
pinned to 1 thread (the command re-executes itself with POLARS_MAX_THREADS=1 when needed) and
the process to one CPU. Figures, medians of `--repeats` runs:

- batch_rows_per_s: bars/s of one call over the whole year (571,680 bars of one symbol), wall
  clock; batch_rows_per_cpu_s: the same over the process's CPU time, steadier on a shared
  machine.
- ms_per_400_bar_call: one call on the year's last 400 bars (a POST /predict window);
  ms_per_100x300_bar_call: one call on 100 symbols x 300 bars (a live engine with many symbols).
- The named peer, TA-Lib (C) on the same year's closes: SMA 5/10/20, EMA 12/26, MACD 12/26/9,
  RSI 14, BBANDS 20, ROCR 1/5/10 and STDDEV 10/30/60, the indicators that overlap the spec (17
  of its 33 features; TA-Lib has no segments, warm-up mask, targets or output frame).
  ratio_vs_talib = batch_rows_per_s / talib_rows_per_s (above 1: ours is faster).
- spark_kernel_rows_per_s: the numpy kernel the Spark ETL runs per symbol (inside
  applyInPandas; Spark's own costs excluded), for scale.
- incremental_us_per_symbol_bar_N (N = 1, 100, 10,000 symbols): wall microseconds per
  symbol-bar of `IncrementalFeatures.advance` (market.features.incremental) taking one new bar
  for all N symbols in one call, past the warm-up, with a 60-row window ring
  (incremental_cpu_us_per_symbol_bar_N: the same over CPU time). Each symbol replays the real
  year from its own offset. Its peer, batch_400_us_per_symbol_bar_N (and _cpu_): the batch
  engine recomputing a 400-bar history per symbol to get the newest row, one call over N x 400
  bars, per symbol; incremental_speedup_N = batch_400 / incremental over CPU time, the steadier
  clock on a shared machine (above 1: incremental is faster).

Last line: one JSON object of figures.

    .venv/bin/python -m bench.features [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import talib

from market.features import spec
from market.features.incremental import BarArrays, IncrementalFeatures
from market.features.numpy_kernel import compute_symbol_features
from market.features.polars_engine import compute_features
from market.klines import RAW_FIELDS

REAL_1M = (
    Path(__file__).resolve().parents[2]
    / "shared/data/raw/BTCUSDT-1m-spot-2023-12-01_2024-12-31.csv.gz"
)
THREADS_ENV = "POLARS_MAX_THREADS"
INCREMENTAL_SYMBOLS = (1, 100, 10_000)
# Bars each incremental run advances every symbol by, per symbol count (about 10k symbol-bars).
INCREMENTAL_STEPS = {1: 5_000, 100: 100, 10_000: 2}
# Feature rows each symbol's window ring holds (the longest model window of the shipped sweep).
WINDOW_ROWS = 60
BATCH_HISTORY_BARS = 400


def read_year(path: Path) -> pl.DataFrame:
    """The real 1-minute dump as validated-bar columns (open_time in epoch ms)."""
    raw = pl.read_csv(path, has_header=False, new_columns=list(RAW_FIELDS))
    return raw.drop("close_time", "ignore").with_columns(pl.lit("BTCUSDT").alias("symbol"))


def timed(run: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median (wall seconds, process CPU seconds) of `repeats` runs after one warm-up run."""
    run()
    wall, cpu = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return statistics.median(wall), statistics.median(cpu)


def talib_overlap(close: np.ndarray) -> list[np.ndarray]:
    """TA-Lib's versions of the spec's indicators that it has, on one close series."""
    out: list[np.ndarray] = [talib.SMA(close, k) for k in (5, 10, 20)]
    out += [talib.EMA(close, 12), talib.EMA(close, 26)]
    out += list(talib.MACD(close, 12, 26, 9))
    out.append(talib.RSI(close, 14))
    out += list(talib.BBANDS(close, 20, 2.0, 2.0, talib.MA_Type.SMA))
    out += [talib.ROCR(close, k) for k in (1, 5, 10)]
    ret_1 = np.log(out[-3])
    out += [talib.STDDEV(ret_1, k, 1.0) for k in (10, 30, 60)]
    return out


def many_symbols(year: pl.DataFrame, symbols: int, bars: int) -> pl.DataFrame:
    window = year.tail(bars)
    return pl.concat(
        [window.with_columns(pl.lit(f"SYM{i:03d}").alias("symbol")) for i in range(symbols)]
    )


def incremental_us(year: pl.DataFrame, symbols: int, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) microseconds per symbol-bar of `advance` over `symbols` symbols,
    each replaying the year from its own offset, timed once every window ring is full."""
    steps = INCREMENTAL_STEPS[symbols]
    warm_up = spec.WARMUP_BARS + WINDOW_ROWS
    total = warm_up + steps * (repeats + 1)
    engine = IncrementalFeatures([f"SYM{i:05d}" for i in range(symbols)], WINDOW_ROWS)
    source = engine.bar_arrays(year.with_columns(pl.lit("SYM00000").alias("symbol")))
    offsets = np.arange(symbols) * 4_999 % (len(source) - total)
    everyone = np.arange(symbols)

    def bars_at(step: int) -> BarArrays:
        return replace(source.rows(offsets + step), symbol=everyone)

    for step in range(warm_up):
        engine.advance(bars_at(step))
    batches = iter([bars_at(step) for step in range(warm_up, total)])

    def run() -> None:
        for _ in range(steps):
            engine.advance(next(batches))

    wall, cpu = timed(run, repeats)
    assert engine.windows().ready.all()
    return wall / steps / symbols * 1e6, cpu / steps / symbols * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if os.environ.get(THREADS_ENV) != "1":
        # polars sizes its thread pool once, at import: start again with one thread.
        env = {**os.environ, THREADS_ENV: "1"}
        os.execve(sys.executable, [sys.executable, "-m", "bench.features", *sys.argv[1:]], env)
    if not REAL_1M.exists():
        print(json.dumps({"error": f"real data not found at {REAL_1M}"}))
        return 2
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    year = read_year(REAL_1M)
    rows = year.height

    batch_s, batch_cpu_s = timed(lambda: compute_features(year), args.repeats)
    print(f"batch: {batch_s:.3f} s wall, {batch_cpu_s:.3f} s CPU", file=sys.stderr)
    last_400 = year.tail(400)
    call_400_s, _ = timed(lambda: compute_features(last_400), 10 * args.repeats)
    wide = many_symbols(year, 100, 300)
    call_wide_s, _ = timed(lambda: compute_features(wide), args.repeats)
    print(
        f"400 bars: {call_400_s * 1e3:.2f} ms, 100x300: {call_wide_s * 1e3:.1f} ms", file=sys.stderr
    )

    close = year["close"].to_numpy()
    talib_s, _ = timed(lambda: talib_overlap(close), args.repeats)
    print(f"TA-Lib overlap: {talib_s:.3f} s", file=sys.stderr)

    features = compute_features(year)
    inputs = ("close", "high", "low", "volume", "trades", "taker_buy_base")
    arrays = {k: features[k].cast(pl.Float64).to_numpy() for k in inputs}
    open_time = features["open_time"].to_numpy()
    segment = features["segment"].to_numpy()
    kernel_s, _ = timed(lambda: compute_symbol_features(open_time, segment, arrays), args.repeats)
    print(f"Spark's numpy kernel: {kernel_s:.3f} s", file=sys.stderr)

    incremental: dict[str, Any] = {}
    for symbols in INCREMENTAL_SYMBOLS:
        wall_us, cpu_us = incremental_us(year, symbols, args.repeats)
        histories = many_symbols(year, symbols, BATCH_HISTORY_BARS)
        # One call over 4 M rows at 10,000 symbols takes seconds: time it once after a warm-up.
        recompute_repeats = 1 if symbols > 100 else args.repeats
        recompute_s, recompute_cpu_s = timed(
            partial(compute_features, histories), recompute_repeats
        )
        incremental |= {
            f"incremental_us_per_symbol_bar_{symbols}": round(wall_us, 2),
            f"incremental_cpu_us_per_symbol_bar_{symbols}": round(cpu_us, 2),
            f"batch_400_us_per_symbol_bar_{symbols}": round(recompute_s / symbols * 1e6, 1),
            f"batch_400_cpu_us_per_symbol_bar_{symbols}": round(recompute_cpu_s / symbols * 1e6, 1),
            f"incremental_speedup_{symbols}": round(recompute_cpu_s / symbols * 1e6 / cpu_us, 1),
        }
        print(
            f"incremental, {symbols} symbols: {wall_us:.2f} us/symbol-bar ({cpu_us:.2f} CPU); "
            f"batch recompute of {BATCH_HISTORY_BARS} bars: {recompute_s / symbols * 1e6:.1f} us "
            f"({recompute_cpu_s / symbols * 1e6:.1f} CPU)",
            file=sys.stderr,
        )

    figures: dict[str, Any] = {
        "rows": rows,
        "threads": pl.thread_pool_size(),
        "cpu": cpu,
        "repeats": args.repeats,
        "batch_rows_per_s": round(rows / batch_s),
        "batch_rows_per_cpu_s": round(rows / batch_cpu_s),
        "ms_per_400_bar_call": round(call_400_s * 1e3, 2),
        "ms_per_100x300_bar_call": round(call_wide_s * 1e3, 1),
        "peer": f"TA-Lib {talib.__version__}: SMA EMA MACD RSI BBANDS ROCR STDDEV (17 of 33)",
        "talib_rows_per_s": round(rows / talib_s),
        "ratio_vs_talib": round(talib_s / batch_s, 3),
        "spark_kernel_rows_per_s": round(rows / kernel_s),
        **incremental,
    }
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
