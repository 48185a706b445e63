"""Silver as model-ready arrays, read through Ray Data, and the windows the models train on.

Every symbol's rows are concatenated in (symbol, open_time) order into flat arrays: inputs are
float32 [bars, inputs]. Windows are never materialised: a window is the index of its last bar
(the decision bar t) and a batch gathers `inputs[t - L + 1 .. t]` on the fly, so memory stays at
one copy of the inputs however many windows a fold has (a year of 1-minute bars x 30 inputs is
~70 MB per symbol).

A window is valid only when its L bars are consecutive minutes of one segment with every input
present (past the warm-up). Fold ranges are checked on the decision bar and, for training and
validation, on the target bar t + h too (h = the arrays' `horizon_bars`), so that no label
reaches past its range.

Cross-asset inputs (`MarketArrays.with_cross_asset`): for a universe of symbols, every row
also gets each symbol's 1-minute log return at the row's own minute, a mask saying whether that
return exists, and a one-hot of the row's own symbol, so that one global model trained on all
symbols' windows reads the other markets (see `cross_asset_inputs`).

Labels: MarketArrays carries Silver's forward returns at every spec horizon; `labelled` picks
one horizon and a label kind (`direction`: up/down over the horizon; `triple_barrier`: see
`triple_barrier_labels`; `meta`: see `meta_labels`) for a trial.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa

from configs.schema import MetaLabelConfig, ObjectStoreConfig, TripleBarrierConfig
from market.features.spec import (
    FEATURE_COLUMNS,
    HORIZON_BARS,
    TARGET_HORIZONS_BARS,
    target_ret_column,
    target_up_column,
)
from market.klines import ONE_MINUTE_MS
from market.lake import Lake
from market.silver import silver_files

# Price-level features (SMA, EMA) are not stationary across a year of prices: they are left out
# of the model inputs, and the MACD family (in price units) is divided by the close.
PRICE_LEVEL_FEATURES = ("sma_5", "sma_10", "sma_20", "ema_12", "ema_26")
PRICE_SCALED_FEATURES = ("macd", "macd_signal", "macd_hist")
INPUT_COLUMNS: tuple[str, ...] = tuple(c for c in FEATURE_COLUMNS if c not in PRICE_LEVEL_FEATURES)
SILVER_COLUMNS: tuple[str, ...] = (
    "symbol",
    "open_time",
    "open",
    "high",
    "low",
    "close",
    *FEATURE_COLUMNS,
    *(c for h in TARGET_HORIZONS_BARS for c in (target_ret_column(h), target_up_column(h))),
)
# Read when present: a table without them (a hand-made one) still loads, with the default
# horizon's direction label only.
_OPTIONAL_COLUMNS = ("high", "low")
LABEL_KINDS: tuple[str, ...] = ("direction", "triple_barrier", "meta")
# The triple-barrier label of a bar whose time barrier was reached (or whose two barriers fell
# in one bar), as the classification target: halfway, so the loss pulls P(up) towards 0.5.
TIME_BARRIER_TARGET = 0.5


def model_inputs(columns: Mapping[str, np.ndarray], close: np.ndarray) -> np.ndarray:
    """The model's inputs (float32 [*close.shape, len(INPUT_COLUMNS)]) from spec feature columns.

    `close` and every column have one shape: [bars] for a matrix of bars, or [windows, bars]
    for a batch of windows (the incremental engine's). Used offline (Silver) and online (Serve),
    so both see the same inputs. Nulls must already be NaN.
    """
    out = np.empty((*np.shape(close), len(INPUT_COLUMNS)), dtype=np.float32)
    for j, name in enumerate(INPUT_COLUMNS):
        values = np.asarray(columns[name], dtype=np.float64)
        if name in PRICE_SCALED_FEATURES:
            values = values / close
        out[..., j] = values
    return out


@dataclass(frozen=True)
class MarketArrays:
    """Silver rows of several symbols, concatenated in (symbol, open_time) order.

    `target_ret` / `target_up` are the labels a model trains on: the log return over the next
    `horizon_bars` bars and the classification target of `label` (1/0 for `direction`; 1, 0 or
    TIME_BARRIER_TARGET for `triple_barrier`; 1/0 for `meta`, NaN where the primary rule
    proposes no side). `direction_up` is always the 1/0 up label at `horizon_bars` (what
    directional accuracy is scored against). `forward_returns` holds the log return at every
    horizon Silver carries, so that `labelled` can switch horizon. `primary_side` (+1 long, -1
    short, 0 none; float32) is the primary rule's side at every bar under `meta`, else None.
    """

    symbols: tuple[str, ...]
    symbol_index: np.ndarray  # int32 per bar, index into `symbols`
    open_time_ms: np.ndarray  # int64, bar open time, epoch ms UTC
    open: np.ndarray  # float64
    close: np.ndarray  # float64
    inputs: np.ndarray  # float32 [bars, len(INPUT_COLUMNS)], NaN during warm-up
    target_ret: np.ndarray  # float32 log return over the next `horizon_bars` bars, NaN when null
    target_up: np.ndarray  # float32 classification target (see above), NaN when null
    segment: np.ndarray  # int64, unique across symbols: a new id at every missing minute
    valid_run: np.ndarray  # int64: consecutive bars of this segment with all inputs, ending here
    high: np.ndarray | None = None  # float64, None when the table had no high/low
    low: np.ndarray | None = None  # float64
    forward_returns: Mapping[int, np.ndarray] = field(default_factory=dict)  # bars -> float32
    direction_up: np.ndarray | None = None  # float32 1/0 at `horizon_bars`; None: = target_up
    horizon_bars: int = HORIZON_BARS
    label: str = "direction"
    primary_side: np.ndarray | None = None
    input_columns: tuple[str, ...] = INPUT_COLUMNS  # the columns of `inputs`, in order

    def labelled(
        self,
        horizon_bars: int,
        label: str = "direction",
        barrier: TripleBarrierConfig | None = None,
        round_trip_cost_bps: float = 0.0,
        meta: MetaLabelConfig | None = None,
    ) -> MarketArrays:
        """These arrays with the targets of `horizon_bars` (bars) and `label`.

        `barrier` and `round_trip_cost_bps` (both sides' fees and slippage, bps) set the
        triple-barrier and meta labels; `meta` the meta label's primary rule; they are ignored
        where their label is not picked. Raises ValueError for a horizon the arrays do not
        carry, an unknown label, a barrier label without high/low, or a primary feature that is
        not a model input.
        """
        if label not in LABEL_KINDS:
            raise ValueError(f"unknown label {label!r}: one of {', '.join(LABEL_KINDS)}")
        if horizon_bars not in self.forward_returns:
            carried = sorted(self.forward_returns)
            raise ValueError(f"no {horizon_bars}-bar target in these arrays (carried: {carried})")
        forward = self.forward_returns[horizon_bars]
        up = np.where(np.isfinite(forward), forward > 0, np.nan).astype(np.float32)
        target_up = up
        primary_side = None
        if label in ("triple_barrier", "meta"):
            if self.high is None or self.low is None:
                raise ValueError(f"the {label} label needs Silver's high and low")
            vol = self.inputs[:, INPUT_COLUMNS.index(BARRIER_VOL_COLUMN)].astype(np.float64)
            upper, lower = barrier_widths(
                barrier or TripleBarrierConfig(), horizon_bars, round_trip_cost_bps, vol
            )
            has_horizon = np.isfinite(forward)
            if label == "triple_barrier":
                labels = triple_barrier_labels(
                    self.close, self.high, self.low, has_horizon, horizon_bars, upper, lower
                )
                target_up = barrier_targets(labels)
            else:
                primary_side = primary_sides(self.inputs, meta or MetaLabelConfig())
                target_up = meta_labels(
                    self.close,
                    self.high,
                    self.low,
                    forward,
                    horizon_bars,
                    primary_side,
                    upper,
                    lower,
                    round_trip_cost_bps,
                )
        return replace(
            self,
            target_ret=forward,
            target_up=target_up,
            direction_up=up,
            horizon_bars=horizon_bars,
            label=label,
            primary_side=primary_side,
        )

    def with_cross_asset(self, universe: Sequence[str]) -> MarketArrays:
        """These arrays with `cross_asset_inputs(self, universe)` appended to the inputs (and
        their names, `cross_asset_columns(universe)`, to `input_columns`). Raises ValueError
        when the arrays already carry cross-asset inputs."""
        if self.input_columns != INPUT_COLUMNS:
            raise ValueError("these arrays already carry cross-asset inputs")
        extra = cross_asset_inputs(self, universe)
        return replace(
            self,
            inputs=np.concatenate([self.inputs, extra], axis=1),
            input_columns=INPUT_COLUMNS + cross_asset_columns(universe),
        )

    @property
    def bars(self) -> int:
        return len(self.open_time_ms)

    def symbol_slices(self) -> dict[str, slice]:
        """Row range of each symbol."""
        bounds = np.searchsorted(self.symbol_index, np.arange(len(self.symbols) + 1))
        return {s: slice(int(bounds[i]), int(bounds[i + 1])) for i, s in enumerate(self.symbols)}


def _valid_run(segment: np.ndarray, inputs_ok: np.ndarray) -> np.ndarray:
    """For each bar, how many bars ending here are in one segment with every input present."""
    n = len(segment)
    index = np.arange(n, dtype=np.int64)
    segment_start = np.ones(n, dtype=bool)
    segment_start[1:] = segment[1:] != segment[:-1]
    blocker = np.where(~inputs_ok, index, np.where(segment_start, index - 1, -(2**62)))
    last_block = np.maximum.accumulate(blocker)
    return np.where(inputs_ok, index - last_block, 0)


@dataclass(frozen=True)
class _OrderedRows:
    """A table's rows in (symbol, open_time) order: symbol codes, open times, segment ids and
    `column(name)`, any float column in that order."""

    table: pa.Table
    symbols: tuple[str, ...]
    order: np.ndarray
    code: np.ndarray
    open_time: np.ndarray
    segment: np.ndarray

    @classmethod
    def of(cls, table: pa.Table) -> _OrderedRows:
        symbol_col = table.column("symbol").to_numpy(zero_copy_only=False).astype(str)
        open_time = (
            table.column("open_time").cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64()).to_numpy()
        )
        symbols = tuple(sorted(set(symbol_col.tolist())))
        code = np.searchsorted(np.array(symbols), symbol_col).astype(np.int32)
        order = np.lexsort((open_time, code))
        code, open_time = code[order], open_time[order]
        # A segment breaks at a missing minute or a new symbol.
        step = np.diff(open_time, prepend=open_time[:1] - 2 * ONE_MINUTE_MS)
        new_segment = (step != ONE_MINUTE_MS) | (np.diff(code, prepend=-1) != 0)
        segment = np.cumsum(new_segment).astype(np.int64) - 1
        return cls(table, symbols, order, code, open_time, segment)

    def column(self, name: str) -> np.ndarray:
        values = self.table.column(name).to_numpy(zero_copy_only=False)
        return np.asarray(values, dtype=np.float64)[self.order]


def arrays_from_table(table: pa.Table) -> MarketArrays:
    """Build MarketArrays from a table with the SILVER_COLUMNS (any row order), labelled with
    the default horizon's direction. The table needs the default horizon's targets; other
    horizons' and high/low are read when present."""
    rows = _OrderedRows.of(table)
    close = rows.column("close")
    inputs = model_inputs({name: rows.column(name) for name in INPUT_COLUMNS}, close)
    names = set(table.column_names)
    forward_returns = {
        h: rows.column(target_ret_column(h)).astype(np.float32)
        for h in TARGET_HORIZONS_BARS
        if target_ret_column(h) in names
    }
    high, low = (rows.column(c) if c in names else None for c in _OPTIONAL_COLUMNS)
    target_up = rows.column(target_up_column(HORIZON_BARS)).astype(np.float32)
    return MarketArrays(
        symbols=rows.symbols,
        symbol_index=rows.code,
        open_time_ms=rows.open_time,
        open=rows.column("open"),
        close=close,
        inputs=inputs,
        target_ret=forward_returns[HORIZON_BARS],
        target_up=target_up,
        segment=rows.segment,
        valid_run=_valid_run(rows.segment, np.isfinite(inputs).all(axis=1)),
        high=high,
        low=low,
        forward_returns=forward_returns,
        direction_up=target_up,
    )


CROSS_RETURN_PREFIX = "xret_"
CROSS_MASK_PREFIX = "xmask_"
OWN_SYMBOL_PREFIX = "is_"
CROSS_ASSET_PREFIXES = (CROSS_RETURN_PREFIX, CROSS_MASK_PREFIX, OWN_SYMBOL_PREFIX)


def cross_asset_columns(universe: Sequence[str]) -> tuple[str, ...]:
    """Names of the cross-asset inputs of `universe`: `xret_<S>` for every symbol, then
    `xmask_<S>`, then `is_<S>` (3 per symbol, in the order given)."""
    return tuple(prefix + symbol for prefix in CROSS_ASSET_PREFIXES for symbol in universe)


def cross_asset_inputs(arrays: MarketArrays, universe: Sequence[str]) -> np.ndarray:
    """float32 [bars, 3 x len(universe)]: per row at minute T, for each symbol S of `universe`,

    * `xret_S`: ln(close_S(T) / close_S(T - 1 minute)), S's 1-minute log return over the bar
      that opens at T. S's bar T closes when the row's own bar T does, at the decision, so
      nothing later than the decision is read; 0 when S has no bar at T or at T - 1 minute;
    * `xmask_S`: 1 when that return exists, else 0 (a missing bar is 0 + mask, never dropped,
      so that every symbol keeps all its windows);
    * `is_S`: 1 on S's own rows, else 0 (its own return is then `ret_1`, the others' are the
      other markets).

    Rows are aligned on `open_time_ms`; each symbol of `universe` must be in the arrays.
    """
    missing = sorted(set(universe) - set(arrays.symbols))
    if missing:
        raise ValueError(f"no rows for cross-asset symbols {', '.join(missing)}")
    n = len(universe)
    out = np.zeros((arrays.bars, 3 * n), dtype=np.float32)
    slices = arrays.symbol_slices()
    times = arrays.open_time_ms
    for k, symbol in enumerate(universe):
        rows = slices[symbol]
        own_times = times[rows]
        log_close = np.log(arrays.close[rows])
        step = np.full(len(own_times), np.nan)
        follows = np.diff(own_times) == ONE_MINUTE_MS
        step[1:][follows] = np.diff(log_close)[follows]
        at = np.minimum(np.searchsorted(own_times, times), len(own_times) - 1)
        found = own_times[at] == times
        value = np.where(found, step[at], np.nan)
        known = np.isfinite(value)
        out[:, k] = np.where(known, value, 0.0)
        out[:, n + k] = known
        out[rows, 2 * n + k] = 1.0
    return out


# The volatility that `vol` barriers scale: per-bar std of 1-minute log returns, last 60 bars.
BARRIER_VOL_COLUMN = "rv_60"


def barrier_widths(
    config: TripleBarrierConfig, horizon_bars: int, round_trip_cost_bps: float, vol: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(upper, lower) barrier distances per bar, in log-return units, both > 0.

    `bps`: profit_take / stop_loss basis points; `vol`: multiples of `vol` (per-bar std of log
    returns) x sqrt(horizon_bars). Each is widened by the round-trip cost (bps), so that a
    touch of the upper barrier pays for a long's fees and slippage, and of the lower a
    short's. NaN where `vol` is NaN (under `vol`).
    """
    cost = round_trip_cost_bps / 1e4
    # Per unit of profit_take / stop_loss, in log-return units.
    per_bps = np.full(vol.shape, 1e-4)
    scale = per_bps if config.unit == "bps" else vol * np.sqrt(horizon_bars)
    return config.profit_take * scale + cost, config.stop_loss * scale + cost


def triple_barrier_labels(
    close: np.ndarray,
    high: np.ndarray,
    low: np.ndarray,
    has_horizon: np.ndarray,
    horizon_bars: int,
    upper: np.ndarray,
    lower: np.ndarray,
) -> np.ndarray:
    """float32 per bar t: +1 if a high of bars t+1..t+h reaches ln(high/close_t) >= upper
    first, -1 if a low reaches ln(low/close_t) <= -lower first, 0 when neither does within h
    bars or both do in the same bar (their order inside it is unknown); NaN where
    `has_horizon` is false (bar t+h not in t's segment) or a barrier is NaN.

    Reads only close_t (known at the decision) and bars t+1..t+h: rows are in time order and
    `has_horizon` guarantees that those h rows are the same segment's next h minutes.
    """
    return _first_touch(close, high, low, has_horizon, horizon_bars, upper, lower)[0]


def _first_touch(
    close: np.ndarray,
    high: np.ndarray,
    low: np.ndarray,
    has_horizon: np.ndarray,
    horizon_bars: int,
    upper: np.ndarray,
    lower: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(`triple_barrier_labels`, touched): `touched` is True where a barrier was reached
    within the horizon, both in one bar included, so that a 0 label tells a time barrier
    (False) from an ambiguous bar (True)."""
    n = len(close)
    labels = np.full(n, np.nan, dtype=np.float32)
    touched = np.zeros(n, dtype=bool)
    pending = np.flatnonzero(has_horizon & np.isfinite(upper) & np.isfinite(lower))
    if pending.size == 0:
        return labels, touched
    labels[pending] = 0.0
    log_close = np.log(close)
    up_at = log_close[pending] + upper[pending]
    down_at = log_close[pending] - lower[pending]
    for k in range(1, horizon_bars + 1):
        ahead = pending + k
        hit_up = np.log(high[ahead]) >= up_at
        hit_down = np.log(low[ahead]) <= down_at
        settled = hit_up | hit_down
        labels[pending[hit_up & ~hit_down]] = 1.0
        labels[pending[hit_down & ~hit_up]] = -1.0
        touched[pending[settled]] = True
        keep = ~settled
        pending, up_at, down_at = pending[keep], up_at[keep], down_at[keep]
        if pending.size == 0:
            break
    return labels, touched


def primary_sides(inputs: np.ndarray, config: MetaLabelConfig) -> np.ndarray:
    """The meta label's primary side per bar (float32 +1 long, -1 short, 0 none): the sign of
    the model input `config.primary_feature` at bar t (known at t's close), flipped under
    `reversal`; 0 where it is zero or missing. Raises ValueError for a name that is not a
    model input."""
    if config.primary_feature not in INPUT_COLUMNS:
        raise ValueError(
            f"primary_feature {config.primary_feature!r} is not a model input: one of "
            f"{', '.join(INPUT_COLUMNS)}"
        )
    values = inputs[:, INPUT_COLUMNS.index(config.primary_feature)].astype(np.float64)
    side = np.sign(np.nan_to_num(values, nan=0.0))
    if config.primary_rule == "reversal":
        side = -side
    return side.astype(np.float32)


def meta_labels(
    close: np.ndarray,
    high: np.ndarray,
    low: np.ndarray,
    forward: np.ndarray,
    horizon_bars: int,
    side: np.ndarray,
    upper: np.ndarray,
    lower: np.ndarray,
    round_trip_cost_bps: float,
) -> np.ndarray:
    """float32 per bar t: 1 when the trade of `side` (+1 long, -1 short) entered at close_t
    clears the round-trip cost within `horizon_bars` bars, else 0; NaN where the side is 0 or
    the horizon has no label (`forward`, the log return over the horizon, is NaN).

    `upper` / `lower` are the triple barrier's distances (log units, cost included,
    `barrier_widths`): a long takes profit at +upper and stops at -lower; a short mirrors them
    (profit at -upper, stop at +lower). 1: the profit-take barrier is touched first, or
    neither is touched and side x forward > the cost (bps / 1e4). 0: the stop comes first,
    both fall in one bar (order unknown: counted as failure), or the trade times out short of
    the cost. Like `triple_barrier_labels` it reads close_t and bars t+1..t+h only.
    """
    has_horizon = np.isfinite(forward)
    out = np.full(len(close), np.nan, dtype=np.float32)
    cost = round_trip_cost_bps / 1e4
    for direction, rise, fall in ((1.0, upper, lower), (-1.0, lower, upper)):
        proposed = has_horizon & (side == direction)
        labels, touched = _first_touch(close, high, low, proposed, horizon_bars, rise, fall)
        rows = np.flatnonzero(proposed & np.isfinite(labels))
        won = labels[rows] == direction
        timed_out = ~touched[rows] & (direction * forward[rows].astype(np.float64) > cost)
        out[rows] = (won | timed_out).astype(np.float32)
    return out


def barrier_targets(labels: np.ndarray) -> np.ndarray:
    """The classification target of triple-barrier labels: +1 -> 1, -1 -> 0, 0 ->
    TIME_BARRIER_TARGET; NaN stays NaN (float32)."""
    return np.where(labels == 0.0, TIME_BARRIER_TARGET, (labels + 1.0) / 2.0).astype(np.float32)


def load_silver(
    lake: str, symbols: Sequence[str] | None = None, object_store: ObjectStoreConfig | None = None
) -> MarketArrays:
    """Read Silver (`<lake>/silver`, a path or URI) through Ray Data into MarketArrays.

    On an object store only the files Silver's last commit lists are read (`market.silver.
    silver_files`); its settings from `object_store` and the environment. Needs a connected Ray.
    Only the columns the models use are read. Raises FileNotFoundError with a hint when Silver
    is missing and ValueError when a requested symbol has no rows.
    """
    import ray.data
    from ray.data.datasource import Partitioning, PartitionStyle

    silver = Lake.at(lake).silver_location
    try:
        where = silver_files(lake, object_store)
        dataset = ray.data.read_parquet(
            where.sources,
            filesystem=where.filesystem,
            columns=list(SILVER_COLUMNS),
            file_extensions=["parquet"],
            partitioning=Partitioning(PartitionStyle.HIVE, base_dir=where.base_dir),
        )
    except (FileNotFoundError, OSError) as error:
        raise FileNotFoundError(f"no Silver at {silver}: run `python -m jobs.features`") from error
    if symbols:
        wanted = set(symbols)
        dataset = dataset.filter(lambda row: row["symbol"] in wanted)
    tables = [t for t in ray.get(dataset.to_arrow_refs()) if t.num_rows]
    if not tables:
        raise ValueError(f"Silver at {silver} has no rows for symbols {symbols or 'any'}")
    arrays = arrays_from_table(pa.concat_tables(tables, promote_options="permissive"))
    missing = sorted(set(symbols or ()) - set(arrays.symbols))
    if missing:
        raise ValueError(f"Silver at {silver} has no rows for {', '.join(missing)}")
    return arrays


def window_ends(
    arrays: MarketArrays,
    start_ms: int,
    end_ms: int,
    window_bars: int,
    *,
    labelled: bool,
) -> np.ndarray:
    """Decision bars t in [start_ms, end_ms) whose window of `window_bars` bars is valid.

    With `labelled`, t also needs its target and its target bar t + horizon_bars inside the
    range, so no label reaches past the range (training and validation). Returns int64 row
    indices.
    """
    in_range = (arrays.open_time_ms >= start_ms) & (arrays.open_time_ms < end_ms)
    ok = in_range & (arrays.valid_run >= window_bars)
    if labelled:
        target_inside = arrays.open_time_ms + arrays.horizon_bars * ONE_MINUTE_MS < end_ms
        ok &= target_inside & np.isfinite(arrays.target_ret) & np.isfinite(arrays.target_up)
    return np.flatnonzero(ok).astype(np.int64)


def window_ends_in(
    arrays: MarketArrays,
    ranges: Sequence[tuple[int, int]],
    window_bars: int,
    *,
    labelled: bool,
) -> np.ndarray:
    """`window_ends` over several half-open [start_ms, end_ms) ranges, ascending: with
    `labelled`, no label reaches past the end of its own range."""
    if not ranges:
        return np.zeros(0, dtype=np.int64)
    ends = [window_ends(arrays, a, b, window_bars, labelled=labelled) for a, b in ranges]
    return np.sort(np.concatenate(ends))


@dataclass(frozen=True)
class Scaler:
    """Per-input mean and std fitted on one training range, and the target's scale.

    `target_scale` is the std of the horizon's log return on the training windows; the network
    regresses target / target_scale so that its two losses have comparable size.
    """

    mean: np.ndarray
    std: np.ndarray
    target_scale: float
    columns: tuple[str, ...] = INPUT_COLUMNS

    @classmethod
    def fit(cls, arrays: MarketArrays, train_ends: np.ndarray, window_bars: int) -> Scaler:
        """Fit on every bar that a training window reads (and nothing after them)."""
        # Mark the bars covered by any window with a +1/-1 difference array: O(bars), no
        # [windows x L] index matrix.
        cover = np.zeros(arrays.bars + 1, dtype=np.int64)
        np.add.at(cover, train_ends - window_bars + 1, 1)
        np.add.at(cover, train_ends + 1, -1)
        rows = np.flatnonzero(np.cumsum(cover[:-1]) > 0)
        values = arrays.inputs[rows].astype(np.float64)
        std = values.std(axis=0)
        target_scale = float(np.std(arrays.target_ret[train_ends].astype(np.float64)))
        return cls(
            mean=values.mean(axis=0),
            std=np.where(std > 1e-12, std, 1.0),
            target_scale=target_scale if target_scale > 0 else 1.0,
            columns=arrays.input_columns,
        )

    def transform(self, inputs: np.ndarray) -> np.ndarray:
        return ((inputs - self.mean) / self.std).astype(np.float32)

    def to_json(self) -> str:
        return json.dumps(
            {
                "columns": list(self.columns),
                "mean": self.mean.tolist(),
                "std": self.std.tolist(),
                "target_scale": self.target_scale,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Scaler:
        data = json.loads(text)
        columns = tuple(data["columns"])
        extra = columns[len(INPUT_COLUMNS) :]
        if columns[: len(INPUT_COLUMNS)] != INPUT_COLUMNS or not all(
            c.startswith(CROSS_ASSET_PREFIXES) for c in extra
        ):
            raise ValueError(f"scaler columns {columns} differ from the model inputs")
        return cls(
            mean=np.asarray(data["mean"], dtype=np.float64),
            std=np.asarray(data["std"], dtype=np.float64),
            target_scale=float(data["target_scale"]),
            columns=columns,
        )


def gather_windows(normalised: np.ndarray, ends: np.ndarray, window_bars: int) -> np.ndarray:
    """float32 [len(ends), window_bars, inputs]: the windows ending at `ends` (oldest first)."""
    offsets = np.arange(-window_bars + 1, 1, dtype=np.int64)
    return normalised[ends[:, None] + offsets]
