"""Bronze ingestion on Ray: one task per symbol, progress as tasks finish."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray

from configs.schema import IngestConfig, ObjectStoreConfig
from market.bronze import open_bronze
from market.klines import ONE_DAY_MS, ONE_MINUTE_MS, date_start_ms, parse_iso_ms
from market.sources.base import KlineSource, ingest_symbol
from market.sources.binance import BinanceClient, BinanceSource
from market.sources.dump import DumpSource
from market.sources.sim import SimSource
from market.storage import Location, object_store_settings

log = logging.getLogger(__name__)


def resolve_range(config: IngestConfig) -> tuple[int | None, int | None]:
    """The inclusive epoch-ms range to ingest, from the config and each source's defaults."""
    start = parse_iso_ms(config.start) if config.start else None
    end = parse_iso_ms(config.end) if config.end else None
    if config.source == "sim":
        start = start if start is not None else date_start_ms(config.sim.anchor_date)
        end = end if end is not None else start + config.sim_days * ONE_DAY_MS - ONE_MINUTE_MS
    elif config.source == "binance":
        if start is None:
            raise ValueError("--start is required for --source binance")
        end = end if end is not None else int(datetime.now(UTC).timestamp() * 1000)
    if start is not None and end is not None and end < start:
        raise ValueError(f"end ({config.end}) is before start ({config.start})")
    return start, end


def build_source(config: IngestConfig) -> KlineSource:
    """The configured source, ready to yield batches."""
    start, end = resolve_range(config)
    if config.source == "sim":
        assert start is not None and end is not None
        return SimSource(config.sim, start, end)
    if config.source == "dump":
        if not config.path:
            raise ValueError("--path is required for --source dump")
        return DumpSource(config.path, start, end)
    assert start is not None and end is not None
    return BinanceSource(BinanceClient(config.binance), start, end)


INGEST_TASK_PREFIX = "ingest-"
"""Ray names each symbol's ingest task `ingest-<SYMBOL>` (what the State API and the dashboard
list), so where a symbol's work ran, and how often it was retried, can be read back."""


# A task lost with its node (or its worker process) is run again, up to twice: a rerun stores
# only what is not stored yet (parts are committed whole and matched by their rows' positions).
@ray.remote(max_retries=2)
def _ingest_task(
    config: IngestConfig, symbol: str, lake: str, object_store: ObjectStoreConfig
) -> dict[str, Any]:
    from ray.experimental import tqdm_ray

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    source = build_source(config)
    # Ray draws the bars of every task on the driver's terminal, one line per symbol.
    bar = tqdm_ray.tqdm(desc=f"ingest {symbol}", unit="part")
    try:
        store = open_bronze(lake, object_store)
        report = ingest_symbol(source, symbol, store, on_part=lambda _: bar.update())
    finally:
        bar.close()
    return asdict(report)


def run_ingest(
    config: IngestConfig,
    lake: str | Path | Location,
    object_store: ObjectStoreConfig | None = None,
) -> dict[str, Any]:
    """Ingest every configured symbol into Bronze as Ray tasks; returns the job summary.

    `lake` is a path or URI (probed here), or a `Location` the caller resolved (and probed)
    with the same settings; an object store's settings are completed from this process's
    environment here, once, so every task reaches the same store on whichever node it runs.
    A lake that cannot be opened raises `market.storage.StorageError` before any task starts."""
    resolve_range(config)  # fail fast on a bad range, before any task starts
    settings = object_store_settings(object_store)
    store = open_bronze(lake, settings)
    removed = store.remove_temporaries()
    started = time.perf_counter()
    pending = {
        _ingest_task.options(name=f"{INGEST_TASK_PREFIX}{s}").remote(
            config, s, str(lake), settings
        ): s
        for s in config.symbols
    }
    reports: list[dict[str, Any]] = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            pending.pop(ref)
            reports.append(ray.get(ref))
            rows = sum(r["rows_written"] for r in reports)
            elapsed = time.perf_counter() - started
            print(
                f"[ingest] {len(reports)}/{len(config.symbols)} symbols, "
                f"{sum(r['days_written'] for r in reports)} day-parts, {rows} rows, "
                f"{rows / max(elapsed, 1e-9):,.0f} rows/s",
                file=sys.stderr,
                flush=True,
            )
    elapsed = time.perf_counter() - started
    rows_written = sum(r["rows_written"] for r in reports)
    return {
        "job": "ingest",
        "source": config.source,
        "lake": str(lake),
        "symbols": sorted(r["symbol"] for r in reports),
        "rows_written": rows_written,
        "parts_written": sum(r["days_written"] for r in reports),
        "rows_already_stored": sum(r["rows_already_stored"] for r in reports),
        # Left by killed writers: found by the cleanup here, or by a task under its symbol's
        # lock (a symbol another ingest was writing during the cleanup).
        "temporaries_removed": removed + sum(r["temporaries_removed"] for r in reports),
        "seconds": round(elapsed, 3),
        "rows_per_s": round(rows_written / max(elapsed, 1e-9), 1),
    }
