"""The live bar feed of the signal service: the latest closed 1-minute bars of each symbol.

Three sources (`FeedConfig.source`):

- `binance` with `binance_live: websocket` (the default): Binance's WebSocket kline stream
  (`market.sources.binance_ws.BinanceKlineStream`, started by the first poll), which delivers
  each closed kline of each symbol once and in open-time order; the REST client fills in the last
  `history_bars` minutes at start and the minutes missed across every reconnect, and catches the
  symbols of a connection that is down up at each failed attempt. A poll takes what the stream
  delivered since the last one.
- `binance` with `binance_live: polling`: polls Binance's REST klines endpoint
  (`market.sources.binance.BinanceClient`, with its retries, Retry-After handling and
  request-weight budget) for the minutes since the newest bar held; the first poll fetches the
  last `history_bars` minutes. Only closed bars are kept: a bar opening at `t` ms closes at
  `t + 59_999` ms and is final once that moment has passed.
- `sim`: simulates `sim_days` days per symbol up front with the seeded market simulator
  (vectorised across symbols: `market.sources.sim.simulate_symbols`), then replays them on an
  accelerated clock.
- `dump`: the same replay from Binance dump files (`dump_path`, a path or glob; CSV, CSV.gz or
  zip; millisecond or microsecond timestamps); files named `SYMBOL-...` are used for SYMBOL,
  otherwise every matching file.

A replay starts when the feed is constructed: the first poll exposes the first `history_bars`
bars, and every later poll releases each bar whose accelerated time has come,
`bars_due = history_bars + floor((now - start) * replay_bars_per_s)` (`now`, `start` in seconds).
When the replay runs out of bars it stops producing any, and so goes stale: that is by design.
Bar j of a replay's source (0-based, j >= history_bars) thus closes, on the feed's clock, at
`start + (j - history_bars + 1) / replay_bars_per_s`: the moment it becomes due
(`replay_close_s`). `replay_start_s` (epoch seconds) fixes `start`, so that a client knows every
bar's close in advance; by default it is the moment the feed is built.

A replay holds every symbol's source bars in one frame, symbol after symbol, and a count of bars
released per symbol: a poll is one numpy comparison over the symbols, and a symbol's window is a
zero-copy slice of that frame, so a tick costs O(symbols) of array work plus O(new bars) to read
them (`newest_bars`), not a merge per symbol.

Every row passes the Silver ETL's checks (`market.validation`, in polars form from
`market.validation.polars_rules`): a malformed row is dropped and counted per reason, never
raised. Duplicated or out-of-order bars are deduplicated by open time, the first seen wins (a
later copy counts as `duplicate_open_time`). Source failures (network errors, HTTP errors) are
recorded per symbol (`last_error`: for the stream, why a symbol is not live) and logged; the
next poll (or the stream's reconnect) retries.

Memory is bounded: at most `history_bars` bars are held per symbol; a replay holds its source
bars (`sim_days` x 1440 bars per symbol for `sim`, about 90 bytes a bar: 2,000 symbols x 1 day
~260 MB; the file's bars for `dump`).

Threading: `poll()` is meant for one background loop (it is not re-entrant); the read methods
may be called from other threads at any time and see either the state before or after a poll.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import polars as pl

from configs.schema import FeedConfig
from market import validation as v
from market.klines import BAR_COLUMNS, ONE_MINUTE_MS
from market.sources.binance import BinanceAPIError, BinanceClient
from market.sources.binance_ws import BinanceKlineStream, StreamStats
from market.sources.dump import DumpSource, read_lines
from market.sources.sim import simulate_symbols
from market.validation.polars_rules import (
    BAR_SCHEMA,
    check_bars,
    check_lines,
    first_of_each_minute,
)

log = logging.getLogger(__name__)

# First fields of a dump header line (as market.sources.dump recognises them).
_HEADER_FIRST_FIELDS = frozenset({"open_time", "open time", "opentime"})
# What a failing Binance poll can raise once the client has spent its retries: the client's own
# error (4xx, retries exhausted, a non-list body) and httpx/socket errors it does not retry.
_SOURCE_ERRORS: tuple[type[BaseException], ...] = (BinanceAPIError, httpx.HTTPError, OSError)


def empty_bars() -> pl.DataFrame:
    """A frame with the validated-bar columns and no rows."""
    return pl.DataFrame(schema=BAR_SCHEMA)


def _rest_line(row: object) -> str:
    """One REST kline (a JSON array) as a comma-separated line for `check_lines`."""
    if isinstance(row, list | tuple):
        return ",".join(str(value) for value in row)
    return str(row)  # not an array: it fails the field count, as it should


@dataclass
class _SymbolState:
    """What the feed holds for one symbol."""

    bars: pl.DataFrame = field(default_factory=empty_bars)
    rejected: Counter[str] = field(default_factory=Counter)
    last_error: str | None = None
    # binance: open time (epoch ms) of the next minute to ask for; None before the first poll.
    next_open_ms: int | None = None


@dataclass
class _Replay:
    """The source bars of a replay, every symbol's in one frame, and how many were released.

    Symbol k's bars are rows `start[k]` .. `start[k] + length[k] - 1` of `bars`, validated,
    deduplicated and sorted by open time; the first `released[k]` of them have been released.
    """

    bars: pl.DataFrame
    start: np.ndarray
    length: np.ndarray
    released: np.ndarray

    @classmethod
    def of(cls, frames: list[pl.DataFrame]) -> _Replay:
        lengths = np.array([frame.height for frame in frames], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        bars = pl.concat(frames) if frames else empty_bars()
        return cls(bars.rechunk(), starts, lengths, np.zeros(len(frames), dtype=np.int64))

    def held(self, history_bars: int) -> tuple[np.ndarray, np.ndarray]:
        """First row and number of rows of each symbol's window of `history_bars` bars."""
        count = np.minimum(self.released, history_bars)
        return self.start + self.released - count, count


