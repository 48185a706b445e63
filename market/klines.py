"""The kline record as Binance publishes it, shared by every source.

A kline is one 1-minute bar. Binance's REST API returns each kline as a 12-element JSON array and
its dump files as a 12-column CSV line in the same order. Timestamps are epoch milliseconds, except
dumps from 2025-01-01 on, which use microseconds (any open_time above 1e14 is microseconds).
"""

from __future__ import annotations

from datetime import UTC, date, datetime

ONE_MINUTE_MS = 60_000
ONE_DAY_MS = 86_400_000
MICROSECOND_THRESHOLD = 10**14

# Binance's column order, identical for REST arrays and dump CSV lines.
RAW_FIELDS: tuple[str, ...] = (
    "open_time",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "close_time",
    "quote_volume",
    "trades",
    "taker_buy_base",
    "taker_buy_quote",
    "ignore",
)

# The validated bar columns of Silver (DESIGN.md section 4), in order.
BAR_COLUMNS: tuple[str, ...] = (
    "symbol",
    "open_time",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "quote_volume",
    "trades",
    "taker_buy_base",
    "taker_buy_quote",
)


def to_millis(timestamp: int) -> int:
    """Epoch milliseconds from a Binance timestamp given in milliseconds or microseconds."""
    return timestamp // 1000 if timestamp > MICROSECOND_THRESHOLD else timestamp


def utc_date(open_time_ms: int) -> date:
    """The UTC calendar date holding a bar that opens at `open_time_ms`."""
    return datetime.fromtimestamp(open_time_ms / 1000, tz=UTC).date()


def date_start_ms(day: date) -> int:
    """Epoch milliseconds of 00:00 UTC on `day`."""
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)


def parse_iso_ms(text: str) -> int:
    """Epoch milliseconds from an ISO-8601 date or datetime (naive means UTC)."""
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def floor_minute(ms: int) -> int:
    """Round epoch milliseconds down to the start of their minute."""
    return ms - ms % ONE_MINUTE_MS


def ceil_minute(ms: int) -> int:
    """Round epoch milliseconds up to the start of a minute."""
    return -(-ms // ONE_MINUTE_MS) * ONE_MINUTE_MS
