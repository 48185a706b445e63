"""A seeded market simulator that writes Binance-shaped 1-minute klines.

The return process: GARCH(1,1) variance (volatility clustering) with Student-t innovations (fat
tails), scaled by an intraday seasonality curve. An optional planted predictable component: a
latent AR(1) order-flow signal x_t that shows in the taker-buy ratio at bar t and drives the
returns of the following bars with weight `signal_strength` (0 gives martingale returns, so
nothing is predictable). Symbols move together through `market_correlation`: every symbol's
shock mixes in a market-wide shock drawn from its own (seed, market, day) generator. Each day is
drawn from its own seed, (seed, symbol, day), with the state carried over from the day before,
starting at `anchor_date`: a day's bars do not depend on the range requested, so reruns and
extensions reproduce them exactly.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np

from configs.schema import SimConfig
from market.bronze import Batch, BatchMeta, Bronze, RawKline
from market.klines import ONE_DAY_MS, ONE_MINUTE_MS, date_start_ms, utc_date
from market.sources.base import now_iso

MINUTES_PER_DAY = 1440


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


MARKET_KEY = "market"
"""The generator name of the market-wide shocks that correlate the symbols."""


def market_shocks(config: SimConfig, day: date, own: np.ndarray) -> np.ndarray:
    """A symbol's (or, [symbols, minutes], every symbol's) unit-variance shocks of `day` with
    the market-wide shock mixed in at `config.market_correlation`; `own` as is when it is 0."""
    rho = config.market_correlation
    if rho == 0.0:
        return own
    dof = config.student_t_dof
    rng = np.random.default_rng([config.seed, _stable_int(MARKET_KEY) % 2**32, day.toordinal()])
    common = rng.standard_t(dof, MINUTES_PER_DAY) / math.sqrt(dof / (dof - 2.0))
    return math.sqrt(1.0 - rho) * own + math.sqrt(rho) * common


def intraday_vol_profile() -> np.ndarray:
    """Relative volatility per minute of the UTC day: busy around the US open, calm at night."""
    minute = np.arange(MINUTES_PER_DAY)
    us_open = np.exp(-(((minute - 870) / 110.0) ** 2))
    asia = np.exp(-(((minute - 60) / 120.0) ** 2))
    profile = 0.65 + 0.9 * us_open + 0.35 * asia
    return profile / np.sqrt(np.mean(profile**2))


@dataclass
class SimState:
    """What carries over from one simulated minute to the next."""

    close: float
    variance: float
    signal: float
    shock: float
    outage_left: int


@dataclass(frozen=True)
class SimBars:
    """Simulated 1-minute bars (NaN-free) and which of them are missing (`present` False).

    One symbol's day holds arrays of shape (1440,); `simulate_symbols` returns many symbols'
    days as arrays of shape (symbols, minutes), row k for symbol k, minute j at
    `first day 00:00 UTC + j` minutes. Prices in quote currency, volumes in base units.
    """

    open_time_ms: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    trades: np.ndarray
    taker_buy_base: np.ndarray
    present: np.ndarray
    planted_signal: np.ndarray
    """The latent signal x at each bar's close (unit variance; it drives the returns of the
    bars after it with weight `signal_strength`): what an oracle of the planted component
    knows at a decision. Not part of the klines."""


class MarketSimulator:
    """Generates days of bars for one symbol from a config and a seed."""

    def __init__(self, config: SimConfig, symbol: str) -> None:
        self.config = config
        self.symbol = symbol
        self._key = _stable_int(symbol)
        self._profile = intraday_vol_profile()

    def initial_state(self) -> SimState:
        price = 20.0 + (self._key % 50_000)
        return SimState(
            close=float(price),
            variance=self.config.minute_vol**2,
            signal=0.0,
            shock=0.0,
            outage_left=0,
        )

    def day(self, day: date, state: SimState) -> tuple[SimBars, SimState]:
        """Simulate `day` from `state`; returns the day and the state at its end."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, self._key % 2**32, day.toordinal()])
        n = MINUTES_PER_DAY
        dof = cfg.student_t_dof
        shocks = rng.standard_t(dof, n) / math.sqrt(dof / (dof - 2.0))
        shocks = market_shocks(cfg, day, shocks)
        signal_noise = rng.standard_normal(n)
        wick = np.abs(rng.standard_normal((2, n)))
        volume_noise = rng.standard_normal(n)
        flow_noise = rng.standard_normal(n)
        outage_draw = rng.random(n)
        outage_len = rng.integers(1, cfg.max_gap_minutes + 1, n)

        omega = cfg.minute_vol**2 * (1.0 - cfg.garch_alpha - cfg.garch_beta)
        phi = cfg.signal_persistence
        strength = cfg.signal_strength
        noise_weight = math.sqrt(1.0 - strength**2)
        returns = np.empty(n)
        sigma = np.empty(n)
        signal = np.empty(n)
        present = np.ones(n, dtype=bool)
        h, x, eps, outage = state.variance, state.signal, state.shock, state.outage_left
        for i in range(n):
            h = omega + cfg.garch_alpha * eps * eps + cfg.garch_beta * h
            s = math.sqrt(h) * self._profile[i]
            # The return of bar i uses the signal known at the close of bar i-1: predictable.
            z = strength * x + noise_weight * shocks[i]
            returns[i] = s * z
            eps = math.sqrt(h) * z
            sigma[i] = s
            x = phi * x + math.sqrt(1.0 - phi * phi) * signal_noise[i]
            signal[i] = x
            if outage > 0:
                present[i] = False
                outage -= 1
            elif outage_draw[i] < cfg.gap_rate:
                present[i] = False
                outage = int(outage_len[i]) - 1

        close = state.close * np.exp(np.cumsum(returns))
        open_ = np.r_[state.close, close[:-1]]
        high = np.maximum(open_, close) * np.exp(0.3 * sigma * wick[0])
        low = np.minimum(open_, close) * np.exp(-0.3 * sigma * wick[1])
        activity = np.abs(returns) / np.maximum(sigma, 1e-12)
        volume = 5.0 * self._profile * np.exp(0.4 * volume_noise) * (0.5 + activity)
        trades = np.maximum(1, np.round(volume * 40.0 * np.exp(0.2 * flow_noise))).astype(np.int64)
        taker_ratio = np.clip(0.5 + 0.12 * np.tanh(signal) + 0.04 * flow_noise, 0.0, 1.0)
        start = date_start_ms(day)
        result = SimBars(
            open_time_ms=start + np.arange(n, dtype=np.int64) * ONE_MINUTE_MS,
            open=open_,
            high=high,
            low=low,
            close=close,
            volume=volume,
            trades=trades,
            taker_buy_base=volume * taker_ratio,
            present=present,
            planted_signal=signal,
        )
        end_state = SimState(
            close=float(close[-1]), variance=h, signal=x, shock=eps, outage_left=outage
        )
        return result, end_state

    def days(self, first: date, last: date) -> Iterator[tuple[date, SimBars]]:
        """Days `first`..`last` inclusive, simulated from the anchor date on."""
        if first < self.config.anchor_date:
            raise ValueError(
                f"simulation starts at anchor_date {self.config.anchor_date}; asked for {first}"
            )
        state = self.initial_state()
        day = self.config.anchor_date
        while day <= last:
            bars, state = self.day(day, state)
            if day >= first:
                yield day, bars
            day += timedelta(days=1)


