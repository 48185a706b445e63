"""Running the Silver ETL on the connected Ray cluster: one RayDP session per job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.spark import start_spark, stop_spark
from configs.schema import SparkConfig
from market.silver import build_silver, summary_dict


def run_feature_etl(config: SparkConfig, lake: str | Path) -> dict[str, Any]:
    """Start Spark on Ray, build Silver incrementally, stop Spark; returns the job summary."""
    session, startup_s = start_spark(config)
    try:
        summary = summary_dict(build_silver(session, lake))
    finally:
        stop_spark()
    return {"job": "features", "spark_startup_s": round(startup_s, 2), **summary}
