"""The Gold store: every served signal, and its realised outcome once the horizon has passed.

The signal service decides one signal per symbol at the close of each new 1-minute bar ``t``
(``bar_open_time_ms`` is the bar's open time, epoch milliseconds, UTC) for a horizon of
``horizon_minutes`` bars (``market.features.spec.HORIZON_BARS``, 10). Each served signal is written
here with the model version and feature-spec hash that produced it. When bar ``t + horizon``
arrives, :meth:`GoldStore.fill_outcomes` fills in what happened, with the same definition as the
Silver target (DESIGN.md section 4):

- ``realised_close``: close of the bar whose open time is ``t + horizon_minutes * 60_000`` ms;
- ``realised_return``: the log return ``ln(realised_close / close)``;
- ``hit``: ``realised_return > 0`` for BUY, ``< 0`` for SELL, NULL for NEUTRAL (a flat return is
  a miss for both directions);
- ``pnl_bps``: position (+1 BUY, -1 SELL, 0 NEUTRAL) times the simple return
  ``exp(realised_return) - 1``, in basis points (1e-4), **gross of fees and slippage**.

One bar can be served by several models: a promotion or a rollback makes the engine recompute the
latest bar's signal with the new model, and Serve replicas mid-rollout serve the same bar with
different versions. Every such record is kept (``history`` shows what each model served), but each
(symbol, bar) counts once in the summaries (``outcome_summary``, ``counts_by_signal``): the record
that counts is the **first one stored** for the bar, flagged ``accounted``. The first, not the last,
because

- it is the decision taken at the close of bar ``t``, the entry price every outcome assumes; a
  record written after a model swap was served later, when that price was already gone;
- a bar's accounting never changes once written: the per-class counts feed Prometheus counters,
  which may not go down, and a rollback cannot rewrite the realised P&L of bars already scored.

The store is SQLAlchemy Core over SQLite (the default, a local file) or PostgreSQL (by URL, e.g.
``postgresql+psycopg://user:secret@host:5432/gold``). Writes are idempotent on
(symbol, bar_open_time_ms, model_version) and safe with several writers (Serve replicas, processes);
a partial unique index keeps one accounted record per (symbol, bar) under concurrent writers.
A table created before the ``accounted`` flag existed is migrated when a store opens it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Connection,
    Double,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    case,
    create_engine,
    event,
    false,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, RowMapping, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.pool import StaticPool
from sqlalchemy.schema import CreateColumn

from market.klines import ONE_MINUTE_MS
from serve.engine.snapshot import OutcomeSummary

SIGNALS: Final = ("BUY", "SELL", "NEUTRAL")
POSITION: Final[Mapping[str, int]] = {"BUY": 1, "SELL": -1, "NEUTRAL": 0}
SUPPORTED_BACKENDS: Final = ("sqlite", "postgresql")
TABLE_NAME: Final = "gold_signals"
BPS: Final = 1e4

# A custom execution option: SQLite transactions carrying it start with BEGIN IMMEDIATE.
_WRITE_LOCK: Final = "gold_write_lock"
# Key of the PostgreSQL advisory lock that serialises concurrent create_all() calls.
_SCHEMA_LOCK_KEY: Final = 0x601D5161
# How long a SQLite writer waits for another writer's lock before failing, in seconds.
_SQLITE_BUSY_TIMEOUT_S: Final = 30.0
# Symbols looked up by one pending-outcomes query: bound parameters, kept below SQLite's
# oldest limit of 999 per statement.
_SYMBOLS_PER_LOOKUP: Final = 500

_METADATA = MetaData()

GOLD_SIGNALS = Table(
    TABLE_NAME,
    _METADATA,
    # INTEGER (not BIGINT) on SQLite so that the column aliases the rowid and autoincrements.
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("symbol", String(32), nullable=False),
    Column("bar_open_time_ms", BigInteger, nullable=False),
    Column("signal", String(8), nullable=False),
    Column("confidence", Double, nullable=False),
    # NULL when the signal had no model output (e.g. NEUTRAL on stale features).
    Column("p_up", Double, nullable=True),
    Column("predicted_return", Double, nullable=True),
    Column("predicted_close", Double, nullable=True),
    Column("close", Double, nullable=False),
    Column("horizon_minutes", Integer, nullable=False),
    Column("model_version", String(128), nullable=False),
    Column("feature_spec_hash", String(64), nullable=False),
    Column("reason", Text, nullable=True),
    Column("served_at_ms", BigInteger, nullable=False),
    Column("realised_close", Double, nullable=True),
    Column("realised_return", Double, nullable=True),
    Column("hit", Boolean, nullable=True),
    Column("pnl_bps", Double, nullable=True),
    Column("filled_at_ms", BigInteger, nullable=True),
    # True on the one record per (symbol, bar) that the summaries count: the first one stored.
    # The server default lets writers that predate the flag keep writing a migrated table; their
    # rows are history only.
    Column("accounted", Boolean, nullable=False, server_default=false()),
    UniqueConstraint("symbol", "bar_open_time_ms", "model_version", name="uq_gold_signals_key"),
    CheckConstraint("signal IN ('BUY', 'SELL', 'NEUTRAL')", name="ck_gold_signals_signal"),
    CheckConstraint("horizon_minutes > 0", name="ck_gold_signals_horizon"),
    Index("ix_gold_signals_symbol_time", "symbol", "bar_open_time_ms"),
    # fill_outcomes() looks up the unfilled rows of one symbol; with filled_at_ms in the key the
    # filled history (almost every row) is skipped instead of scanned on every new bar.
    Index("ix_gold_signals_pending", "symbol", "filled_at_ms", "bar_open_time_ms"),
)

# At most one accounted record per (symbol, bar): the database, not a read-then-write race between
# replicas, decides which record of a bar is counted.
_ACCOUNTED_BAR: Final = Index(
    "uq_gold_signals_accounted_bar",
    GOLD_SIGNALS.c.symbol,
    GOLD_SIGNALS.c.bar_open_time_ms,
    unique=True,
    sqlite_where=GOLD_SIGNALS.c.accounted,
    postgresql_where=GOLD_SIGNALS.c.accounted,
)

# Model outputs a signal may lack; NaN is accepted for them and stored as NULL.
_OPTIONAL_OUTPUTS: Final = ("p_up", "predicted_return", "predicted_close")

_UNIQUE_KEY: Final = (
    GOLD_SIGNALS.c.symbol,
    GOLD_SIGNALS.c.bar_open_time_ms,
    GOLD_SIGNALS.c.model_version,
)


@dataclass(frozen=True)
class SignalRecord:
    """One served signal, decided at the close of bar ``t``.

    Times are epoch milliseconds (UTC). ``predicted_return`` is a log return over the horizon;
    ``predicted_close`` and ``close`` are prices in the quote currency; ``p_up`` and
    ``confidence`` are probabilities in [0, 1]. ``p_up``, ``predicted_return`` and
    ``predicted_close`` are None (or NaN) when no model produced them, e.g. a NEUTRAL signal on
    stale features; they are stored as NULL.
    """

    symbol: str
    bar_open_time_ms: int  # open time of the decision bar t
    signal: str  # "BUY" | "SELL" | "NEUTRAL"
    confidence: float
    p_up: float | None
    predicted_return: float | None  # ln(predicted_close / close)
    predicted_close: float | None
    close: float  # close of bar t
    horizon_minutes: int
    model_version: str
    feature_spec_hash: str
    reason: str | None
    served_at_ms: int

    def __post_init__(self) -> None:
        if not self.symbol:
            raise ValueError("SignalRecord.symbol is empty")
        if self.signal not in SIGNALS:
            raise ValueError(f"SignalRecord.signal must be one of {SIGNALS}, got {self.signal!r}")
        if self.horizon_minutes <= 0:
            raise ValueError(
                f"SignalRecord.horizon_minutes must be > 0, got {self.horizon_minutes}"
            )
        # SQLite silently stores NaN as NULL (then fails NOT NULL) and NaN is not valid JSON for
        # /signals/history: refuse it here, where the faulty producer is still on the stack.
        for name in ("confidence", "close"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"SignalRecord.{name} must be finite, got {value!r}")
        for name in _OPTIONAL_OUTPUTS:
            value = getattr(self, name)
            if value is not None and math.isinf(value):
                raise ValueError(f"SignalRecord.{name} must be finite, NaN or None, got {value!r}")
        if self.close <= 0:
            raise ValueError(f"SignalRecord.close must be > 0, got {self.close!r}")


def _iso_utc(ms: int) -> str:
    """Epoch milliseconds as ISO-8601 UTC, the repository's timestamp format."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def _mask(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _parse_url(url: str) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError:
        # Unparsable text cannot be masked, so it is not echoed: it may hold a password.
        raise ValueError(
            "Gold store URL is not a SQLAlchemy URL; expected e.g. 'sqlite:///gold.sqlite' or "
            "'postgresql+psycopg://user:password@host:5432/gold'"
        ) from None
    if parsed.drivername == "postgresql":
        # SQLAlchemy's default PostgreSQL driver is psycopg2; the platform ships psycopg 3.
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"Gold store URL scheme {parsed.drivername!r} is not supported "
            f"(use one of {SUPPORTED_BACKENDS}): {_mask(parsed)}"
        )
    return parsed