def universe_symbols(count: int) -> list[str]:
    """`count` simulated symbol names, SIM0001, SIM0002, ... (at least four digits)."""
    if count < 1:
        raise ValueError(f"a universe needs at least one symbol, got {count}")
    return [f"SIM{i:04d}" for i in range(1, count + 1)]


def simulate_symbols(config: SimConfig, symbols: list[str], days: int) -> SimBars:
    """`days` days of bars from the anchor date for every symbol, vectorised across symbols.

    The same bars as `MarketSimulator(config, symbol).days(...)` for each symbol, bit for bit:
    each symbol draws its random numbers from its own (seed, symbol, day) generator, and the
    recursions run one minute at a time over arrays of all symbols (1,440 numpy steps a day
    whatever the number of symbols, instead of 1,440 Python steps per symbol).
    """
    cfg = config
    n_symbols, n = len(symbols), MINUTES_PER_DAY
    keys = [_stable_int(symbol) for symbol in symbols]
    profile = intraday_vol_profile()
    omega = cfg.minute_vol**2 * (1.0 - cfg.garch_alpha - cfg.garch_beta)
    phi = cfg.signal_persistence
    strength = cfg.signal_strength
    noise_weight = math.sqrt(1.0 - strength**2)
    signal_weight = math.sqrt(1.0 - phi * phi)
    dof = cfg.student_t_dof
    t_scale = math.sqrt(dof / (dof - 2.0))
    # Carried state per symbol (SimState, as arrays).
    last_close = np.array([20.0 + (key % 50_000) for key in keys], dtype=np.float64)
    h = np.full(n_symbols, cfg.minute_vol**2)
    x = np.zeros(n_symbols)
    eps = np.zeros(n_symbols)
    outage = np.zeros(n_symbols, dtype=np.int64)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SimBars.__dataclass_fields__}
    for offset in range(days):
        day = cfg.anchor_date + timedelta(days=offset)
        shocks = np.empty((n_symbols, n))
        signal_noise = np.empty((n_symbols, n))
        wick = np.empty((2, n_symbols, n))
        volume_noise = np.empty((n_symbols, n))
        flow_noise = np.empty((n_symbols, n))
        outage_draw = np.empty((n_symbols, n))
        outage_len = np.empty((n_symbols, n), dtype=np.int64)
        for k, key in enumerate(keys):  # the draws of MarketSimulator.day, in its order
            rng = np.random.default_rng([cfg.seed, key % 2**32, day.toordinal()])
            shocks[k] = rng.standard_t(dof, n) / t_scale
            signal_noise[k] = rng.standard_normal(n)
            wick[:, k] = np.abs(rng.standard_normal((2, n)))
            volume_noise[k] = rng.standard_normal(n)
            flow_noise[k] = rng.standard_normal(n)
            outage_draw[k] = rng.random(n)
            outage_len[k] = rng.integers(1, cfg.max_gap_minutes + 1, n)
        shocks = market_shocks(cfg, day, shocks)
        # The recursions read and write one minute of every symbol at a time: minute-major
        # copies keep those rows contiguous.
        shocks_t = np.ascontiguousarray(shocks.T)
        signal_noise_t = np.ascontiguousarray(signal_noise.T)
        starts_t = np.ascontiguousarray((outage_draw < cfg.gap_rate).T)
        outage_len_t = np.ascontiguousarray(outage_len.T)
        returns_t = np.empty((n, n_symbols))
        sigma_t = np.empty((n, n_symbols))
        signal_t = np.empty((n, n_symbols))
        present_t = np.ones((n, n_symbols), dtype=bool)
        for i in range(n):
            h = omega + cfg.garch_alpha * eps * eps + cfg.garch_beta * h
            root_h = np.sqrt(h)
            s = root_h * profile[i]
            z = strength * x + noise_weight * shocks_t[i]
            returns_t[i] = s * z
            eps = root_h * z
            sigma_t[i] = s
            x = phi * x + signal_weight * signal_noise_t[i]
            signal_t[i] = x
            if cfg.gap_rate > 0 or outage.any():
                in_outage = outage > 0
                starting = ~in_outage & starts_t[i]
                present_t[i] = ~(in_outage | starting)
                outage = np.where(in_outage, outage - 1, np.where(starting, outage_len_t[i] - 1, 0))
        returns, sigma, signal, present = returns_t.T, sigma_t.T, signal_t.T, present_t.T
        close = last_close[:, None] * np.exp(np.cumsum(returns, axis=1))
        open_ = np.concatenate([last_close[:, None], close[:, :-1]], axis=1)
        last_close = close[:, -1].copy()
        activity = np.abs(returns) / np.maximum(sigma, 1e-12)
        volume = 5.0 * profile * np.exp(0.4 * volume_noise) * (0.5 + activity)
        taker_ratio = np.clip(0.5 + 0.12 * np.tanh(signal) + 0.04 * flow_noise, 0.0, 1.0)
        open_time = date_start_ms(day) + np.arange(n, dtype=np.int64) * ONE_MINUTE_MS
        parts["open_time_ms"].append(np.broadcast_to(open_time, (n_symbols, n)))
        parts["open"].append(open_)
        parts["high"].append(np.maximum(open_, close) * np.exp(0.3 * sigma * wick[0]))
        parts["low"].append(np.minimum(open_, close) * np.exp(-0.3 * sigma * wick[1]))
        parts["close"].append(close)
        parts["volume"].append(volume)
        parts["trades"].append(
            np.maximum(1, np.round(volume * 40.0 * np.exp(0.2 * flow_noise))).astype(np.int64)
        )
        parts["taker_buy_base"].append(volume * taker_ratio)
        parts["present"].append(present)
        parts["planted_signal"].append(signal)
    return SimBars(
        **{
            name: np.ascontiguousarray(arrays[0]) if days == 1 else np.concatenate(arrays, axis=1)
            for name, arrays in parts.items()
        }
    )


