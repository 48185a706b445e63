"""Running the Silver ETL on the connected Ray cluster: one RayDP session per job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.spark import start_spark, stop_spark
from configs.schema import ObjectStoreConfig, SparkConfig
from market.silver import build_silver, summary_dict


def run_feature_etl(
    config: SparkConfig, lake: str | Path, object_store: ObjectStoreConfig | None = None
) -> dict[str, Any]:
    """Start Spark on Ray, build Silver incrementally, stop Spark; returns the job summary.
    `lake` is a path or URI; `object_store` holds an `s3://` lake's endpoint and credentials."""
    session, startup_s = start_spark(config)
    try:
        summary = summary_dict(build_silver(session, lake, object_store))
    finally:
        stop_spark()
    return {"job": "features", "spark_startup_s": round(startup_s, 2), **summary}
