"""Validated 1-minute bars of one symbol as numpy columns.

The form in which `POST /predict` carries a client's bars from the parsed request body to the
feature engine: ten aligned arrays rather than one Python object per bar, so that nothing on the
way costs per bar (a 400-bar window is 10 arrays to copy or pickle, not 400 dicts). A polars frame
of the same bars (`frame`) is there for the code that reads frames.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import polars as pl

from market.klines import BAR_COLUMNS, ONE_MINUTE_MS

# The bar columns these arrays hold: every validated-bar column but the symbol, in
# market.klines.BAR_COLUMNS order.
BAR_FIELDS: tuple[str, ...] = tuple(name for name in BAR_COLUMNS if name != "symbol")
# The integer columns (int64); the others are float64.
INTEGER_FIELDS: tuple[str, ...] = ("open_time", "trades")


@dataclass(frozen=True)
class BarColumns:
    """Bars of one symbol, one aligned 1-D array per bar column, in the bars' order.

    `open_time` is epoch milliseconds (UTC) and `trades` a count, both int64; the prices and
    volumes are float64. The arrays are what a validator accepted: the type checks nothing but
    their shapes and dtypes.
    """

    open_time: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    quote_volume: np.ndarray
    trades: np.ndarray
    taker_buy_base: np.ndarray
    taker_buy_quote: np.ndarray

    def __post_init__(self) -> None:
        length = self.open_time.shape
        for field in fields(self):
            values = getattr(self, field.name)
            dtype = np.int64 if field.name in INTEGER_FIELDS else np.float64
            if values.ndim != 1 or values.shape != length or values.dtype != dtype:
                raise ValueError(
                    f"bar column {field.name} must be a 1-D {np.dtype(dtype)} array of the "
                    f"length of open_time {length}, got {values.dtype} {values.shape}"
                )

    def __len__(self) -> int:
        return int(self.open_time.shape[0])

    def one_segment(self) -> bool:
        """True when the bars are consecutive 1-minute bars in time order (one segment,
        DESIGN.md section 4: no missing, repeated or out-of-order minute); True for one bar."""
        return bool(np.all(np.diff(self.open_time) == ONE_MINUTE_MS))

    def frame(self, symbol: str) -> pl.DataFrame:
        """The bars as a frame of market.klines.BAR_COLUMNS (`open_time` Int64 epoch ms,
        `trades` Int64, the rest Float64), every row of `symbol`."""
        columns: dict[str, pl.Series] = {"symbol": pl.Series("symbol", [symbol] * len(self))}
        columns.update({name: pl.Series(name, getattr(self, name)) for name in BAR_FIELDS})
        return pl.DataFrame(columns)

    @classmethod
    def from_frame(cls, bars: pl.DataFrame) -> BarColumns:
        """The bar columns of `bars` (market.klines.BAR_COLUMNS; `open_time` epoch ms or a
        UTC datetime), in its row order; the symbol column is not read."""
        open_time = bars["open_time"]
        if open_time.dtype.is_temporal():
            open_time = open_time.dt.epoch("ms")
        arrays = {
            name: bars[name].cast(pl.Int64 if name in INTEGER_FIELDS else pl.Float64).to_numpy()
            for name in BAR_FIELDS
            if name != "open_time"
        }
        return cls(open_time=open_time.cast(pl.Int64).to_numpy(), **arrays)
