"""Benchmark: the Silver feature ETL on Spark-on-Ray (RayDP) vs the polars engine, one run.

Both engines start from the same Parquet of validated bars (the real BTCUSDT year replicated to
`--symbols` symbols), compute every feature and target of the spec, and write Parquet. Spark runs
once per executor count in `--executors`. Last line: one JSON object of figures.

    .venv/bin/python -m bench.etl [--symbols 10] [--executors 1,2]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl

from cluster.ray_runtime import connect
from cluster.spark import start_spark, stop_spark
from configs.schema import RayConfig, SparkConfig
from market.features.polars_engine import compute_features
from market.features.spark_engine import BAR_TYPES, add_segments_and_targets, compute_features_spark
from market.klines import RAW_FIELDS

REAL_1M = (
    Path(__file__).resolve().parents[2]
    / "shared/data/raw/BTCUSDT-1m-spot-2023-12-01_2024-12-31.csv.gz"
)


def replicated_bars(symbols: int) -> pl.DataFrame:
    raw = pl.read_csv(REAL_1M, has_header=False, new_columns=list(RAW_FIELDS))
    bars = raw.drop("close_time", "ignore")
    return pl.concat(
        [bars.with_columns(pl.lit(f"BTC{i:02d}USDT").alias("symbol")) for i in range(symbols)]
    )


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0


def run_polars(source: Path, target: Path) -> float:
    started = time.perf_counter()
    features = compute_features(pl.read_parquet(source))
    features.write_parquet(target)
    return time.perf_counter() - started


def run_spark(source: Path, target: Path, executors: int) -> dict[str, Any]:
    # A distinct app name per run: RayDP names its master actor after the app, and the previous
    # run's actor can still hold the name while it shuts down.
    config = SparkConfig(
        app_name=f"bench-etl-{executors}x",
        executors=executors,
        executor_cores=1,
        executor_memory="4g",
        shuffle_partitions=max(2, 2 * executors),
    )
    session, startup = start_spark(config)
    try:
        started = time.perf_counter()
        bars = session.read.parquet(str(source)).withColumnRenamed("open_time", "open_time_ms")
        bars = bars.select("symbol", "open_time_ms", *BAR_TYPES)
        features = compute_features_spark(add_segments_and_targets(bars))
        features.write.mode("overwrite").parquet(str(target))
        elapsed = time.perf_counter() - started
        partitions = session.read.parquet(str(target)).rdd.getNumPartitions()
    finally:
        stop_spark()
    return {"seconds": elapsed, "startup_s": startup, "output_partitions": partitions}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--symbols", type=int, default=10)
    parser.add_argument("--executors", default="1,2")
    args = parser.parse_args()
    if not REAL_1M.exists():
        print(json.dumps({"error": f"real data not found at {REAL_1M}"}))
        return 2
    connect(RayConfig(num_cpus=2))
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        bars = replicated_bars(args.symbols)
        rows = bars.height
        bars.write_parquet(work / "bars.parquet", row_group_size=100_000)
        del bars
        polars_s = run_polars(work / "bars.parquet", work / "polars.parquet")
        print(f"polars: {polars_s:.1f} s", file=sys.stderr)
        spark_runs = {}
        for executors in (int(e) for e in args.executors.split(",")):
            spark_runs[executors] = run_spark(
                work / "bars.parquet", work / f"spark{executors}", executors
            )
            print(f"spark executors={executors}: {spark_runs[executors]}", file=sys.stderr)
    best = min(spark_runs.values(), key=lambda r: r["seconds"])
    figures = {
        "rows": rows,
        "polars_rows_per_s": round(rows / polars_s),
        "spark_rows_per_s": round(rows / best["seconds"]),
        "ratio": round(polars_s / best["seconds"], 4),
        "spark_startup_s": round(best["startup_s"], 2),
        "spark_rows_per_s_by_executors": {
            str(k): round(rows / r["seconds"]) for k, r in spark_runs.items()
        },
        "spark_output_partitions": best["output_partitions"],
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
