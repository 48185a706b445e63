"""The Silver ETL on real Spark through RayDP on a local Ray."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from market import validation as v
from market.bronze import Batch, BatchMeta, BronzeStore, RawKline
from market.features import spec
from market.features.polars_engine import compute_features
from market.files import exclusive_lock
from market.klines import BAR_COLUMNS, ONE_MINUTE_MS, date_start_ms
from market.lake import SILVER_BUILD_LOCK
from market.silver import SPEC_METADATA_KEY, build_silver
from market.sources.base import ingest_symbol
from market.sources.dump import DumpSource
from tests.conftest import REAL_1M, ingest_sim, require, sim_config
from tests.unit.test_feature_engines import scaled_error

pytestmark = pytest.mark.integration

SYMBOLS = ["SIMA", "SIMB"]


def bad_rows(day_start: int) -> dict[str, list[str]]:
    """Rows that must be quarantined, by the reason they must get."""
    t = day_start + 7 * ONE_MINUTE_MS  # a minute the simulator also fills: the sim row stays

    def row(*fields: object) -> str:
        return ",".join(str(f) for f in fields)

    return {
        v.WRONG_FIELD_COUNT: ["1,2,3", ""],
        v.UNPARSEABLE_VALUE: [
            row(t, "abc", 101, 99, 100, 10, t + 59_999, 1000, 5, 4, 400, 0),
            row(t, "NaN", 101, 99, 100, 10, t + 59_999, 1000, 5, 4, 400, 0),
        ],
        v.BAD_TIMESTAMP: [row(t + 5, 100, 101, 99, 100, 10, t + 60_004, 1000, 5, 4, 400, 0)],
        v.NON_POSITIVE_PRICE: [row(t, 0, 101, 99, 100, 10, t + 59_999, 1000, 5, 4, 400, 0)],
        v.NEGATIVE_VOLUME: [row(t, 100, 101, 99, 100, -1, t + 59_999, 1000, 5, 4, 400, 0)],
        v.OHLC_INCONSISTENT: [row(t, 100, 99.5, 99, 100, 10, t + 59_999, 1000, 5, 4, 400, 0)],
        v.TAKER_BUY_EXCEEDS_VOLUME: [
            row(t, 100, 101, 99, 100, 10, t + 59_999, 1000, 5, 11, 400, 0)
        ],
    }


def add_bad_part(lake: Path, symbol: str, day: date) -> dict[str, int]:
    rows = bad_rows(date_start_ms(day))
    raw = [RawKline(None, text) for texts in rows.values() for text in texts]
    BronzeStore(lake).write(
        Batch("sim", symbol, day, "handmade", raw, BatchMeta("2024-01-01T00:00:00Z", "test"))
    )
    return {reason: len(texts) for reason, texts in rows.items()}


def read_silver(lake: Path) -> pl.DataFrame:
    frame = pl.read_parquet(lake / "silver" / "**" / "*.parquet", hive_partitioning=True)
    return frame.sort("symbol", "open_time")


def assert_silver_matches_polars(silver: pl.DataFrame) -> None:
    """Recompute Silver's features from its own bars with polars: equal within 1e-9."""
    bars = silver.select(
        *[pl.col(c).dt.epoch("ms") if c == "open_time" else pl.col(c) for c in BAR_COLUMNS]
    )
    online = compute_features(bars)
    for name in (*spec.FEATURE_COLUMNS, *spec.TARGET_COLUMNS):
        a = silver[name].cast(pl.Float64).fill_null(np.nan).to_numpy()
        b = online[name].cast(pl.Float64).fill_null(np.nan).to_numpy()
        assert np.array_equal(np.isnan(a), np.isnan(b)), f"{name}: null patterns differ"
        present = ~np.isnan(a)
        assert scaled_error(a[present], b[present]) <= 1e-9, name


@pytest.fixture(scope="module")
def sim_lake(tmp_path_factory: pytest.TempPathFactory, spark: Any) -> dict[str, Any]:
    lake = tmp_path_factory.mktemp("lake")
    config = sim_config()
    ingest_sim(lake, SYMBOLS, days=3, config=config)
    expected_bad = add_bad_part(lake, "SIMA", config.anchor_date)
    summary = build_silver(spark, lake)
    return {"lake": lake, "summary": summary, "expected_bad": expected_bad, "config": config}


def test_every_rejected_row_is_quarantined_with_its_reason(sim_lake: dict[str, Any]) -> None:
    summary = sim_lake["summary"]
    expected = dict(sim_lake["expected_bad"])
    assert summary.quarantined == expected
    quarantine = pl.read_parquet(
        sim_lake["lake"] / "quarantine" / "**" / "*.parquet", hive_partitioning=True
    )
    assert quarantine.height == sum(expected.values())
    assert set(quarantine["reason"]) == set(expected)
    assert (
        quarantine.filter(pl.col("reason") == v.UNPARSEABLE_VALUE)["raw"].str.contains("abc").any()
    )
    assert summary.rows_out == summary.rows_in - sum(expected.values())