def _sqlite_is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or "mode=memory" in (url.database or "")


def _create_engine(url: URL) -> Engine:
    backend = url.get_backend_name()
    try:
        if backend == "sqlite":
            return _create_sqlite_engine(url)
        # pool_pre_ping: a PostgreSQL restart or an idle-connection reaper must not fail the
        # first write after it; the ping costs one round trip per checkout.
        return create_engine(url, pool_pre_ping=True)
    except (NoSuchModuleError, ImportError) as exc:
        raise ValueError(
            f"Gold store URL scheme {url.drivername!r} has no installed driver "
            f"({type(exc).__name__}): {_mask(url)}"
        ) from None


def _create_sqlite_engine(url: URL) -> Engine:
    memory = _sqlite_is_memory(url)
    uri = str(url.query.get("uri", "")).lower() in ("true", "1")
    if not memory and not uri and url.database:
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        # The store is shared by the service's threads; SQLite itself serialises the writers.
        connect_args={"check_same_thread": False, "timeout": _SQLITE_BUSY_TIMEOUT_S},
        # Every pooled connection to ":memory:" would be a different, empty database.
        **({"poolclass": StaticPool} if memory else {}),
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own transaction handling defers BEGIN and cannot take the write lock
        # up front; hand BEGIN to SQLAlchemy (below) as SQLAlchemy's pysqlite docs recommend.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # WAL: readers (the API's history, metrics) never block the writer and vice versa.
            cursor.execute("PRAGMA journal_mode=WAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A read-then-write transaction under a deferred BEGIN fails with SQLITE_BUSY (without
        # waiting) when another writer commits in between; IMMEDIATE takes the lock first.
        immediate = conn.get_execution_options().get(_WRITE_LOCK, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class GoldStore:
    """Served signals and their realised outcomes, in SQLite or PostgreSQL.

    ``url`` is a SQLAlchemy URL (``GoldConfig.url``): ``sqlite:///path/gold.sqlite`` (parent
    directories are created) or ``postgresql+psycopg://...`` (plain ``postgresql://`` also means
    psycopg 3). The table is created if missing. Thread-safe: one store may be shared by all
    threads of a process; several processes may write the same database.
    """

    def __init__(self, url: str) -> None:
        parsed = _parse_url(url)
        self.url = _mask(parsed)  # safe to log
        self.backend = parsed.get_backend_name()
        self._engine = _create_engine(parsed)
        try:
            self._create_schema()
        except BaseException:
            self._engine.dispose()
            raise

    def __repr__(self) -> str:
        return f"GoldStore({self.url!r})"

    def _write(self) -> Connection:
        """A connection whose transactions take the write lock at BEGIN (SQLite)."""
        return self._engine.connect().execution_options(**{_WRITE_LOCK: True})

    def _create_schema(self) -> None:
        with self._write() as conn, conn.begin():
            if self.backend == "postgresql":
                # Serve replicas starting together would otherwise race between create_all's
                # existence check and CREATE TABLE ("duplicate key ... pg_type_typname_nsp").
                conn.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
            _METADATA.create_all(conn, checkfirst=True)
            # create_all skips an existing table, so a table of the earlier schema is upgraded here.
            columns = {column["name"] for column in inspect(conn).get_columns(TABLE_NAME)}
            if GOLD_SIGNALS.c.accounted.name not in columns:
                _add_accounted_flag(conn)

    def record(self, record: SignalRecord) -> bool:
        """Store one served signal; True when it is its bar's accounted record (the first one).

        A record of a (symbol, bar) already recorded by another model (a promotion, a rollback,
        replicas mid-rollout) is stored for the history but not accounted: False. A record
        whose (symbol, bar, model) key exists is not written again: False, no error. So True
        means "count this signal", once per (symbol, bar).

        Uses INSERT ... ON CONFLICT DO NOTHING, so concurrent writers never raise: exactly one
        row per key and one accounted row per bar are kept, the first ones committed.
        """
        return self.record_many((record,))[0]

    def record_many(self, records: Sequence[SignalRecord]) -> list[bool]:
        """Store ``records`` in one transaction; for each, in order, what :meth:`record` returns.

        The same rows and answers as recording them one by one in this order: within the batch,
        too, the first record of a key or of a bar wins. One commit (and, on SQLite, one write
        lock) for the batch instead of one per record: a tick's signals of every symbol at once.
        """
        if not records:
            return []
        insert = postgresql.insert if self.backend == "postgresql" else sqlite.insert
        # One statement of each kind, values bound per record: compiled once, not per record.
        as_accounted = (
            insert(GOLD_SIGNALS)
            # No conflict target: skipped on the (symbol, bar, model) key and on the bar's
            # accounted index alike.
            .on_conflict_do_nothing()
            # RETURNING, not rowcount: on PostgreSQL SQLAlchemy consumes the implicit RETURNING
            # of the primary key and reports rowcount -1. A skipped row returns nothing.
            .returning(GOLD_SIGNALS.c.id)
        )
        as_history = insert(GOLD_SIGNALS).on_conflict_do_nothing(index_elements=list(_UNIQUE_KEY))
        # Every writer inserts in (symbol, bar) order: PostgreSQL makes an insert that conflicts
        # with another transaction's uncommitted row wait for it, and two replicas inserting
        # overlapping batches in different orders would deadlock. The sort is stable, so the
        # records of one bar (the only ones a record's answer depends on) keep their order.
        order = sorted(
            range(len(records)),
            key=lambda i: (records[i].symbol, records[i].bar_open_time_ms),
        )
        accounted = [False] * len(records)
        with self._write() as conn, conn.begin():
            # Statement by statement, not executemany: whether a record is accounted depends on
            # the records before it, the batch's own included.
            for i in order:
                values = _record_values(records[i])
                is_first = conn.execute(as_accounted, {**values, "accounted": True}).first()
                if is_first is None:
                    conn.execute(as_history, {**values, "accounted": False})
                accounted[i] = is_first is not None
        return accounted

    def fill_outcomes(self, symbol: str, closes: Mapping[int, float], now_ms: int) -> int:
        """Fill the outcomes of ``symbol``'s pending signals whose horizon bar is in ``closes``.

        ``closes`` maps bar open time (epoch ms) to that bar's close; a signal of bar ``t`` is
        filled when ``t + horizon_minutes * 60_000`` is a key. Sets ``realised_close``,
        ``realised_return`` (log return), ``hit``, ``pnl_bps`` (basis points, gross of fees) and
        ``filled_at_ms = now_ms``. Rows already filled are never touched again. Returns the
        number of rows filled; all of them are written in one transaction.
        """
        return self.fill_outcomes_many({symbol: closes}, now_ms)

    def fill_outcomes_many(
        self, closes_by_symbol: Mapping[str, Mapping[int, float]], now_ms: int
    ) -> int:
        """:meth:`fill_outcomes` of every symbol in ``closes_by_symbol`` (symbol -> its closes),
        in one transaction; the total number of rows filled. Every close is checked before
        anything is written, so a bad one fills nothing."""
        for closes in closes_by_symbol.values():
            _check_closes(closes)
        if not any(closes_by_symbol.values()):
            return 0
        t = GOLD_SIGNALS.c
        fill = (
            update(GOLD_SIGNALS)
            .where(t.id == bindparam("b_id"), t.filled_at_ms.is_(None))
            .values(
                realised_close=bindparam("b_realised_close"),
                realised_return=bindparam("b_realised_return"),
                hit=bindparam("b_hit"),
                pnl_bps=bindparam("b_pnl_bps"),
                filled_at_ms=bindparam("b_filled_at_ms"),
            )
        )
        with self._write() as conn, conn.begin():
            params = []
            # One lookup per chunk of symbols, not one per symbol. In symbol order, rows locked
            # in (symbol, id) order: concurrent fillers lock in one order and cannot deadlock.
            given = sorted(
                (item for item in closes_by_symbol.items() if item[1]), key=lambda item: item[0]
            )
            for start in range(0, len(given), _SYMBOLS_PER_LOOKUP):
                chunk = dict(given[start : start + _SYMBOLS_PER_LOOKUP])
                params.extend(_pending_outcomes(conn, chunk, now_ms))
            if not params:
                return 0
            updated = conn.execute(fill, params).rowcount
        if self._engine.dialect.supports_sane_multi_rowcount:
            return updated
        # The row locks (PostgreSQL) or the write lock (SQLite) guarantee every update applied.
        return len(params)

    def history(
        self, symbol: str | None, limit: int, *, among: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Served signals, newest decision bar first, at most ``limit``: of ``symbol``, or when
        it is None of every symbol in ``among`` (an engine shard's), or of all symbols.

        Every model's record of a bar is listed, the latest stored first. JSON-ready dicts: the
        record's fields, ``as_of`` (the decision bar's open time as ISO-8601 UTC, next to
        ``bar_open_time_ms``), ``outcome_open_time_ms`` (the horizon bar) and the outcome fields,
        None until filled.
        """
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        t = GOLD_SIGNALS.c
        stmt = select(GOLD_SIGNALS).order_by(t.bar_open_time_ms.desc(), t.id.desc()).limit(limit)
        if symbol is not None:
            stmt = stmt.where(t.symbol == symbol)
        elif among is not None:
            stmt = stmt.where(t.symbol.in_(list(among)))
        with self._engine.connect() as conn:
            rows = conn.execute(stmt).mappings().all()
        return [_history_item(row) for row in rows]

    def outcome_summary(self, symbols: Sequence[str] | None = None) -> tuple[OutcomeSummary, ...]:
        """The realised outcomes of each symbol's served signals (of `symbols` only, when given:
        an engine shard's), in symbol order.

        One signal per (symbol, bar): its accounted record. ``pnl_bps`` is in basis points.
        """
        t = GOLD_SIGNALS.c
        filled = t.filled_at_ms.is_not(None)
        directional = filled & t.signal.in_(("BUY", "SELL"))
        stmt = (
            select(
                t.symbol,
                func.count().label("signals"),
                func.count(t.filled_at_ms).label("filled"),
                func.coalesce(func.sum(case((directional, 1), else_=0)), 0).label("directional"),
                func.coalesce(func.sum(case((t.hit.is_(True), 1), else_=0)), 0).label("hits"),
                func.coalesce(func.sum(t.pnl_bps), 0.0).label("pnl_bps"),
            )
            .where(t.accounted)
            .group_by(t.symbol)
            .order_by(t.symbol)
        )
        if symbols is not None:
            stmt = stmt.where(t.symbol.in_(list(symbols)))
        with self._engine.connect() as conn:
            rows = conn.execute(stmt).all()
        summary = []
        for row in rows:
            n_directional, hits = int(row.directional), int(row.hits)
            summary.append(
                OutcomeSummary(
                    symbol=row.symbol,
                    signals=int(row.signals),
                    filled=int(row.filled),
                    directional=n_directional,
                    hits=hits,
                    hit_rate=hits / n_directional if n_directional else None,
                    pnl_bps=float(row.pnl_bps),
                )
            )
        return tuple(summary)

    def counts_by_signal(self, symbols: Sequence[str] | None = None) -> dict[tuple[str, str], int]:
        """(symbol, signal) -> number of served signals, one per (symbol, bar) (its accounted
        record), to restore counters after a restart; of `symbols` only, when given."""
        t = GOLD_SIGNALS.c
        stmt = (
            select(t.symbol, t.signal, func.count()).where(t.accounted).group_by(t.symbol, t.signal)
        )
        if symbols is not None:
            stmt = stmt.where(t.symbol.in_(list(symbols)))
        with self._engine.connect() as conn:
            return {(symbol, signal): int(n) for symbol, signal, n in conn.execute(stmt)}

    def close(self) -> None:
        """Release every pooled connection (the store is unusable afterwards)."""
        self._engine.dispose()


def _add_accounted_flag(conn: Connection) -> None:
    """Add ``accounted`` to a table of the earlier schema: each bar's first stored record (the
    lowest id) becomes its accounted one, as if it had been written by :meth:`GoldStore.record`.

    Runs inside the schema transaction: under the advisory lock (PostgreSQL) or the write lock
    (SQLite), so concurrent openers migrate once and the others see the finished table.
    """
    t = GOLD_SIGNALS.c
    column = CreateColumn(t.accounted).compile(dialect=conn.dialect)
    conn.exec_driver_sql(f"ALTER TABLE {TABLE_NAME} ADD COLUMN {column}")
    first = select(func.min(t.id)).group_by(t.symbol, t.bar_open_time_ms)
    conn.execute(update(GOLD_SIGNALS).where(t.id.in_(first)).values(accounted=True))
    _ACCOUNTED_BAR.create(conn)


_RECORD_FIELDS = tuple(field.name for field in fields(SignalRecord))


def _record_values(record: SignalRecord) -> dict[str, Any]:
    """The column values of ``record``: NaN model outputs become NULL."""
    # A shallow copy: the fields are scalars, and asdict's deep copy cost ~0.1 ms a record.
    values = {name: getattr(record, name) for name in _RECORD_FIELDS}
    for name in _OPTIONAL_OUTPUTS:
        values[name] = _opt_float(values[name])
    return values


def _check_closes(closes: Mapping[int, float]) -> None:
    for open_time, price in closes.items():
        if not math.isfinite(price) or price <= 0:
            raise ValueError(f"close of bar {open_time} must be a positive number, got {price}")


def _pending_outcomes(
    conn: Connection, closes_by_symbol: Mapping[str, Mapping[int, float]], now_ms: int
) -> list[dict[str, Any]]:
    """The fill parameters of the pending signals of ``closes_by_symbol``'s symbols whose
    horizon bar is in their closes (none empty), their rows locked until the transaction ends."""
    first = min(min(closes) for closes in closes_by_symbol.values())
    last = max(max(closes) for closes in closes_by_symbol.values())
    t = GOLD_SIGNALS.c
    outcome_time = t.bar_open_time_ms + t.horizon_minutes * ONE_MINUTE_MS
    pending = (
        select(t.id, t.symbol, t.bar_open_time_ms, t.horizon_minutes, t.signal, t.close)
        .where(
            t.symbol.in_(list(closes_by_symbol)),
            t.filled_at_ms.is_(None),
            # horizon_minutes >= 1, so the decision bar is before the last close: this bound
            # lets the pending index do a range scan; the exact test is the lookup below.
            t.bar_open_time_ms < last,
            outcome_time.between(first, last),
        )
        # PostgreSQL: a concurrent filler waits here, then sees the rows filled and skips
        # them. SQLite ignores FOR UPDATE; BEGIN IMMEDIATE already serialises writers.
        .order_by(t.symbol, t.id)
        .with_for_update()
    )
    params = []
    for row in conn.execute(pending):
        outcome_open_ms = row.bar_open_time_ms + row.horizon_minutes * ONE_MINUTE_MS
        outcome_close = closes_by_symbol[row.symbol].get(outcome_open_ms)
        if outcome_close is None:
            continue  # a bar inside [first, last] that the caller did not give for this symbol
        params.append(_outcome(row.id, row.signal, row.close, outcome_close, now_ms))
    return params


def _outcome(
    row_id: int, signal: str, close: float, outcome_close: float, now_ms: int
) -> dict[str, Any]:
    realised_return = math.log(outcome_close / close)
    position = POSITION[signal]
    hit = None if position == 0 else position * realised_return > 0
    return {
        "b_id": row_id,
        "b_realised_close": outcome_close,
        "b_realised_return": realised_return,
        "b_hit": hit,
        # expm1 keeps full precision for the tiny log returns of a 10-minute horizon.
        "b_pnl_bps": position * math.expm1(realised_return) * BPS,
        "b_filled_at_ms": now_ms,
    }


def _opt_float(value: Any) -> float | None:
    """None for unknowns: SQL NULL, or NaN (which JSON cannot carry)."""
    if value is None or math.isnan(value):
        return None
    return float(value)


def _history_item(row: RowMapping) -> dict[str, Any]:
    bar_ms = int(row["bar_open_time_ms"])
    horizon = int(row["horizon_minutes"])
    return {
        "symbol": row["symbol"],
        "as_of": _iso_utc(bar_ms),
        "bar_open_time_ms": bar_ms,
        "signal": row["signal"],
        "confidence": float(row["confidence"]),
        "p_up": _opt_float(row["p_up"]),
        "predicted_return": _opt_float(row["predicted_return"]),
        "predicted_close": _opt_float(row["predicted_close"]),
        "close": float(row["close"]),
        "horizon_minutes": horizon,
        "outcome_open_time_ms": bar_ms + horizon * ONE_MINUTE_MS,
        "model_version": row["model_version"],
        "feature_spec_hash": row["feature_spec_hash"],
        "reason": row["reason"],
        "served_at_ms": int(row["served_at_ms"]),
        "realised_close": _opt_float(row["realised_close"]),
        "realised_return": _opt_float(row["realised_return"]),
        "hit": None if row["hit"] is None else bool(row["hit"]),
        "pnl_bps": _opt_float(row["pnl_bps"]),
        "filled_at_ms": None if row["filled_at_ms"] is None else int(row["filled_at_ms"]),
    }
