"""The Spark and polars forms of the validation rules agree: the same rows through both keep the
same rows, with the same values, and give the same reasons (real Spark through RayDP)."""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest

from market.features.spark_engine import BAR_TYPES
from market.validation.polars_rules import check_lines
from market.validation.spark_rules import parse_and_validate
from tests.unit.test_validation_rules import CASES, KNOWN_DIFFERENCES, SYMBOL, Case, polars_reasons

pytestmark = pytest.mark.integration

_SPARK_TO_POLARS = {"long": pl.Int64, "double": pl.Float64}


def spark_checked(spark: Any, cases: tuple[Case, ...]) -> pl.DataFrame:
    """The Spark form's `reason`, `open_time` (epoch ms) and BAR_TYPES columns, in case order.

    One source, fetch time and batch, `seq` in case order: Silver's duplicate order then is the
    arrival order the feed keeps the first of.
    """
    bronze = spark.createDataFrame(
        [
            (case.line, SYMBOL, "dump", "2024-01-02T00:00:00Z", "b", i)
            for i, case in enumerate(cases)
        ],
        "raw string, symbol string, source string, fetched_at string, batch string, seq long",
    )
    columns = ("reason", "open_time_ms", *BAR_TYPES)
    rows = parse_and_validate(bronze).orderBy("seq").select(*columns).collect()
    schema = {
        "reason": pl.String,
        "open_time": pl.Int64,
        **{name: _SPARK_TO_POLARS[kind] for name, kind in BAR_TYPES.items()},
    }
    return pl.DataFrame([tuple(row) for row in rows], schema=schema, orient="row")


def test_both_forms_give_each_row_the_same_reason(spark: Any) -> None:
    names = [case.name for case in CASES]
    from_spark = dict(zip(names, spark_checked(spark, CASES)["reason"], strict=True))
    from_polars = dict(zip(names, polars_reasons(CASES), strict=True))
    assert from_spark == from_polars
    assert from_polars == {case.name: case.reason for case in CASES}


def test_both_forms_keep_the_same_bars(spark: Any) -> None:
    kept = pl.col("reason").is_null()
    from_spark = spark_checked(spark, CASES).filter(kept).drop("reason")
    checked = check_lines([case.line for case in CASES], SYMBOL).with_columns(
        pl.Series("reason", polars_reasons(CASES), dtype=pl.String)
    )
    from_polars = checked.filter(kept).select(from_spark.columns)
    assert from_polars.height == sum(case.reason is None for case in CASES)
    assert from_spark.equals(from_polars)


def test_the_known_differences_stay_as_documented(spark: Any) -> None:
    cases = tuple(case for case, _ in KNOWN_DIFFERENCES)
    from_spark = spark_checked(spark, cases)["reason"].to_list()
    assert from_spark == [spark_reason for _, spark_reason in KNOWN_DIFFERENCES]
    assert polars_reasons(cases) == [case.reason for case in cases]