def test_silver_has_the_contract_schema_partitions_and_spec(sim_lake: dict[str, Any]) -> None:
    lake: Path = sim_lake["lake"]
    silver = read_silver(lake)
    expected = [*BAR_COLUMNS, *spec.FEATURE_COLUMNS, *spec.TARGET_COLUMNS]
    # symbol and month are the partition columns: in the path, not in the files.
    assert sorted(silver.columns) == sorted([*expected, "month"])
    a_file = next((lake / "silver").glob("symbol=*/month=*/*.parquet"))
    assert pq.read_schema(a_file).names == expected[1:]
    assert str(pq.read_schema(a_file).field("open_time").type) == "timestamp[ms, tz=UTC]"
    assert silver.height == sim_lake["summary"].rows_out
    assert silver.select(pl.struct("symbol", "open_time").is_unique().all()).item()
    months = sorted(p.name for p in (lake / "silver" / "symbol=SIMA").iterdir())
    assert months == ["month=2024-01", "month=2024-02"]
    schema_json = pq.read_metadata(a_file).metadata[b"org.apache.spark.sql.parquet.row.metadata"]
    fields = {f["name"]: f for f in json.loads(schema_json)["fields"]}
    assert fields["open_time"]["metadata"][SPEC_METADATA_KEY]["hash"] == spec.spec_hash()
    assert json.loads((lake / "silver" / "_spec.json").read_text())["hash"] == spec.spec_hash()
    assert sim_lake["summary"].gaps > 0 and sim_lake["summary"].missing_minutes > 0


def test_spark_and_polars_engines_agree_on_silver(sim_lake: dict[str, Any]) -> None:
    assert_silver_matches_polars(read_silver(sim_lake["lake"]))


def test_silver_reads_as_a_ray_dataset(sim_lake: dict[str, Any]) -> None:
    import ray.data

    dataset = ray.data.read_parquet(str(sim_lake["lake"] / "silver"))
    assert dataset.count() == sim_lake["summary"].rows_out
    assert "rsi_14" in dataset.schema().names


def test_incremental_run_equals_a_full_rebuild(
    tmp_path: Path, spark: Any, sim_lake: dict[str, Any]
) -> None:
    config = sim_lake["config"]
    incremental = tmp_path / "incremental"
    ingest_sim(incremental, SYMBOLS, days=2, config=config)
    first = build_silver(spark, incremental)
    assert first.symbols_processed == SYMBOLS
    # A second build of the same lake waits while another holds the lake's build lock.
    with ThreadPoolExecutor(1) as pool, exclusive_lock(incremental / SILVER_BUILD_LOCK):
        waiting = pool.submit(build_silver, spark, incremental)
        time.sleep(2.0)
        assert not waiting.done(), "a build ran while another held the lake"
    nothing = waiting.result(timeout=120)
    assert nothing.symbols_processed == [] and nothing.symbols_unchanged == SYMBOLS
    # A third day (2024-02-01) arrives for SIMA only: SIMB is untouched, SIMA rewrites January
    # (its last targets now see February) and February.
    ingest_sim(incremental, ["SIMA"], days=3, config=config)
    simb_file = next((incremental / "silver" / "symbol=SIMB").glob("month=*/*.parquet"))
    simb_mtime = simb_file.stat().st_mtime_ns
    update = build_silver(spark, incremental)
    assert update.symbols_processed == ["SIMA"] and update.symbols_unchanged == ["SIMB"]
    assert update.months_written == {"SIMA": ["2024-01", "2024-02"]}
    assert simb_file.stat().st_mtime_ns == simb_mtime

    full = tmp_path / "full"
    shutil.copytree(incremental / "bronze", full / "bronze")
    build_silver(spark, full)
    a, b = read_silver(incremental), read_silver(full)
    assert a.equals(b), "incremental Silver differs from a full rebuild"


@pytest.mark.realdata
def test_the_real_year_through_spark_matches_polars(tmp_path: Path, spark: Any) -> None:
    require(REAL_1M)
    store = BronzeStore(tmp_path)
    ingest_symbol(DumpSource(str(REAL_1M)), "BTCUSDT", store)
    summary = build_silver(spark, tmp_path)
    assert summary.rows_out == 571_680 and summary.quarantined == {} and summary.gaps == 0
    silver = read_silver(tmp_path)
    assert silver.height == 571_680
    assert silver["month"].n_unique() == 13
    assert_silver_matches_polars(silver)
    assert (silver["open_time"].diff().drop_nulls() == timedelta(minutes=1)).all()
