"""Benchmark: our vectorised backtester vs vectorbt 1.2.0 on the real BTCUSDT year, same signals.

Deterministic decisions come from a 10-bar momentum rule passed through `decide_signals`;
blocks break at every gap in the minute stream. Ours is timed end to end (signals ->
positions -> net and gross ledgers -> metrics); vectorbt is timed on `from_signals` plus
`value()`, given entry/exit arrays already shifted to the fill bar (their construction, and
vectorbt's import and numba compilation on a warm-up run, are excluded; that warm-up is
reported apart as `vectorbt_compile_s`). Each side runs `--repeats` times; the median counts.
Last line: one JSON object of figures; `ratio` = ours_bars_per_s / vectorbt_bars_per_s
(above 1: ours is faster).

    .venv/bin/python -m bench.backtest [--repeats 5] [--mode long_short]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from configs.schema import BacktestConfig
from models.backtest import decide_signals, run_backtest

REAL_1M = (
    Path(__file__).resolve().parents[2]
    / "shared/data/raw/BTCUSDT-1m-spot-2023-12-01_2024-12-31.csv.gz"
)
ONE_MINUTE_MS = 60_000
MOMENTUM_BARS = 10


def load_bars(path: Path, block_minutes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(open, close, block_ids) of the headerless Binance kline CSV.

    A block breaks at every gap in the minute stream and, when `block_minutes` > 0, every
    `block_minutes` minutes of wall-clock time (like fold boundaries), so forced exits occur.
    """
    raw = pl.read_csv(path, has_header=False, columns=[0, 1, 4])
    open_time = raw[:, 0].to_numpy().astype(np.int64)
    open_ = raw[:, 1].to_numpy().astype(np.float64)
    close = raw[:, 2].to_numpy().astype(np.float64)
    breaks = np.diff(open_time) != ONE_MINUTE_MS
    if block_minutes > 0:
        period = open_time // (block_minutes * ONE_MINUTE_MS)
        breaks |= np.diff(period) != 0
    block_ids = np.concatenate(([0], np.cumsum(breaks)))
    return open_, close, block_ids


def momentum_signals(
    close: np.ndarray, block_ids: np.ndarray, config: BacktestConfig
) -> np.ndarray:
    """Decisions of a 10-bar momentum 'model': predicted log return = the last 10 bars' one."""
    n = close.size
    log_c = np.log(close)
    mom = np.full(n, np.nan)
    mom[MOMENTUM_BARS:] = log_c[MOMENTUM_BARS:] - log_c[:-MOMENTUM_BARS]
    crosses = np.zeros(n, dtype=bool)
    crosses[MOMENTUM_BARS:] = block_ids[MOMENTUM_BARS:] != block_ids[:-MOMENTUM_BARS]
    mom[crosses] = np.nan  # a window spanning a gap is not a momentum reading
    # A logistic squash stands in for a classifier's probability; scale ~ a 10-bar move.
    p_up = 1.0 / (1.0 + np.exp(-mom / 0.002))
    return decide_signals(p_up, mom, config)


def vbt_inputs(held: np.ndarray) -> dict[str, np.ndarray]:
    """vectorbt signals that trade wherever our held position changes (fill bar = t+1)."""
    prev = np.concatenate(([0.0], held[:-1]))
    return {
        "entries": (held > 0) & (prev <= 0),
        "exits": (held == 0) & (prev > 0),
        "short_entries": (held < 0) & (prev >= 0),
        "short_exits": (held == 0) & (prev < 0),
    }


def run_vectorbt(
    open_: np.ndarray, inputs: dict[str, np.ndarray], config: BacktestConfig
) -> tuple[np.ndarray, int]:
    import vectorbt as vbt  # dev-only dependency, and slow to import

    kwargs: dict[str, Any] = {
        "price": open_,
        "fees": config.fee_bps / 1e4,
        "slippage": config.slippage_bps / 1e4,
        "init_cash": 1.0,
        "size": np.inf,
        "min_size": 0.0,
        "freq": "1min",
    }
    if config.mode == "long_short":
        kwargs["short_entries"] = inputs["short_entries"]
        kwargs["short_exits"] = inputs["short_exits"]
    pf = vbt.Portfolio.from_signals(open_, inputs["entries"], inputs["exits"], **kwargs)
    return pf.value().to_numpy(), int(pf.orders.count())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mode", choices=["long_short", "long_only"], default="long_short")
    parser.add_argument(
        "--block-minutes", type=int, default=1440, help="fold-like breaks (0: gaps only)"
    )
    args = parser.parse_args()
    if not REAL_1M.exists():
        print(json.dumps({"error": f"real data not found at {REAL_1M}"}))
        return 2
    # Momentum loses on 1-minute BTC; maker fees, 1 bp slippage and a 30 bp edge keep ~15k
    # fills while the account stays far above vectorbt's absolute cash tolerance (1e-12),
    # below which its rounding, not its accounting, would decide the comparison.
    config = BacktestConfig(
        mode=args.mode, fee_side="maker", slippage_bps=1.0, min_edge_bps=30.0, hold_bars=10
    )
    open_, close, block_ids = load_bars(REAL_1M, args.block_minutes)
    n = open_.size
    signals = momentum_signals(close, block_ids, config)
    print(f"bars={n} blocks={int(block_ids[-1]) + 1} signals={int(np.count_nonzero(signals))}")

    ours_s: list[float] = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        result = run_backtest(open_, signals, block_ids, config)
        ours_s.append(time.perf_counter() - started)

    inputs = vbt_inputs(result.positions)
    started = time.perf_counter()
    run_vectorbt(open_[:100], {k: v[:100] for k, v in inputs.items()}, config)
    compile_s = time.perf_counter() - started
    vbt_s: list[float] = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        vbt_equity, vbt_orders = run_vectorbt(open_, inputs, config)
        vbt_s.append(time.perf_counter() - started)

    ours_med = statistics.median(ours_s)
    vbt_med = statistics.median(vbt_s)
    diff = np.abs(vbt_equity - result.equity)
    m = result.metrics
    print(f"ours:     median {ours_med * 1e3:.1f} ms over {args.repeats} runs")
    print(
        f"vectorbt: median {vbt_med * 1e3:.1f} ms "
        f"(import + numba compile + first run {compile_s:.1f} s)"
    )
    print(
        f"fills ours={result.fills} vectorbt={vbt_orders}; final equity {result.equity[-1]:.6f}; "
        f"sharpe {m['sharpe']:.3f}; trades {m['trades']:.0f}; hit {m['hit_rate']:.3f}"
    )
    figures = {
        "bars": n,
        "mode": config.mode,
        "ours_bars_per_s": round(n / ours_med),
        "vectorbt_bars_per_s": round(n / vbt_med),
        "ratio": round(vbt_med / ours_med, 3),
        "ours_ms": round(ours_med * 1e3, 2),
        "vectorbt_ms": round(vbt_med * 1e3, 2),
        "vectorbt_compile_s": round(compile_s, 2),
        "max_abs_equity_diff": float(np.max(diff)),
        "max_rel_equity_diff": float(np.max(diff / np.abs(vbt_equity))),
        "fills": result.fills,
        "vectorbt_fills": vbt_orders,
        "final_equity": float(result.equity[-1]),
        "repeats": args.repeats,
    }
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
