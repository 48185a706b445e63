"""The offline feature engine: the shared spec on Spark.

Segments and targets are Spark window expressions partitioned by symbol; the features run as a
grouped-map pandas UDF, one call per symbol, over the numpy kernel (recursive EMAs and Wilder
means have no Spark window form).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from market.features import spec
from market.features.numpy_kernel import compute_symbol_features
from market.klines import ONE_MINUTE_MS

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

BAR_TYPES: dict[str, str] = {
    "open": "double",
    "high": "double",
    "low": "double",
    "close": "double",
    "volume": "double",
    "quote_volume": "double",
    "trades": "long",
    "taker_buy_base": "double",
    "taker_buy_quote": "double",
}
_KERNEL_INPUTS = ("close", "high", "low", "volume", "trades", "taker_buy_base")


def feature_output_ddl() -> str:
    """The schema (Spark DDL) of the pandas UDF's output."""
    columns = ["symbol string", "open_time_ms long", "segment long"]
    columns += [f"{name} {kind}" for name, kind in BAR_TYPES.items()]
    columns += [f"{name} double" for name in spec.FEATURE_COLUMNS]
    for h in spec.TARGET_HORIZONS_BARS:
        columns += [
            f"{spec.target_close_column(h)} double",
            f"{spec.target_ret_column(h)} double",
            f"{spec.target_up_column(h)} int",
        ]
    return ", ".join(columns)


def _features_for_symbol(pdf: pd.DataFrame) -> pd.DataFrame:
    pdf = pdf.sort_values("open_time_ms", kind="stable").reset_index(drop=True)
    arrays = {name: pdf[name].to_numpy(dtype=np.float64) for name in _KERNEL_INPUTS}
    features = compute_symbol_features(
        pdf["open_time_ms"].to_numpy(dtype=np.int64), pdf["segment"].to_numpy(np.int64), arrays
    )
    for name, values in features.items():
        pdf[name] = pd.array(values, dtype="Float64")
    return pdf


def add_segments_and_targets(bars: DataFrame) -> DataFrame:
    """Segment ids and the targets at every spec horizon per symbol (Spark windows by symbol)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    by_time = Window.partitionBy("symbol").orderBy("open_time_ms")
    step = F.col("open_time_ms") - F.lag("open_time_ms").over(by_time)
    with_breaks = bars.withColumn(
        "_new_segment", F.when(step.isNull() | (step != ONE_MINUTE_MS), 1).otherwise(0)
    ).withColumn("_missing_minutes", F.coalesce(step / ONE_MINUTE_MS - 1, F.lit(0)).cast("long"))
    running = by_time.rowsBetween(Window.unboundedPreceding, Window.currentRow)
    out = with_breaks.withColumn("segment", F.sum("_new_segment").over(running).cast("long"))
    for h in spec.TARGET_HORIZONS_BARS:
        # The row h ahead is the target only if it is exactly h minutes later (same segment).
        future_time = F.lead("open_time_ms", h).over(by_time)
        future_close = F.lead("close", h).over(by_time)
        target = F.when(future_time == F.col("open_time_ms") + h * ONE_MINUTE_MS, future_close)
        close_column = spec.target_close_column(h)
        out = (
            out.withColumn(close_column, target)
            .withColumn(spec.target_ret_column(h), F.log(F.col(close_column) / F.col("close")))
            .withColumn(
                spec.target_up_column(h),
                F.when(
                    F.col(close_column).isNotNull(),
                    (F.col(close_column) > F.col("close")).cast("int"),
                ),
            )
        )
    return out


def compute_features_spark(segmented: DataFrame) -> DataFrame:
    """Every feature of the spec, per symbol, through the numpy kernel in a pandas UDF."""
    keep = ["symbol", "open_time_ms", "segment", *BAR_TYPES, *spec.TARGET_COLUMNS]
    return (
        segmented.select(*keep)
        .groupBy("symbol")
        .applyInPandas(_features_for_symbol, schema=feature_output_ddl())
    )
