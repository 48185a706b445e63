"""Vectorised backtest of BUY / SELL / NEUTRAL decisions on 1-minute bars.

Timing. The decision taken at the close of bar t is executed at the OPEN of bar t+1; nothing
ever trades on the bar whose close produced the signal. Positions are marked on open prices.

Alignment of the arrays of a `BacktestResult` (all of length n, one entry per input bar):

* ``positions[k]``: the position held after the fills at open k, i.e. over the interval
  ``[open_k, open_{k+1})``. It is the target decided at the close of bar k-1.
* ``equity[k]``: account value right after the fills at open k, marked at open k. The equity
  before the first bar is 1.0 (the initial cash) and is *not* part of the array.
* ``returns[k] = equity[k] / equity[k-1] - 1`` (``equity[-1] = 1.0``): the interval
  ``[open_{k-1}, open_k)`` plus the costs of the fills at open k. So the position
  ``positions[k]`` earns its price move in ``returns[k+1]``.

This is exactly `vectorbt.Portfolio.from_signals(close=open_, ...)` with the orders placed on
the bars where `positions` changes: `pf.value()` is `equity` and `pf.returns()` is `returns`.

Blocks. ``block_ids`` (nondecreasing ints) mark breaks: data gaps, fold boundaries, another
symbol. Nothing is held across a break: a position is closed at the last open of its block,
and a block's first bar is always flat, because the decision that would set it was taken at
the close of the previous block's last bar.

Accounting (all-in compounding, vectorbt's ``size=np.inf``). With equity V at an entry at
open P, fee rate f (``fee_bps / 1e4`` per side, on traded notional) and slippage s:

* long: buys ``L = V / (P (1+s) (1+f))`` units, cash 0; value ``L * open_k``; the exit at Q
  sells at ``Q (1-s)`` and pays fee f on that notional, leaving ``L Q (1-s) (1-f)``.
* short: sells ``S = V / (P (1-s) (1+f))`` units (vectorbt sizes a short so that proceeds plus
  fee use up the free cash), cash becomes ``V + S P (1-s) (1-f) = 2V / (1+f)``; value
  ``cash - S * open_k``; covering at Q buys at ``Q (1+s)`` plus fee f, leaving
  ``V (2 / (1+f) - Q (1+s) / (P (1-s)))``. The short holds a fixed number of units, so its
  per-bar return is ``-S * (open_k - open_{k-1}) / equity``, not exactly ``-r_k``.
* a reversal is one order in vectorbt, but its cash flows are those of closing the position
  and then opening the opposite one all-in at the same price, fees on both legs; that is how
  it is computed here.

Each trade therefore multiplies equity by a closed-form factor, equity at every entry is a
cumulative product of the factors before it, and the mark-to-market inside a trade is a
closed form in ``open_k / P``: the ledger has no per-bar Python loop. One vectorbt behaviour is
not reproduced: covering a short after the price more than doubles (cash cannot pay for the
cover and vectorbt fills it partially); on 1-minute bars with a `hold_bars` horizon that does
not happen.

Probability sizing (``BacktestConfig.sizing == "probability"``). A position is an *exposure*
e: signed notional as a fraction of equity, in [-1, 1] (long_only: [0, 1]), its size set by
the P(up) of the signal that opened or last renewed it (`probability_sizes`). The book is
rebalanced to e at every open, and every change of exposure pays the fee and the slippage on
the notional traded, ``|e_k - e_{k-1}|`` times the equity at open k, entries, exits,
reversals (2 units of turnover) and re-sizings alike. With c = ``(fee_bps + slippage_bps) / 1e4``
and ``m_k = open_k / open_{k-1} - 1``::

    equity[k] = equity[k-1] * (1 + e_{k-1} * m_k) * (1 - c * |e_k - e_{k-1}|)

The re-balancing of a constant exposure against the price drift inside a bar is not charged:
on 1-minute bars it trades about |e * m| of equity (1e-3 or less), against turnovers of 0.1 to
2 at the fills. A round trip is a run of bars whose exposure keeps one sign.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from configs.schema import BacktestConfig
from market.features.spec import HORIZON_BARS
from models.metrics import annualised_sharpe, summarise

__all__ = [
    "BUY",
    "NEUTRAL",
    "SELL",
    "BacktestResult",
    "backtest_positions",
    "block_bounds",
    "buy_and_hold",
    "decide_signals",
    "held_positions",
    "meta_signals",
    "positions_from_signals",
    "probability_sizes",
    "regime_breakdown",
    "regime_labels",
    "run_backtest",
]

BUY = 1
SELL = -1
NEUTRAL = 0


@dataclass(frozen=True)
class BacktestResult:
    """Outcome of one backtest; every array has one entry per input bar (see module doc).

    Attributes:
        returns: net per-bar simple returns (float64), ``equity[k] / equity[k-1] - 1``.
        gross_returns: the same ledger without fees and slippage.
        equity: net account value after the fills at open k, marked at open k; the initial
            equity 1.0 sits before bar 0 and is not included.
        positions: position held over ``[open_k, open_{k+1})``: +1 long, -1 short, 0 flat.
        fills: number of orders (a reversal is one order, as in vectorbt).
        trade_pnls: net return of each closed round trip (equity after the exit over equity
            before the entry, minus 1), fees and slippage of both legs included.
        fees_paid: total fees, in units of the initial equity (1.0); slippage not included.
        metrics: `performance_summary` of `returns`, `positions` and `trade_pnls`.
    """

    returns: np.ndarray
    gross_returns: np.ndarray
    equity: np.ndarray
    positions: np.ndarray
    fills: int
    trade_pnls: np.ndarray
    fees_paid: float
    metrics: dict[str, float]


def decide_signals(
    p_up: np.ndarray, predicted_return: np.ndarray, config: BacktestConfig
) -> np.ndarray:
    """BUY (+1) / SELL (-1) / NEUTRAL (0) per bar, as int8, from a model's two outputs.

    Args:
        p_up: probability that the price is up over the horizon.
        predicted_return: predicted LOG return over the `hold_bars`-bar horizon.
        config: thresholds and costs.

    The edge must pay a round trip: ``2 * (fee_bps + slippage_bps) / 1e4 + min_edge_bps / 1e4``
    (a fraction, compared with the log return directly: the two differ by about cost**2 / 2,
    2e-6 at a 20 bps cost, far below any model's precision). BUY needs
    ``p_up >= p_up_threshold`` and a predicted return above the cost; SELL needs
    ``p_up <= 1 - p_up_threshold`` and one below minus the cost. NaN in either input is NEUTRAL.
    """
    p = np.asarray(p_up, dtype=np.float64)
    pred = np.asarray(predicted_return, dtype=np.float64)
    if p.shape != pred.shape:
        raise ValueError(f"p_up shape {p.shape} differs from predicted_return shape {pred.shape}")
    cost = 2.0 * (config.fee_bps + config.slippage_bps) / 1e4 + config.min_edge_bps / 1e4
    # The slack keeps the two thresholds mirror images in binary floating point: without it
    # 1 - 0.55 rounds below 0.45, and p_up = 0.45 would not SELL while 0.55 BUYs.
    slack = 1e-12
    # NaN compares False, so a NaN in either input falls through to NEUTRAL.
    buy = (p >= config.p_up_threshold - slack) & (pred > cost)
    sell = (p <= 1.0 - config.p_up_threshold + slack) & (pred < -cost)
    signals = np.zeros(p.shape, dtype=np.int8)
    signals[buy] = BUY
    signals[sell] = SELL
    return signals


def meta_signals(p_meta: np.ndarray, side: np.ndarray, config: BacktestConfig) -> np.ndarray:
    """BUY (+1) / SELL (-1) / NEUTRAL (0) per bar, as int8, under the `meta` label.

    Args:
        p_meta: the meta model's probability that the primary side's trade clears the
            round-trip cost within the horizon (its label says so already, so no predicted
            return is asked to pay the cost again).
        side: the primary rule's side at each bar (+1 long, -1 short, 0 none).
        config: `p_up_threshold` is the probability the meta model must reach.

    The primary side is traded where ``p_meta >= p_up_threshold``; NaN or no side is NEUTRAL.
    Under probability sizing `p_meta` sizes the position as P(up) does a long's
    (`probability_sizes`).
    """
    p = np.asarray(p_meta, dtype=np.float64)
    proposed = np.asarray(side, dtype=np.float64)
    if p.shape != proposed.shape:
        raise ValueError(f"p_meta shape {p.shape} differs from side shape {proposed.shape}")
    # The same slack as decide_signals, so that both labels meet the threshold alike.
    trade = (p >= config.p_up_threshold - 1e-12) & np.isfinite(proposed)
    signals = np.zeros(p.shape, dtype=np.int8)
    signals[trade] = np.sign(proposed[trade]).astype(np.int8)
    return signals


def probability_sizes(p_up: np.ndarray, config: BacktestConfig) -> np.ndarray:
    """Size (fraction of equity, in [0, 1]) of a position opened on each bar's P(up).

    ``clip(|p_up - 0.5| / (full_size_p_up - 0.5), 0, 1)``: zero at a coin flip, rising linearly
    to all in at ``p_up >= full_size_p_up`` for a long (``p_up <= 1 - full_size_p_up`` for a
    short). `decide_signals` still gates entries at `p_up_threshold`, so the smallest position
    opened is ``(p_up_threshold - 0.5) / (full_size_p_up - 0.5)`` (0.2 at the defaults 0.55 and
    0.75). NaN is 0.
    """
    p = np.asarray(p_up, dtype=np.float64)
    size = np.abs(p - 0.5) / (config.full_size_p_up - 0.5)
    np.clip(size, 0.0, 1.0, out=size)
    size[~np.isfinite(size)] = 0.0
    return size


def _check_blocks(block_ids: np.ndarray, n: int) -> np.ndarray:
    blocks = np.asarray(block_ids)
    if blocks.shape != (n,):
        raise ValueError(f"block_ids shape {blocks.shape} differs from ({n},)")
    if n > 1 and bool(np.any(blocks[1:] < blocks[:-1])):
        raise ValueError("block_ids must be nondecreasing")
    return blocks


def block_bounds(block_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (first bar of its block, last bar of its block) of a block id array."""
    blocks = np.asarray(block_ids)
    n = blocks.size
    first = np.ones(n, dtype=bool)
    last = np.ones(n, dtype=bool)
    if n > 1:
        change = blocks[1:] != blocks[:-1]
        first[1:] = change
        last[:-1] = change
    return first, last


def positions_from_signals(
    signals: np.ndarray,
    block_ids: np.ndarray,
    config: BacktestConfig,
    sizes: np.ndarray | None = None,
) -> np.ndarray:
    """Target position decided at the close of each bar (float64: +1, -1 or 0, or with
    `sizes` the signal's direction times its bar's size, a fraction of equity in [0, 1]).

    The latest non-NEUTRAL signal of the same block, at most ``hold_bars - 1`` bars old, sets
    the target: a BUY or SELL holds for `hold_bars` decisions, a new same-direction signal
    restarts the count (extends), an opposite one reverses at once, NEUTRAL after expiry goes
    flat. Signals of an earlier block are never used. In ``long_only`` mode the long/short
    target is floored at 0, so a SELL closes a long and keeps the book flat for its hold.

    The target at bar t is traded at open t+1 (see `held_positions`). Vectorised: the latest
    signal is found through the running count of signals, and must carry t's block id.
    """
    sig = np.asarray(signals)
    n = sig.size
    if sig.ndim != 1:
        raise ValueError(f"signals must be one-dimensional, got shape {sig.shape}")
    blocks = _check_blocks(block_ids, n)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    signalled = sig != NEUTRAL
    signal_bars = np.flatnonzero(signalled)
    if signal_bars.size == 0:
        return np.zeros(n, dtype=np.float64)
    seen = np.cumsum(signalled)  # signals at or before bar t
    latest = np.maximum(seen - 1, 0)
    # Index of the latest signal at or before t (a gather beats np.maximum.accumulate 5x).
    last_signal = signal_bars[latest]
    age = np.arange(n) - last_signal
    # Ids are nondecreasing, so the same id means the same block (and no earlier one).
    # Unset, the hold is the default label horizon; a sweep passes each model's own horizon.
    hold_bars = HORIZON_BARS if config.hold_bars is None else config.hold_bars
    live = (seen > 0) & (age < hold_bars) & (blocks[last_signal] == blocks)
    direction = np.sign(sig[signal_bars]).astype(np.float64)
    if sizes is not None:
        size = np.asarray(sizes, dtype=np.float64)
        if size.shape != sig.shape:
            raise ValueError(f"sizes shape {size.shape} differs from signals shape {sig.shape}")
        # The signal that set the position also sizes it, for as long as it holds.
        direction *= size[signal_bars]
    target = np.where(live, direction[latest], 0.0)
    if config.mode == "long_only":
        np.maximum(target, 0.0, out=target)
    return target


def held_positions(target: np.ndarray, block_ids: np.ndarray) -> np.ndarray:
    """Position held over ``[open_k, open_{k+1})`` from the targets decided at each close.

    ``held[k] = target[k-1]`` inside a block; the first bar of a block is flat (its decision
    would come from the previous block) and so is the last (the position is closed at the
    block's last open, as nothing may be held across the break).
    """
    tgt = np.asarray(target, dtype=np.float64)
    n = tgt.size
    blocks = _check_blocks(block_ids, n)
    held = np.zeros(n, dtype=np.float64)
    if n > 1:
        held[1:] = tgt[:-1]
    first, last = block_bounds(blocks)
    held[first | last] = 0.0
    return held


@dataclass(frozen=True)
class _Ledger:
    equity: np.ndarray
    trade_factors: np.ndarray
    fees_paid: float


def _ledgers(
    open_: np.ndarray, held: np.ndarray, costs: tuple[tuple[float, float], ...]
) -> tuple[int, list[_Ledger]]:
    """All-in compounding ledgers of `held`, one per (fee, slippage) pair (see module doc).

    The bars between two fills form a segment on which equity is affine in the open price,
    ``a + b * open_k``: (a, b) = (cash, 0) when flat, (0, L) long, (cash, -S) short. Every
    per-trade quantity is computed once per trade; the per-bar work is one gather of (a, b)
    and a multiply-add, shared index work across the cost settings.
    """
    n = open_.size
    prev = np.empty(n, dtype=np.float64)
    prev[:1] = 0.0
    prev[1:] = held[:-1]
    change = held != prev
    fill_bars = np.flatnonzero(change)
    fills = int(fill_bars.size)
    # Segment 0 runs from bar 0 to the first fill (flat); segment i starts at fill i-1.
    segment = np.cumsum(change)
    seg_pos = np.concatenate(([0.0], held[fill_bars]))
    seg_price = np.concatenate(([1.0], open_[fill_bars]))
    is_trade = seg_pos != 0.0
    trades = np.flatnonzero(is_trade)
    # Flat on each block's last bar, so every trade segment has a next segment: its exit.
    exit_price = seg_price[trades + 1]
    entry_price = seg_price[trades]
    is_long = seg_pos[trades] > 0.0
    ratio = exit_price / entry_price
    trades_before = np.cumsum(is_trade) - is_trade
    ledgers: list[_Ledger] = []
    for fee, slip in costs:
        long_factor = ratio * ((1.0 - slip) * (1.0 - fee) / ((1.0 + slip) * (1.0 + fee)))
        short_factor = 2.0 / (1.0 + fee) - ratio * ((1.0 + slip) / (1.0 - slip))
        factors = np.where(is_long, long_factor, short_factor)
        # Equity before trade j (or in a flat segment after j trades): cash times the
        # factors of every earlier trade.
        v_entry = np.empty(trades.size + 1, dtype=np.float64)
        v_entry[0] = 1.0
        np.cumprod(factors, out=v_entry[1:])
        v_seg = v_entry[trades_before]
        v_trade = v_seg[trades]
        units = v_trade / (entry_price * np.where(is_long, 1.0 + slip, 1.0 - slip) * (1.0 + fee))
        a = v_seg.copy()
        a[trades] = np.where(is_long, 0.0, v_trade * (2.0 / (1.0 + fee)))
        b = np.zeros_like(a)
        b[trades] = np.where(is_long, units, -units)
        equity = np.take(b, segment)
        equity *= open_
        equity += np.take(a, segment)
        exit_fill = exit_price * np.where(is_long, 1.0 - slip, 1.0 + slip)
        fees_paid = float(np.sum(v_trade) * (fee / (1.0 + fee)) + np.sum(units * exit_fill) * fee)
        ledgers.append(_Ledger(equity, factors, fees_paid))
    return fills, ledgers


def _exposure_ledger(
    open_: np.ndarray, held: np.ndarray, fee: float, slip: float
) -> tuple[np.ndarray, float, np.ndarray]:
    """(equity, fees paid, round-trip returns) of exposures rebalanced at every open.

    `fee` and `slip` are fractions of traded notional (see the module doc for the formula).
    """
    n = open_.size
    prev = np.zeros(n, dtype=np.float64)
    prev[1:] = held[:-1]
    move = np.zeros(n, dtype=np.float64)
    if n > 1:
        np.divide(open_[1:], open_[:-1], out=move[1:])
        move[1:] -= 1.0
    turnover = np.abs(held - prev)
    before_fills = 1.0 + prev * move
    growth = before_fills * (1.0 - (fee + slip) * turnover)
    equity = np.cumprod(growth)
    # Equity at open k before its fills: equity[k-1] times the move of the held exposure.
    at_fills = np.concatenate(([1.0], equity[:-1])) * before_fills
    fees_paid = float(np.sum(at_fills * turnover) * fee)
    # Round trips: runs of one sign; each ends on the bar whose fill closes (or flips) it.
    side = np.sign(held)
    side_prev = np.zeros(n, dtype=np.float64)
    side_prev[1:] = side[:-1]
    starts = np.flatnonzero((side != 0.0) & (side != side_prev))
    side_next = np.zeros(n, dtype=np.float64)
    side_next[:-1] = side[1:]
    exits = np.flatnonzero((side != 0.0) & (side != side_next)) + 1
    exits = np.minimum(exits, n - 1)
    curve = np.concatenate(([1.0], equity))
    trade_pnls = curve[exits + 1] / curve[starts] - 1.0
    return equity, fees_paid, trade_pnls


def _returns(equity: np.ndarray) -> np.ndarray:
    out = np.empty_like(equity)
    if equity.size:
        out[0] = equity[0] - 1.0
        np.divide(equity[1:], equity[:-1], out=out[1:])
        out[1:] -= 1.0
    return out


def _check_prices(open_: np.ndarray) -> np.ndarray:
    prices = np.asarray(open_, dtype=np.float64)
    if prices.ndim != 1:
        raise ValueError(f"open_ must be one-dimensional, got shape {prices.shape}")
    if not bool(np.all(np.isfinite(prices) & (prices > 0.0))):
        raise ValueError("open prices must be finite and > 0")
    return prices


def backtest_positions(
    open_: np.ndarray, held: np.ndarray, block_ids: np.ndarray, config: BacktestConfig
) -> BacktestResult:
    """Backtest already-timed positions: `held[k]` (+1, -1 or 0) is held over [open_k, open_k+1).

    `held[k]` must have been decided at the close of bar k-1 at the latest. For strategies
    that build their own positions (baselines); `run_backtest` is this on
    ``held_positions(positions_from_signals(...))``.

    Raises:
        ValueError: a position other than -1, 0, 1, or one held on the first or last bar of
            a block (it would cross a break).
    """
    prices = _check_prices(open_)
    pos = np.asarray(held, dtype=np.float64)
    if pos.shape != prices.shape:
        raise ValueError(f"positions shape {pos.shape} differs from prices shape {prices.shape}")
    if config.sizing == "all_in" and not bool(np.all((pos == 0.0) | (np.abs(pos) == 1.0))):
        raise ValueError("positions must be -1, 0 or +1 (the ledger sizes every trade all-in)")
    if not bool(np.all(np.abs(pos) <= 1.0)):
        raise ValueError("exposures must lie in [-1, 1]")
    first, last = block_bounds(_check_blocks(block_ids, prices.size))
    if bool(np.any(pos[first | last] != 0.0)):
        raise ValueError("positions must be flat on the first and last bar of every block")
    return _backtest(prices, pos, config)


def _backtest(
    prices: np.ndarray, pos: np.ndarray, config: BacktestConfig, all_in: bool | None = None
) -> BacktestResult:
    """The ledger of `config.sizing` (or the all-in one when `all_in`) over held positions."""
    fee, slip = config.fee_bps / 1e4, config.slippage_bps / 1e4
    use_all_in = config.sizing == "all_in" if all_in is None else all_in
    if use_all_in:
        fills, (net, gross) = _ledgers(prices, pos, ((fee, slip), (0.0, 0.0)))
        equity, fees_paid, trade_pnls = net.equity, net.fees_paid, net.trade_factors - 1.0
        gross_equity = gross.equity
    else:
        equity, fees_paid, trade_pnls = _exposure_ledger(prices, pos, fee, slip)
        gross_equity, _, _ = _exposure_ledger(prices, pos, 0.0, 0.0)
        fills = int(np.count_nonzero(np.diff(pos, prepend=0.0)))
    returns = _returns(equity)
    return BacktestResult(
        returns=returns,
        gross_returns=_returns(gross_equity),
        equity=equity,
        positions=pos,
        fills=fills,
        trade_pnls=trade_pnls,
        fees_paid=fees_paid,
        metrics=summarise(returns, pos, config.bars_per_year, trade_pnls, equity),
    )


def run_backtest(
    open_: np.ndarray,
    signals: np.ndarray,
    block_ids: np.ndarray,
    config: BacktestConfig,
    p_up: np.ndarray | None = None,
) -> BacktestResult:
    """Backtest BUY/SELL/NEUTRAL decisions taken at each bar's close, filled at the next open.

    Args:
        open_: open price of every bar (finite, > 0).
        signals: int8 decisions (+1 BUY, -1 SELL, 0 NEUTRAL) at the close of each bar.
        block_ids: nondecreasing ids; nothing is held across a change of id.
        config: mode, sizing, fees and slippage (bps per side), `hold_bars`, `bars_per_year`.
        p_up: P(up) at each bar's close; sizes the positions under probability sizing
            (`probability_sizes`), where None means every position is all in. Unused all-in.
    """
    prices = _check_prices(open_)
    sig = np.asarray(signals)
    if sig.shape != prices.shape:
        raise ValueError(f"signals shape {sig.shape} differs from prices shape {prices.shape}")
    sizes = None
    if config.sizing == "probability" and p_up is not None:
        sizes = probability_sizes(p_up, config)
    target = positions_from_signals(sig, block_ids, config, sizes)
    return _backtest(prices, held_positions(target, block_ids), config)


def buy_and_hold(
    open_: np.ndarray, block_ids: np.ndarray, config: BacktestConfig
) -> BacktestResult:
    """Long from the first open to the last open of every block, fees and slippage both ways,
    all in whatever the sizing.

    Equity compounds from block to block; a one-bar block never trades.
    """
    prices = _check_prices(open_)
    _, last = block_bounds(_check_blocks(block_ids, prices.size))
    return _backtest(prices, np.where(last, 0.0, 1.0), config, all_in=True)


# (name, wants high volatility, wants an up trend); None = either.
_REGIMES: tuple[tuple[str, bool | None, bool | None], ...] = (
    ("high_vol_up", True, True),
    ("high_vol_down", True, False),
    ("low_vol_up", False, True),
    ("low_vol_down", False, False),
    ("high_vol", True, None),
    ("low_vol", False, None),
    ("up", None, True),
    ("down", None, False),
)


def regime_labels(
    close: np.ndarray, block_ids: np.ndarray, window_bars: int = 240
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bar regime at the close of bar t, from closes up to t only: (labelled, high, up).

    Over the trailing `window_bars` 1-bar log returns of t's own block (closes t-window..t):
    *high* volatility when their std (ddof=1) is above the median of that trailing std over
    every labelled bar of the sample (one ex-post threshold, acceptable for reporting; the
    per-bar reading itself is causal), *up* when ``log(close_t / close_{t-window}) >= 0``.
    `labelled` is False where the window is not complete inside the block; high and up are
    False there.
    """
    c = _check_prices(close)
    n = c.size
    if window_bars < 2:
        raise ValueError(f"window_bars must be >= 2, got {window_bars}")
    blocks = _check_blocks(block_ids, n)
    if n == 0:
        empty = np.zeros(0, dtype=bool)
        return empty, empty, empty
    idx = np.arange(n)
    first, _ = block_bounds(blocks)
    starts = np.flatnonzero(first)
    block_start = starts[np.cumsum(first) - 1]
    log_c = np.log(c)
    step = np.zeros(n)
    step[1:] = np.diff(log_c)
    step[first] = 0.0  # a log return across a break is not a market move
    # Rolling sums through cumulative sums; centring first keeps the variance from cancelling.
    centred = step - float(np.mean(step))
    s1 = np.concatenate(([0.0], np.cumsum(centred)))
    s2 = np.concatenate(([0.0], np.cumsum(centred * centred)))
    labelled = idx - window_bars >= block_start
    lo = np.maximum(idx - window_bars + 1, 0)
    w = float(window_bars)
    sum1 = s1[idx + 1] - s1[lo]
    sum2 = s2[idx + 1] - s2[lo]
    vol = np.sqrt(np.maximum((sum2 - sum1 * sum1 / w) / (w - 1.0), 0.0))
    trend = log_c - log_c[np.maximum(idx - window_bars, 0)]
    if not bool(np.any(labelled)):
        return labelled, np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    threshold = float(np.median(vol[labelled]))
    return labelled, labelled & (vol > threshold), labelled & (trend >= 0.0)


def regime_breakdown(
    returns: np.ndarray,
    close: np.ndarray,
    block_ids: np.ndarray,
    bars_per_year: float,
    window_bars: int = 240,
) -> list[dict[str, float | str]]:
    """Performance of a backtest's returns split by volatility and trend regime.

    Each bar gets the causal label of `regime_labels` (trailing `window_bars` bars of its
    own block; volatility split at the sample median). `returns` follow the
    `BacktestResult` alignment: ``returns[k]`` is earned over ``[open_{k-1}, open_k)``, so it
    takes the label of close k-2, the last close before that interval starts, and only from
    the same block. Bars without a label are left out of every regime.

    Returns:
        One dict per regime, in the order high_vol_up, high_vol_down, low_vol_up,
        low_vol_down, high_vol, low_vol, up, down, with: regime, bars, sharpe (annualised
        with `bars_per_year`), total_return (compounded), hit (share of its bars with a
        positive return; NaN when it has no bars).
    """
    r = np.asarray(returns, dtype=np.float64)
    c = np.asarray(close, dtype=np.float64)
    if r.shape != c.shape:
        raise ValueError(f"returns shape {r.shape} differs from close shape {c.shape}")
    labelled, high, up = regime_labels(c, block_ids, window_bars)
    blocks = np.asarray(block_ids)
    n = r.size
    valid = np.zeros(n, dtype=bool)
    high_k = np.zeros(n, dtype=bool)
    up_k = np.zeros(n, dtype=bool)
    if n > 2:
        valid[2:] = labelled[:-2] & (blocks[2:] == blocks[:-2])
        high_k[2:] = high[:-2]
        up_k[2:] = up[:-2]
    rows: list[dict[str, float | str]] = []
    for name, want_high, want_up in _REGIMES:
        mask = valid.copy()
        if want_high is not None:
            mask &= high_k == want_high
        if want_up is not None:
            mask &= up_k == want_up
        sub = r[mask]
        rows.append(
            {
                "regime": name,
                "bars": float(sub.size),
                "sharpe": annualised_sharpe(sub, bars_per_year),
                "total_return": float(np.prod(1.0 + sub)) - 1.0 if sub.size else 0.0,
                "hit": float(np.mean(sub > 0.0)) if sub.size else math.nan,
            }
        )
    return rows
