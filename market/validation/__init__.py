"""Why a kline row is rejected: the quarantine reasons, the rule table and its parameters.

The rules run in two engines: `market.validation.spark_rules` for the Silver ETL (Bronze rows
that fail are quarantined with their reason) and `market.validation.polars_rules` for the live
feed (failing rows are dropped and counted per reason). Both read the parameters declared here
and fold `ROW_RULES` in its order, so a row gets the same reason from either.

Row rules are checked in `ROW_RULES` order; a row gets the first reason that applies. Duplicates
are decided among the rows that pass every row rule, so a rejected row never shadows a good one.
Silver keeps the first of each (symbol, open_time) by source precedence (`SOURCE_PRECEDENCE`),
then `DUPLICATE_TIEBREAK`; the feed reads one source per symbol and keeps the first it receives.

The engines' own parsers differ on a few malformed fields, so those rows are judged
differently (tests/unit/test_validation_rules.py lists them as KNOWN_DIFFERENCES):
Spark's string-to-long cast truncates a fraction (`trades` "1.5" is 1) where polars finds the
field unparseable; Java's double parser accepts a type suffix ("100.5d") where polars does not;
and the whitespace class of `FIELD_NOISE_PATTERN` is Unicode to polars but ASCII to Java, so a
no-break space is stripped by the feed and spoils the field in Silver.

Importing this package loads neither polars nor pyspark: the engines live in the submodules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

from market.klines import ONE_MINUTE_MS, RAW_FIELDS

WRONG_FIELD_COUNT = "wrong_field_count"
UNPARSEABLE_VALUE = "unparseable_value"
BAD_TIMESTAMP = "bad_timestamp"
NON_POSITIVE_PRICE = "non_positive_price"
NEGATIVE_VOLUME = "negative_volume"
OHLC_INCONSISTENT = "ohlc_inconsistent"
TAKER_BUY_EXCEEDS_VOLUME = "taker_buy_exceeds_volume"
DUPLICATE_OPEN_TIME = "duplicate_open_time"

# -- parameters, read by both engines ------------------------------------------------------------

FIELD_COUNT: Final = len(RAW_FIELDS)
"""Fields a kline line must split into (Binance's 12, REST array or dump CSV line alike)."""

FIELD_NOISE_PATTERN: Final = r'[\[\]"\s]'
"""Removed from a raw line before it is split on commas: REST arrays' brackets and quotes."""

PRICE_COLUMNS: Final = ("open", "high", "low", "close")
AMOUNT_COLUMNS: Final = ("volume", "quote_volume", "trades", "taker_buy_base", "taker_buy_quote")
"""Base and quote volumes, trade count, taker-buy volumes: the non-price numeric fields."""

BAR_INTERVAL_MS: Final = ONE_MINUTE_MS
"""A bar's open time (epoch ms) is a whole multiple of this."""

CLOSE_AFTER_OPEN_MS: Final = ONE_MINUTE_MS - 1
"""A bar's close time (epoch ms) is exactly its open time plus this (Binance's 59,999 ms)."""

PRICE_FLOOR: Final = 0
"""Every price must be strictly above this; a price equal to it is rejected."""

AMOUNT_FLOOR: Final = 0
"""Every amount must be at least this; an amount equal to it is accepted."""

HIGH_AT_LEAST: Final = ("open", "close", "low")
"""`high` must be at least each of these."""

LOW_AT_MOST: Final = ("open", "close")
"""`low` must be at most each of these."""

TAKER_BUY_COLUMN: Final = "taker_buy_base"
TAKER_BUY_LIMIT_COLUMN: Final = "volume"
"""Taker-buy base volume is part of the base volume, so it cannot exceed it (equal is fine)."""

SOURCE_PRECEDENCE: dict[str, int] = {"dump": 0, "binance": 1, "sim": 2}
"""Lower wins when two sources deliver the same minute."""

UNKNOWN_SOURCE_PRECEDENCE: Final = 99
"""The precedence of a source missing from `SOURCE_PRECEDENCE`: after every known one."""

DUPLICATE_TIEBREAK: Final = ("fetched_at", "batch", "seq")
"""Bronze columns that order copies of a minute from the same source: the earliest wins."""


# -- the rule table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A quarantine reason and, in one line, what it rejects."""

    reason: str
    description: str


ROW_RULES: tuple[Rule, ...] = (
    Rule(WRONG_FIELD_COUNT, f"the line does not split into {FIELD_COUNT} fields"),
    Rule(
        UNPARSEABLE_VALUE,
        "a timestamp, price or amount does not parse as its type, or a float is NaN or infinite",
    ),
    Rule(
        BAD_TIMESTAMP,
        f"open time (ms, microseconds converted) off the {BAR_INTERVAL_MS} ms grid, or close time "
        f"not open time + {CLOSE_AFTER_OPEN_MS} ms",
    ),
    Rule(NON_POSITIVE_PRICE, f"a price at or below {PRICE_FLOOR}"),
    Rule(NEGATIVE_VOLUME, f"an amount below {AMOUNT_FLOOR}"),
    Rule(OHLC_INCONSISTENT, "high below open, close or low, or low above open or close"),
    Rule(TAKER_BUY_EXCEEDS_VOLUME, f"{TAKER_BUY_COLUMN} above {TAKER_BUY_LIMIT_COLUMN}"),
)
"""The checks of a single row, in the order they are applied."""

DUPLICATE_RULE: Final = Rule(
    DUPLICATE_OPEN_TIME, "a valid row for a (symbol, open_time) already kept from another row"
)

RULES: tuple[Rule, ...] = (*ROW_RULES, DUPLICATE_RULE)
"""Every quarantine reason with its description, in the order they are decided."""

REASONS: tuple[str, ...] = tuple(rule.reason for rule in RULES)

_Condition = TypeVar("_Condition")


def in_rule_order(conditions: Mapping[str, _Condition]) -> list[tuple[str, _Condition]]:
    """An engine's row-rule conditions (keyed by reason) as (reason, condition), in rule order.

    ValueError unless there is exactly one condition per row rule: an engine can neither skip a
    rule nor check one the other engine does not know.
    """
    expected = [rule.reason for rule in ROW_RULES]
    if sorted(conditions) != sorted(expected):
        raise ValueError(f"row-rule conditions for {sorted(conditions)}, expected {expected}")
    return [(reason, conditions[reason]) for reason in expected]
