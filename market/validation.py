"""Why a Bronze row is rejected on its way into Silver: the quarantine reasons.

Checked in this order; a row gets the first reason that applies. Duplicates are decided among the
rows that pass every other check: the first of each (symbol, open_time) by source precedence
(dump, then binance, then sim), fetch time, batch and position is kept.
"""

from __future__ import annotations

WRONG_FIELD_COUNT = "wrong_field_count"
UNPARSEABLE_VALUE = "unparseable_value"
BAD_TIMESTAMP = "bad_timestamp"
NON_POSITIVE_PRICE = "non_positive_price"
NEGATIVE_VOLUME = "negative_volume"
OHLC_INCONSISTENT = "ohlc_inconsistent"
TAKER_BUY_EXCEEDS_VOLUME = "taker_buy_exceeds_volume"
DUPLICATE_OPEN_TIME = "duplicate_open_time"

REASONS: tuple[str, ...] = (
    WRONG_FIELD_COUNT,
    UNPARSEABLE_VALUE,
    BAD_TIMESTAMP,
    NON_POSITIVE_PRICE,
    NEGATIVE_VOLUME,
    OHLC_INCONSISTENT,
    TAKER_BUY_EXCEEDS_VOLUME,
    DUPLICATE_OPEN_TIME,
)

# Lower wins when two sources deliver the same minute.
SOURCE_PRECEDENCE: dict[str, int] = {"dump": 0, "binance": 1, "sim": 2}
