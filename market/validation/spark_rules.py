"""The bar validation rules on Spark, for the Silver ETL (`market.silver`).

The same rules, parameters and order as the polars form (`market.validation.polars_rules`).
pyspark is imported inside the functions, as in `market.silver`, so importing this module does
not load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from market import validation as v
from market.features.spark_engine import BAR_TYPES
from market.klines import MICROSECOND_THRESHOLD, RAW_FIELDS

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame


def _to_ms(text_value: Column) -> Column:
    from pyspark.sql import functions as F

    # Binance dumps from 2025 on use microseconds; any timestamp above 1e14 is one.
    value = text_value.cast("long")
    return (
        F.when(value > MICROSECOND_THRESHOLD, F.floor(value / 1000)).otherwise(value).cast("long")
    )


def _row_conditions() -> dict[str, Column]:
    """Per row reason, when it applies to a typed row (`_n` fields, times in ms)."""
    from pyspark.sql import functions as F

    unparseable = F.lit(False)
    for name in ("open_time_ms", "_close_time_ms", *v.PRICE_COLUMNS, *v.AMOUNT_COLUMNS):
        check = F.col(name).isNull()
        if BAR_TYPES.get(name) == "double":
            check = check | F.isnan(name) | (F.abs(F.col(name)) == float("inf"))
        unparseable = unparseable | check
    return {
        v.WRONG_FIELD_COUNT: F.col("_n") != v.FIELD_COUNT,
        v.UNPARSEABLE_VALUE: unparseable,
        v.BAD_TIMESTAMP: (F.col("open_time_ms") % v.BAR_INTERVAL_MS != 0)
        | (F.col("_close_time_ms") != F.col("open_time_ms") + v.CLOSE_AFTER_OPEN_MS),
        v.NON_POSITIVE_PRICE: F.least(*[F.col(c) for c in v.PRICE_COLUMNS]) <= v.PRICE_FLOOR,
        v.NEGATIVE_VOLUME: F.least(*[F.col(c) for c in v.AMOUNT_COLUMNS]) < v.AMOUNT_FLOOR,
        v.OHLC_INCONSISTENT: (F.col("high") < F.greatest(*v.HIGH_AT_LEAST))
        | (F.col("low") > F.least(*v.LOW_AT_MOST)),
        v.TAKER_BUY_EXCEEDS_VOLUME: F.col(v.TAKER_BUY_COLUMN) > F.col(v.TAKER_BUY_LIMIT_COLUMN),
    }


def parse_and_validate(raw: DataFrame) -> DataFrame:
    """Typed bar columns plus `reason` (null for an accepted row) for every Bronze line.

    `raw` holds Bronze's `raw` line with its `symbol`, `source`, `fetched_at`, `batch` and `seq`.
    Adds `open_time_ms` (epoch ms, microseconds converted) and the BAR_TYPES columns.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    fields = F.split(F.regexp_replace(F.col("raw"), v.FIELD_NOISE_PATTERN, ""), ",")
    index = {name: i for i, name in enumerate(RAW_FIELDS)}
    typed = raw.withColumn("_fields", fields).withColumn("_n", F.size("_fields"))
    typed = typed.withColumn("open_time_ms", _to_ms(F.col("_fields")[index["open_time"]]))
    typed = typed.withColumn("_close_time_ms", _to_ms(F.col("_fields")[index["close_time"]]))
    for name, kind in BAR_TYPES.items():
        typed = typed.withColumn(name, F.col("_fields")[index[name]].cast(kind))

    # A null condition (a comparison on an unparsed field) does not apply, as in a CASE WHEN;
    # coalesce then picks the first rule, in rule order, that does.
    reason = F.coalesce(
        *[
            F.when(condition, F.lit(reason))
            for reason, condition in v.in_rule_order(_row_conditions())
        ]
    )
    precedence: Column = F.lit(v.UNKNOWN_SOURCE_PRECEDENCE)
    for source, order in v.SOURCE_PRECEDENCE.items():
        precedence = F.when(F.col("source") == source, F.lit(order)).otherwise(precedence)
    checked = (
        typed.withColumn("reason", reason)
        .withColumn("_precedence", precedence)
        .withColumn("_valid", F.col("reason").isNull())
    )
    # Rank within the rows that passed the other checks: a rejected row must not shadow a good one.
    first_of_minute = Window.partitionBy("symbol", "open_time_ms", "_valid").orderBy(
        "_precedence", *v.DUPLICATE_TIEBREAK
    )
    duplicate = F.col("_valid") & (F.row_number().over(first_of_minute) > 1)
    return checked.withColumn(
        "reason", F.when(duplicate, F.lit(v.DUPLICATE_OPEN_TIME)).otherwise(F.col("reason"))
    )