def format_dump_line(day: SimBars, i: int) -> str:
    """Bar `i` of `day` as a Binance dump CSV line (8-decimal prices and volumes)."""
    ot = int(day.open_time_ms[i])
    vwap = (day.open[i] + day.high[i] + day.low[i] + day.close[i]) / 4.0
    volume = day.volume[i]
    taker = day.taker_buy_base[i]
    return (
        f"{ot},{day.open[i]:.8f},{day.high[i]:.8f},{day.low[i]:.8f},{day.close[i]:.8f},"
        f"{volume:.8f},{ot + ONE_MINUTE_MS - 1},{volume * vwap:.8f},{int(day.trades[i])},"
        f"{taker:.8f},{taker * vwap:.8f},0"
    )


class SimSource:
    """The simulator as a kline source. Range in epoch ms, `end_ms` inclusive."""

    name = "sim"

    def __init__(self, config: SimConfig, start_ms: int, end_ms: int) -> None:
        self.config = config
        self.start_ms = start_ms
        self.end_ms = end_ms
        digest = hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:10]
        self.tag = f"sim-{digest}"

    def batches(self, symbol: str, store: Bronze) -> Iterator[Batch]:
        simulator = MarketSimulator(self.config, symbol)
        first, last = utc_date(self.start_ms), utc_date(self.end_ms)
        request = f"sim seed={self.config.seed} {self.start_ms}..{self.end_ms}"
        for day, bars in simulator.days(first, last):
            in_range = (
                bars.present
                & (bars.open_time_ms >= self.start_ms)
                & (bars.open_time_ms <= self.end_ms)
            )
            rows = [
                RawKline(int(bars.open_time_ms[i]), format_dump_line(bars, int(i)))
                for i in np.flatnonzero(in_range)
            ]
            if rows:
                yield Batch("sim", symbol, day, self.tag, rows, BatchMeta(now_iso(), request))


def default_range(config: SimConfig, days: int) -> tuple[int, int]:
    """`days` whole days from the anchor date, as an inclusive epoch-ms range."""
    start = date_start_ms(config.anchor_date)
    return start, start + days * ONE_DAY_MS - ONE_MINUTE_MS
