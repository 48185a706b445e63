"""The bar validation rules on polars, for the live feed (`serve.engine.feed`).

The same rules, parameters and order as the Spark form (`market.validation.spark_rules`), so a
row the feed drops is one Silver would quarantine, for the same reason.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from market import validation as v
from market.klines import BAR_COLUMNS, MICROSECOND_THRESHOLD, RAW_FIELDS

# The validated-bar frame the feature engine reads (market.klines.BAR_COLUMNS, open_time in
# epoch ms as Int64).
BAR_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "open_time": pl.Int64(),
    "open": pl.Float64(),
    "high": pl.Float64(),
    "low": pl.Float64(),
    "close": pl.Float64(),
    "volume": pl.Float64(),
    "quote_volume": pl.Float64(),
    "trades": pl.Int64(),
    "taker_buy_base": pl.Float64(),
    "taker_buy_quote": pl.Float64(),
}


def _to_ms(value: pl.Expr) -> pl.Expr:
    # Binance dumps from 2025 on use microseconds; any timestamp above 1e14 is one.
    return pl.when(value > MICROSECOND_THRESHOLD).then(value // 1000).otherwise(value)


def _row_conditions() -> dict[str, pl.Expr]:
    """Per row reason, when it applies to a typed row (`_n` fields, `_close_time` in ms)."""
    unparseable = pl.lit(False)
    for name in ("open_time", "_close_time", *v.PRICE_COLUMNS, *v.AMOUNT_COLUMNS):
        check = pl.col(name).is_null()
        if BAR_SCHEMA.get(name) == pl.Float64():
            check = check | pl.col(name).is_nan() | pl.col(name).is_infinite()
        unparseable = unparseable | check
    return {
        v.WRONG_FIELD_COUNT: pl.col("_n") != v.FIELD_COUNT,
        v.UNPARSEABLE_VALUE: unparseable,
        v.BAD_TIMESTAMP: (pl.col("open_time") % v.BAR_INTERVAL_MS != 0)
        | (pl.col("_close_time") != pl.col("open_time") + v.CLOSE_AFTER_OPEN_MS),
        v.NON_POSITIVE_PRICE: pl.min_horizontal(*v.PRICE_COLUMNS) <= v.PRICE_FLOOR,
        v.NEGATIVE_VOLUME: pl.min_horizontal(*v.AMOUNT_COLUMNS) < v.AMOUNT_FLOOR,
        v.OHLC_INCONSISTENT: (pl.col("high") < pl.max_horizontal(*v.HIGH_AT_LEAST))
        | (pl.col("low") > pl.min_horizontal(*v.LOW_AT_MOST)),
        v.TAKER_BUY_EXCEEDS_VOLUME: pl.col(v.TAKER_BUY_COLUMN) > pl.col(v.TAKER_BUY_LIMIT_COLUMN),
    }


def _reason() -> pl.Expr:
    """The first row rule's reason that applies to a typed row, null when the row is valid."""
    # A null condition (a comparison on an unparsed field) does not apply, as in a when-chain;
    # coalesce then picks the first rule, in rule order, that does.
    return pl.coalesce(
        pl.when(condition).then(pl.lit(reason, dtype=pl.String))
        for reason, condition in v.in_rule_order(_row_conditions())
    )


def check_lines(lines: Sequence[str], symbol: str) -> pl.DataFrame:
    """Raw kline lines (CSV dump lines or REST arrays as text) as typed bars with a `reason`.

    Returns the BAR_SCHEMA columns (open_time in epoch ms, microseconds converted), `reason`
    (null for a valid row, else a market.validation reason) in input order. Fields are split
    like the Spark ETL does it: `FIELD_NOISE_PATTERN` removed, then split on commas.
    """
    raw = pl.DataFrame({"raw": list(lines)}, schema={"raw": pl.String})
    fields = pl.col("raw").str.replace_all(v.FIELD_NOISE_PATTERN, "").str.split(",")
    index = {name: i for i, name in enumerate(RAW_FIELDS)}

    def field_as(name: str, dtype: pl.DataType) -> pl.Expr:
        return pl.col("_f").list.get(index[name], null_on_oob=True).cast(dtype, strict=False)

    typed = raw.with_columns(fields.alias("_f")).with_columns(
        pl.col("_f").list.len().alias("_n"),
        pl.lit(symbol, dtype=pl.String).alias("symbol"),
        _to_ms(field_as("open_time", pl.Int64())).alias("open_time"),
        _to_ms(field_as("close_time", pl.Int64())).alias("_close_time"),
        *[
            field_as(name, BAR_SCHEMA[name]).alias(name)
            for name in (*v.PRICE_COLUMNS, *v.AMOUNT_COLUMNS)
        ],
    )
    return typed.with_columns(_reason().alias("reason")).select(*BAR_COLUMNS, "reason")


def check_bars(bars: pl.DataFrame) -> pl.DataFrame:
    """Typed bars (BAR_SCHEMA columns) with the `reason` column of `check_lines` added.

    Such bars have no field count or close time of their own: they count as complete, closing
    `CLOSE_AFTER_OPEN_MS` after they open.
    """
    typed = bars.select(BAR_COLUMNS).cast(BAR_SCHEMA)  # type: ignore[arg-type]
    return (
        typed.with_columns(
            pl.lit(v.FIELD_COUNT).alias("_n"),
            (pl.col("open_time") + v.CLOSE_AFTER_OPEN_MS).alias("_close_time"),
        )
        .with_columns(_reason().alias("reason"))
        .select(*BAR_COLUMNS, "reason")
    )


def first_of_each_minute(bars: pl.DataFrame) -> pl.DataFrame:
    """The first row of each `open_time` (epoch ms), in frame order: the duplicate rule.

    For frames of one symbol's valid bars; every row dropped here is a `DUPLICATE_OPEN_TIME`.
    """
    return bars.filter(pl.col("open_time").is_first_distinct())
