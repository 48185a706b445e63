"""The body of `POST /predict`: its pydantic models (the documented schema and every rule a body
must meet) and a reader that turns a body into the symbol and its bars as numpy columns.

The models, `PredictIn` of `BarIn`s, state the contract and word every refusal. Validating a
400-bar body through them builds 400 model objects, runs a Python validator per bar and leaves
400 dicts to convert into arrays afterwards; `read_predict_body` therefore checks a body first
with whole-column numpy tests of the same rules over the parsed JSON (the same parser pydantic
uses, so the same numbers) and builds the columns directly. That check only ever accepts: a body
it does not take whole (any rule broken, or any form the models' lax parsing would convert, such
as a numeric string or 1e3 for an integer) goes through the models, which then accept or refuse
it exactly as they would have alone, with their own messages.
"""

from __future__ import annotations

import itertools
import operator
import re
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import from_json

from configs.schema import SYMBOL_PATTERN
from market.bar_columns import BAR_FIELDS, INTEGER_FIELDS, BarColumns
from market.klines import MICROSECOND_THRESHOLD, ONE_MINUTE_MS

INT64_LIMIT = 2**63
"""Integers at or past this do not fit the engine's Int64 columns."""


class BarIn(BaseModel):
    """One closed 1-minute bar supplied to `/predict`; `open_time` in epoch milliseconds.

    Every number must be finite (JSON `Infinity`/`NaN`, the string "inf" and overflowing
    literals such as 1e999 are refused). `open_time` lies below 1e14: Binance's microsecond
    timestamps begin there (`market.klines`), and larger values overflow the engine's Int64
    times and calendar dates. `trades` lies below 2**63: the engine holds it as Int64.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    open_time: int = Field(ge=0, lt=MICROSECOND_THRESHOLD)
    open: float = Field(gt=0)
    high: float = Field(gt=0)
    low: float = Field(gt=0)
    close: float = Field(gt=0)
    volume: float = Field(ge=0)
    quote_volume: float = Field(ge=0)
    trades: int = Field(ge=0, lt=INT64_LIMIT)
    taker_buy_base: float = Field(ge=0)
    taker_buy_quote: float = Field(ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> BarIn:
        if self.high < max(self.open, self.close, self.low) or self.low > min(
            self.open, self.close
        ):
            raise ValueError(f"bar {self.open_time}: OHLC inconsistent")
        if self.taker_buy_base > self.volume:
            raise ValueError(f"bar {self.open_time}: taker_buy_base exceeds volume")
        return self


class PredictIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    symbol: str = Field(pattern=SYMBOL_PATTERN)
    bars: list[BarIn] = Field(min_length=1)

    @model_validator(mode="after")
    def _consecutive(self) -> PredictIn:
        times = [bar.open_time for bar in self.bars]
        for earlier, later in itertools.pairwise(times):
            if later - earlier != ONE_MINUTE_MS:
                raise ValueError(
                    "bars must be consecutive 1-minute bars in time order "
                    f"(open_time {earlier} is followed by {later})"
                )
        return self


_BODY_KEYS = frozenset(PredictIn.model_fields)
_SYMBOL = re.compile(SYMBOL_PATTERN)
# A bar's values in BAR_FIELDS order, whatever the order of its keys; KeyError when one lacks.
_bar_values = operator.itemgetter(*BAR_FIELDS)
_INTEGER_TYPES = frozenset({int})
_NUMBER_TYPES = frozenset({int, float})
# Integers past this are not all exactly float64: their conversion is left to the models.
_EXACT_FLOAT_INTEGER = 2**53
_FIELD = {name: j for j, name in enumerate(BAR_FIELDS)}
_POSITIVE = [_FIELD[name] for name in ("open", "high", "low", "close")]
_NON_NEGATIVE = [
    _FIELD[name] for name in ("volume", "quote_volume", "taker_buy_base", "taker_buy_quote")
]


def read_predict_body(body: bytes) -> tuple[str, BarColumns]:
    """The symbol and bars of a `/predict` body, the bars as columns in the body's order.

    Accepts exactly the bodies `PredictIn` accepts, with the values it would give; raises
    pydantic's ValidationError, from `PredictIn`, for any other.
    """
    read = _read_valid_body(body)
    if read is not None:
        return read
    payload = PredictIn.model_validate_json(body)
    return payload.symbol, _columns_of(payload.bars)


def _columns_of(bars: Sequence[BarIn]) -> BarColumns:
    return BarColumns(
        **{
            name: np.array(
                [getattr(bar, name) for bar in bars],
                dtype=np.int64 if name in INTEGER_FIELDS else np.float64,
            )
            for name in BAR_FIELDS
        }
    )


def _read_valid_body(body: bytes) -> tuple[str, BarColumns] | None:
    """The symbol and bar columns of a body that meets every rule of `PredictIn` in its plain
    JSON form (numbers as numbers, integers as integers); None for any other body."""
    try:
        document = from_json(body)
    except ValueError:
        return None
    if type(document) is not dict or document.keys() != _BODY_KEYS:
        return None
    symbol, bars = document["symbol"], document["bars"]
    if type(symbol) is not str or _SYMBOL.fullmatch(symbol) is None:
        return None
    if type(bars) is not list or not bars:
        return None
    if not all(type(bar) is dict and len(bar) == len(BAR_FIELDS) for bar in bars):
        return None
    try:
        rows = list(map(_bar_values, bars))
    except KeyError:  # a field missing (so, at the same length, another one extra)
        return None
    by_field = list(zip(*rows, strict=True))
    for name, column in zip(BAR_FIELDS, by_field, strict=True):
        types = set(map(type, column))
        if name in INTEGER_FIELDS:
            if not types <= _INTEGER_TYPES:
                return None
        elif not types <= _NUMBER_TYPES or (
            int in types and any(abs(v) > _EXACT_FLOAT_INTEGER for v in column if type(v) is int)
        ):
            return None
    open_time, trades = by_field[_FIELD["open_time"]], by_field[_FIELD["trades"]]
    if min(open_time) < 0 or max(open_time) >= MICROSECOND_THRESHOLD:
        return None
    if min(trades) < 0 or max(trades) >= INT64_LIMIT:
        return None
    # One float64 array of every value, field by field (the integers only for the range
    # checks: their columns are built from the integers themselves).
    values = np.array(by_field, dtype=np.float64)
    if not np.isfinite(values).all():
        return None
    if not ((values[_POSITIVE] > 0.0).all() and (values[_NON_NEGATIVE] >= 0.0).all()):
        return None
    bar_open, high, low, close = (values[_FIELD[name]] for name in ("open", "high", "low", "close"))
    if (high < np.maximum(np.maximum(bar_open, close), low)).any():
        return None
    if (low > np.minimum(bar_open, close)).any():
        return None
    if (values[_FIELD["taker_buy_base"]] > values[_FIELD["volume"]]).any():
        return None
    times = np.array(open_time, dtype=np.int64)
    if (np.diff(times) != ONE_MINUTE_MS).any():
        return None
    columns = {
        name: np.array(by_field[j], dtype=np.int64) if name in INTEGER_FIELDS else values[j]
        for j, name in enumerate(BAR_FIELDS)
    }
    columns["open_time"] = times
    return symbol, BarColumns(**columns)
