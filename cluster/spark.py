"""The one place that builds a Spark session on the Ray cluster through RayDP.

RayDP 1.6.5 on JDK 17 needs the module-opening flags on the driver, the executors and the RayDP
app master, or the first `ray.data.from_spark` kills the app-master actor (DESIGN.md section 6).
Spark's Python workers must run this interpreter (PYSPARK_PYTHON), or pandas UDFs cannot import
pandas.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from configs.schema import SparkConfig

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

JDK17_OPENS = (
    "java.lang",
    "java.lang.invoke",
    "java.io",
    "java.net",
    "java.nio",
    "java.math",
    "java.text",
    "java.util",
    "java.util.concurrent",
    "java.util.concurrent.atomic",
    "sun.nio.ch",
    "sun.nio.cs",
    "sun.security.action",
    "sun.util.calendar",
)


def jdk17_java_options() -> str:
    """The JVM flags RayDP needs on JDK 17."""
    opens = " ".join(f"--add-opens=java.base/{pkg}=ALL-UNNAMED" for pkg in JDK17_OPENS)
    return f"-XX:+IgnoreUnrecognizedVMOptions {opens}"


def spark_configs(config: SparkConfig) -> dict[str, str]:
    """Spark settings for the ETL: JDK 17 flags, UTC, millisecond Parquet timestamps."""
    java_opts = jdk17_java_options()
    settings = {
        "spark.executor.extraJavaOptions": java_opts,
        "spark.driver.extraJavaOptions": java_opts,
        "spark.ray.raydp_app_master.extraJavaOptions": java_opts,
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MILLIS",
        "spark.sql.sources.partitionOverwriteMode": "dynamic",
        "spark.sql.sources.partitionColumnTypeInference.enabled": "false",
        "spark.sql.shuffle.partitions": str(config.shuffle_partitions),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": "50000",
        "spark.sql.adaptive.enabled": "true",
        "spark.ui.enabled": "false",
        "spark.driver.memory": config.driver_memory,
    }
    settings.update(config.extra)
    return settings


def _point_spark_at_this_python() -> None:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def start_spark(config: SparkConfig) -> tuple[SparkSession, float]:
    """Start RayDP's Spark on the connected Ray cluster; returns the session and start-up s."""
    import raydp

    _point_spark_at_this_python()
    started = time.perf_counter()
    session = raydp.init_spark(
        app_name=config.app_name,
        num_executors=config.executors,
        executor_cores=config.executor_cores,
        executor_memory=config.executor_memory,
        configs=spark_configs(config),
    )
    return session, time.perf_counter() - started


def stop_spark() -> None:
    """Stop the RayDP Spark session and its executors."""
    import raydp

    raydp.stop_spark()


@contextmanager
def spark_session(config: SparkConfig) -> Iterator[SparkSession]:
    """A RayDP Spark session for the duration of a `with` block (one per job)."""
    session, _ = start_spark(config)
    try:
        yield session
    finally:
        stop_spark()
