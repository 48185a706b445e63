"""Shared fixtures: the real data in ../shared/data, a seeded simulator lake, Ray and Spark."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from configs.schema import SimConfig, SparkConfig
from market.bronze import BronzeStore
from market.klines import ONE_DAY_MS, ONE_MINUTE_MS, RAW_FIELDS, date_start_ms
from market.sources.base import ingest_symbol
from market.sources.sim import SimSource
from tests.fake_binance_ws import StreamRig
from tests.object_store import ObjectStore, seaweedfs

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QUANT_AI_SHARED_DATA", REPO.parent / "shared" / "data"))
REAL_1M = SHARED_DATA / "raw" / "BTCUSDT-1m-spot-2023-12-01_2024-12-31.csv.gz"
REAL_1H = SHARED_DATA / "derived" / "BTCUSDT-1h-spot-derived-2017-08-17_2024-12-31.csv.gz"


def require(path: Path) -> Path:
    """Skip the calling test, saying why, when a file of ../shared/data is absent."""
    if not path.exists():
        pytest.skip(f"real market data not found at {path} (../shared/data is absent)")
    return path


def read_real_minutes(path: Path, n_rows: int | None = None) -> pl.DataFrame:
    """The real 1-minute dump as validated-bar columns (open_time in epoch ms)."""
    raw = pl.read_csv(path, has_header=False, new_columns=list(RAW_FIELDS), n_rows=n_rows)
    return raw.drop("close_time", "ignore").with_columns(pl.lit("BTCUSDT").alias("symbol"))


@pytest.fixture(scope="session")
def real_minutes() -> pl.DataFrame:
    return read_real_minutes(require(REAL_1M))


@pytest.fixture(scope="session")
def real_hours_path() -> Path:
    return require(REAL_1H)


def sim_config(**overrides: Any) -> SimConfig:
    base: dict[str, Any] = {"seed": 7, "anchor_date": date(2024, 1, 30), "gap_rate": 0.0005}
    base.update(overrides)
    return SimConfig(**base)


def ingest_sim(lake: Path, symbols: list[str], days: int, config: SimConfig) -> None:
    """Simulated bars for `days` days from the anchor date into the lake's Bronze zone."""
    start = date_start_ms(config.anchor_date)
    source = SimSource(config, start, start + days * ONE_DAY_MS - ONE_MINUTE_MS)
    store = BronzeStore(lake)
    for symbol in symbols:
        ingest_symbol(source, symbol, store)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    import ray

    from cluster.ray_runtime import connect
    from configs.schema import RayConfig

    connect(RayConfig(num_cpus=2))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def spark(ray_local: None) -> Iterator[Any]:
    """One RayDP Spark session for the whole test session (start-up costs ~20 s)."""
    from cluster.spark import start_spark, stop_spark

    session, _ = start_spark(SparkConfig(executors=1, executor_cores=1, executor_memory="2g"))
    yield session
    stop_spark()


@pytest.fixture(scope="session")
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    """One SeaweedFS S3 server on loopback, shared by every object-store test of the session;
    each test works under its own prefix (`object_prefix`)."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as store:
        yield store


@pytest.fixture
def object_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of the test's own in the shared bucket."""
    return f"{request.node.name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def rigs() -> Iterator[list[StreamRig]]:
    """Local Binance stream rigs a test starts (it appends them); each is closed afterwards."""
    made: list[StreamRig] = []
    yield made
    for rig in made:
        rig.close()