class BarFeed:
    """The latest `history_bars` closed 1-minute bars of each configured symbol.

    `clock` returns epoch seconds (the wall clock for `binance`; any monotonic-enough clock for
    replays, whose time is accelerated). `sleep` is what the Binance client waits with (for
    Retry-After and backoff); tests pass a recorder. Nothing is held before the first `poll()`.
    Constructing a replay feed simulates or reads its source bars, so a bad `dump_path` raises
    here (FileNotFoundError, ValueError), not in `poll()`.
    """

    def __init__(
        self,
        config: FeedConfig,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, _SymbolState] = {s: _SymbolState() for s in config.symbols}
        self._client: BinanceClient | None = None
        self._stream: BinanceKlineStream | None = None
        self._index = {symbol: k for k, symbol in enumerate(config.symbols)}
        self._replay: _Replay | None = None
        self._start_s = clock() if config.replay_start_s is None else config.replay_start_s
        if config.source == "binance" and config.binance_live == "websocket":
            self._stream = BinanceKlineStream(
                config.symbols,
                config.binance_stream,
                BinanceClient(config.binance, sleep=sleep, clock=clock),
                history_minutes=config.history_bars,
                clock=clock,
            )
        elif config.source == "binance":
            self._client = BinanceClient(config.binance, sleep=sleep, clock=clock)
        elif config.source == "sim":
            self._load_sim()
        else:
            self._load_dump()

    # -- set-up ---------------------------------------------------------------------------

    def _load_sim(self) -> None:
        self._replay = _Replay.of(self._replay_sources())

    def _load_dump(self) -> None:
        if self.config.dump_path is None:
            raise ValueError("FeedConfig.source is 'dump' but dump_path is not set")
        self._replay = _Replay.of(self._replay_sources())

    def _replay_sources(self) -> list[pl.DataFrame]:
        """Each symbol's cleaned source bars (`_clean_source`), in config order."""
        symbols = list(self._states)
        if self.config.source == "sim":
            block = simulate_symbols(self.config.sim, symbols, self.config.sim_days)
            present = block.present.ravel()
            trades = block.trades.ravel()[present]
            volume, close = block.volume.ravel()[present], block.close.ravel()[present]
            taker = block.taker_buy_base.ravel()[present]
            rows_per_symbol = block.present.sum(axis=1)
            bars = pl.DataFrame(
                {
                    "symbol": pl.Series(symbols).gather(
                        np.repeat(np.arange(len(symbols)), rows_per_symbol)
                    ),
                    "open_time": block.open_time_ms.ravel()[present],
                    "open": block.open.ravel()[present],
                    "high": block.high.ravel()[present],
                    "low": block.low.ravel()[present],
                    "close": close,
                    "volume": volume,
                    "quote_volume": volume * close,
                    "trades": trades,
                    "taker_buy_base": taker,
                    "taker_buy_quote": taker * close,
                }
            )
            checked = check_bars(bars)
            bounds = np.concatenate([[0], np.cumsum(rows_per_symbol)]).tolist()
            pieces = [checked.slice(lo, hi - lo) for lo, hi in itertools.pairwise(bounds)]
            if checked["reason"].null_count() == checked.height:
                # Every row valid (the usual case): simulated minutes are unique and sorted.
                return [piece.drop("reason") for piece in pieces]
            return [
                self._clean_source(piece, self._states[symbol])
                for symbol, piece in zip(symbols, pieces, strict=True)
            ]
        assert self.config.dump_path is not None
        frames = []
        for symbol in symbols:
            state = self._states[symbol]
            lines: list[str] = []
            for path in DumpSource(self.config.dump_path).files_for(symbol):
                lines.extend(
                    line
                    for line in read_lines(Path(path))
                    if line.split(",", 1)[0].strip().lower() not in _HEADER_FIRST_FIELDS
                )
            frames.append(self._clean_source(check_lines(lines, symbol), state))
            log.info(
                "feed dump %s: %d bars to replay from %s, %d rows rejected",
                symbol,
                frames[-1].height,
                self.config.dump_path,
                sum(state.rejected.values()),
            )
        return frames

    @staticmethod
    def _clean_source(checked: pl.DataFrame, state: _SymbolState) -> pl.DataFrame:
        """Valid rows of a replay, first of each open time, sorted; rejects counted now.

        A replay's malformed rows are counted once, when the source is read, rather than when
        their minute would have come: a row with a bad timestamp has no reliable minute.
        """
        state.rejected.update(checked["reason"].drop_nulls().to_list())
        valid = checked.filter(pl.col("reason").is_null()).drop("reason")
        first = first_of_each_minute(valid)
        if valid.height > first.height:
            state.rejected[v.DUPLICATE_OPEN_TIME] += valid.height - first.height
        return first.sort("open_time")

    def close(self) -> None:
        """Close the Binance stream and client connections (a no-op for replays)."""
        if self._client is not None:
            self._client.close()
        if self._stream is not None:
            self._stream.stop()

    # -- polling --------------------------------------------------------------------------

    def poll(self) -> dict[str, int]:
        """Bring every symbol up to date; the number of new closed bars per symbol.

        Never raises for a source failure: the symbol's error is recorded (`last_error`), a
        warning logged, and the next poll retries from where this one got to.
        """
        client, stream = self._client, self._stream
        if stream is not None:
            return self._poll_stream(stream)
        if client is not None:
            return {symbol: self._poll_binance(client, symbol) for symbol in self._states}
        assert self._replay is not None  # the one remaining kind of source
        return self._poll_replay(self._replay)

    def _poll_stream(self, stream: BinanceKlineStream) -> dict[str, int]:
        stream.start()
        delivered = stream.drain()
        added: dict[str, int] = {}
        for symbol, state in self._states.items():
            error = stream.error(symbol)
            klines = delivered.get(symbol)
            if not klines:  # most polls of a large universe: no check, no merge
                added[symbol] = 0
                with self._lock:
                    state.last_error = error
                continue
            checked = check_lines([_rest_line(kline) for kline in klines], symbol)
            with self._lock:
                state.rejected.update(checked["reason"].drop_nulls().to_list())
                added[symbol] = self._merge(state, checked.filter(pl.col("reason").is_null()))
                state.last_error = error
        return added

    def _replay_due(self, now_s: float) -> int:
        elapsed = max(0.0, now_s - self._start_s)
        return self.config.history_bars + math.floor(elapsed * self.config.replay_bars_per_s)

    def _replay_due_counts(self, now_s: float) -> np.ndarray:
        """Source bars due per symbol (config order) at `now_s`, before capping at the source's
        length: the same count for every symbol on the replay clock."""
        return np.full(len(self._states), self._replay_due(now_s), dtype=np.int64)

    def _poll_replay(self, replay: _Replay) -> dict[str, int]:
        due = np.minimum(self._replay_due_counts(self._clock()), replay.length)
        added = np.maximum(due - replay.released, 0)
        with self._lock:
            replay.released = np.maximum(replay.released, due)
        return dict(zip(self._states, added.tolist(), strict=True))

    def _poll_binance(self, client: BinanceClient, symbol: str) -> int:
        state = self._states[symbol]
        now_ms = int(self._clock() * 1000)
        # The newest closed bar opened a whole minute before the current minute began.
        end = now_ms - now_ms % ONE_MINUTE_MS - ONE_MINUTE_MS
        # Never ask for more than the window holds, even after a long outage (that leaves a gap,
        # which the feature engine treats as the start of a new segment).
        earliest = end - (self.config.history_bars - 1) * ONE_MINUTE_MS
        cursor = earliest if state.next_open_ms is None else max(state.next_open_ms, earliest)
        added = 0
        try:
            while cursor <= end:
                rows, _ = client.klines(symbol, cursor, end)
                if not rows:
                    break
                checked = check_lines([_rest_line(row) for row in rows], symbol)
                # Only closed bars: a server may also send the open one, or rows past `end`.
                # Rows before `cursor` (a repeated or late minute) go to the merge, which
                # deduplicates them or fills a minute missed earlier. A row whose open time is
                # off the minute is judged by the minute it falls in (and rejected later).
                minute = pl.col("open_time") - pl.col("open_time") % ONE_MINUTE_MS
                closed = (minute <= end) & (minute + ONE_MINUTE_MS <= now_ms)
                page = checked.filter(closed | pl.col("open_time").is_null())
                last = page.select(minute.max()).item()
                with self._lock:
                    state.rejected.update(page["reason"].drop_nulls().to_list())
                    added += self._merge(state, page.filter(pl.col("reason").is_null()))
                if not isinstance(last, int):
                    break  # no usable open time in the page: nothing to page on from
                # Continue after the newest minute received, malformed or not, so that a bad row
                # is counted once instead of being asked for (and rejected) on every poll.
                if last < cursor:
                    break  # only minutes before the cursor: no progress to make
                cursor = last + ONE_MINUTE_MS
                state.next_open_ms = cursor
        except _SOURCE_ERRORS as error:
            message = f"{type(error).__name__}: {error}"
            with self._lock:
                state.last_error = message
            log.warning("feed binance %s: poll failed, retrying next poll: %s", symbol, message)
            return added
        with self._lock:
            state.last_error = None
        return added

    def _merge(self, state: _SymbolState, new: pl.DataFrame) -> int:
        """Add valid bars to the window (caller holds the lock); the number of new bars.

        Held bars come first, so the first copy of a minute wins; later copies are counted as
        duplicates. The window keeps the newest `history_bars` bars, sorted by open time. A new
        bar is a minute not held before that is newer than the newest bar held (even when a
        burst pushes it out of the window at once) or that lands inside the window (a late one).
        """
        if new.height == 0:
            return 0
        held = state.bars
        combined = pl.concat([held, new.select(BAR_COLUMNS).cast(BAR_SCHEMA)])  # type: ignore[arg-type]
        unique = first_of_each_minute(combined)
        if combined.height > unique.height:
            state.rejected[v.DUPLICATE_OPEN_TIME] += combined.height - unique.height
        window = unique.sort("open_time").tail(self.config.history_bars)
        state.bars = window
        fresh = unique.slice(held.height)  # the batch's minutes that were not held
        newest_held = held["open_time"].max() if held.height else None
        kept_from = window["open_time"][0]
        counted = pl.col("open_time") >= kept_from
        if isinstance(newest_held, int):
            counted = counted | (pl.col("open_time") > newest_held)
        return fresh.filter(counted).height

    # -- reads ----------------------------------------------------------------------------

    @property
    def symbols(self) -> tuple[str, ...]:
        """The configured symbols, in config order."""
        return tuple(self._states)

    def _state(self, symbol: str) -> _SymbolState:
        try:
            return self._states[symbol]
        except KeyError:
            raise KeyError(f"unknown symbol {symbol!r}; the feed serves {self.symbols}") from None

    def bars(self, symbol: str) -> pl.DataFrame:
        """The latest (at most `history_bars`) closed bars of `symbol`, sorted by open time.

        Columns: market.klines.BAR_COLUMNS, `open_time` in epoch ms (Int64). KeyError for a
        symbol the feed does not serve.
        """
        with self._lock:
            state = self._state(symbol)
            replay = self._replay
            if replay is None:
                return state.bars.clone()
            first, count = replay.held(self.config.history_bars)
            k = self._index[symbol]
            return replay.bars.slice(int(first[k]), int(count[k]))

    def held_counts(self, symbols: list[str] | tuple[str, ...]) -> np.ndarray:
        """The number of bars held for each of `symbols` (int64, in the order given)."""
        for symbol in symbols:
            self._state(symbol)  # KeyError for an unknown symbol
        with self._lock:
            replay = self._replay
            if replay is None:
                return np.array([self._states[s].bars.height for s in symbols], dtype=np.int64)
            _, count = replay.held(self.config.history_bars)
            return count[[self._index[s] for s in symbols]]

    def newest_bars(self, symbols: list[str] | tuple[str, ...], counts: list[int]) -> pl.DataFrame:
        """The `counts[i]` newest held bars of each `symbols[i]` (fewer when fewer are held), in
        one frame: symbol after symbol in the order given, each in open-time order.

        One gather over the replay's frame (O(bars returned)), or one concatenation of the
        windows' tails for the binance source.
        """
        for symbol in symbols:
            self._state(symbol)
        with self._lock:
            replay = self._replay
            if replay is None:
                tails = [self._states[s].bars.tail(c) for s, c in zip(symbols, counts, strict=True)]
                return pl.concat(tails) if tails else empty_bars()
            first, held = replay.held(self.config.history_bars)
            index = np.array([self._index[s] for s in symbols], dtype=np.int64)
            take = np.minimum(np.asarray(counts, dtype=np.int64), held[index])
            ends = first[index] + held[index]
            block_starts = np.repeat(ends - take, take)
            within = np.arange(int(take.sum())) - np.repeat(np.cumsum(take) - take, take)
            return replay.bars[block_starts + within]

    def last_bar_open_ms(self, symbol: str) -> int | None:
        """Open time (epoch ms) of the newest bar held, None before any bar arrived."""
        bars = self.bars(symbol)
        return int(bars["open_time"][-1]) if bars.height else None

    def staleness_s(self, symbol: str) -> float:
        """Seconds since the newest bar held became available; infinity when none is held.

        `binance`: now - the newest bar's close (its open + 60 s), on the wall clock.
        Replays: seconds, on the feed's clock, since the newest bar held was due, i.e. since it
        was emitted on the accelerated replay clock (a poll's lateness counts as staleness).
        """
        now_s = self._clock()
        with self._lock:
            state = self._state(symbol)
            replay = self._replay
            if replay is None:
                if state.bars.height == 0:
                    return math.inf
                newest_close_s = (int(state.bars["open_time"][-1]) + ONE_MINUTE_MS) / 1000
                return max(0.0, now_s - newest_close_s)
            released = int(replay.released[self._index[symbol]])
            if released == 0:
                return math.inf
            # Source bar j (0-based) is due once history_bars + floor(elapsed * rate) > j.
            late = max(0, released - self.config.history_bars)
            emitted_s = self._start_s + late / self.config.replay_bars_per_s
            return max(0.0, now_s - emitted_s)

    def is_stale(self, symbol: str) -> bool:
        """True when `staleness_s(symbol)` exceeds `stale_after_s` (or no bar is held)."""
        return self.staleness_s(symbol) > self.config.stale_after_s

    def last_error(self, symbol: str) -> str | None:
        """The error of `symbol`'s most recent poll, None when that poll succeeded."""
        with self._lock:
            return self._state(symbol).last_error

    def errors(self) -> tuple[str | None, ...]:
        """Every symbol's `last_error`, in `symbols` order, read under one lock."""
        with self._lock:
            return tuple(state.last_error for state in self._states.values())

    def rejected(self, symbol: str | None = None) -> dict[str, int]:
        """Rows dropped so far per market.validation reason, for `symbol` or all symbols."""
        with self._lock:
            states = self._states.values() if symbol is None else [self._state(symbol)]
            total: Counter[str] = Counter()
            for state in states:
                total.update(state.rejected)
            return dict(total)

    def closes_since(self, symbol: str, open_ms: int) -> dict[int, float]:
        """Close of every held bar opening at or after `open_ms` (epoch ms): open time -> close.

        Covers at most the window held (`history_bars` minutes); the caller fills outcomes of
        earlier signals from it.
        """
        bars = self.bars(symbol).filter(pl.col("open_time") >= open_ms)
        return dict(zip(bars["open_time"].to_list(), bars["close"].to_list(), strict=True))

    def stream_stats(self) -> StreamStats | None:
        """The WebSocket stream's counters, reconnects and backfills; None for other sources."""
        return None if self._stream is None else self._stream.stats()

    def replay_remaining(self, symbol: str) -> int | None:
        """Bars a replay has yet to release for `symbol`; None for the binance source."""
        with self._lock:
            self._state(symbol)
            replay = self._replay
            if replay is None:
                return None
            k = self._index[symbol]
            return int(replay.length[k] - replay.released[k])

    def replay_close_s(self, source_index: int) -> float:
        """When source bar `source_index` (0-based, per symbol) of a replay becomes due on the
        feed's clock (epoch seconds): the replay's notion of that bar's close.

        The first `history_bars` bars are due at the start; bar j >= history_bars once
        `floor((now - start) * replay_bars_per_s) >= j - history_bars + 1`.
        """
        late = max(0, source_index - self.config.history_bars + 1)
        return self._start_s + late / self.config.replay_bars_per_s

    def __repr__(self) -> str:
        details: dict[str, Any] = {
            "source": self.config.source,
            "symbols": list(self.symbols),
            "history_bars": self.config.history_bars,
        }
        if self.config.source == "binance":
            details["live"] = self.config.binance_live
        return f"BarFeed({details})"
