"""The Silver ETL on a real S3-compatible store (SeaweedFS on loopback) with real Spark (RayDP):
the same Silver as from the same Bronze on local disk, reruns that add nothing, a build that dies
before its commit invisible to readers, two builds at once (the overtaken one plans again), the
sweep's reader, and `jobs.features --lake s3://` against an unreachable store. (The job's
success path is `cluster.etl.run_feature_etl`, which runs `build_silver` as these tests do; a
job of its own would start a second Ray and RayDP.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pytest

from configs.schema import ObjectStoreConfig, SimConfig
from market.bronze import open_bronze
from market.klines import ONE_DAY_MS, ONE_MINUTE_MS, date_start_ms
from market.silver import build_silver, open_silver
from market.silver_manifest import ManifestLake
from market.sources.base import ingest_symbol
from market.sources.sim import SimSource
from market.storage import resolve
from tests.conftest import REPO, sim_config
from tests.object_store import ObjectStore

pytestmark = pytest.mark.integration

SYMBOLS = ["SIMA", "SIMB"]


def ingest(lake: str, symbols: list[str], days: int, config: SimConfig, store: Any) -> None:
    """`days` simulated days from the anchor date into the Bronze of a path or URI lake."""
    start = date_start_ms(config.anchor_date)
    source = SimSource(config, start, start + days * ONE_DAY_MS - ONE_MINUTE_MS)
    bronze = open_bronze(lake, store)
    for symbol in symbols:
        ingest_symbol(source, symbol, bronze)


def silver_frame(lake: str, store: ObjectStoreConfig | None = None) -> pl.DataFrame:
    frame = pl.from_arrow(open_silver(lake, store).to_table())
    assert isinstance(frame, pl.DataFrame)
    return frame.select(sorted(frame.columns)).sort("symbol", "open_time")


def stored_keys(object_store: ObjectStore, lake: str) -> list[str]:
    root = resolve(lake, object_store.config)
    selector = pafs.FileSelector(root.path, recursive=True)
    return sorted(i.path for i in root.filesystem.get_file_info(selector) if i.is_file)


@pytest.fixture(scope="module")
def lakes(
    object_store: ObjectStore, tmp_path_factory: pytest.TempPathFactory, spark: Any
) -> dict[str, Any]:
    """The same two simulated days of two symbols built on local disk and on the store."""
    config = sim_config()
    local = str(tmp_path_factory.mktemp("local") / "lake")
    remote = object_store.uri(f"silver-{os.getpid()}")
    ingest(local, SYMBOLS, 2, config, None)
    ingest(remote, SYMBOLS, 2, config, object_store.config)
    started = time.perf_counter()
    local_summary = build_silver(spark, local)
    local_s = time.perf_counter() - started
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        remote_summary = build_silver(spark, remote, object_store.config)
    remote_s = time.perf_counter() - started
    fallbacks = [w for w in caught if "Arrow optimization" in str(w.message)]
    assert not fallbacks, "Bronze reached Spark row by row instead of through Arrow"
    print(f"\nSilver build wall time: local {local_s:.2f} s, object store {remote_s:.2f} s")
    return {
        "config": config,
        "local": local,
        "remote": remote,
        "local_summary": local_summary,
        "remote_summary": remote_summary,
    }


def test_silver_built_on_the_store_equals_silver_built_locally(
    lakes: dict[str, Any], object_store: ObjectStore
) -> None:
    local, remote = lakes["local_summary"], lakes["remote_summary"]
    assert remote.silver == f"{lakes['remote']}/silver"
    for name in ("rows_in", "rows_out", "rows_written", "quarantined", "gaps", "months_written"):
        assert getattr(remote, name) == getattr(local, name), name
    on_store = silver_frame(lakes["remote"], object_store.config)
    assert on_store.height == local.rows_out > 2 * 2 * 1400
    assert on_store.equals(silver_frame(lakes["local"])), "frame for frame, dtypes included"
    keys = stored_keys(object_store, lakes["remote"])
    assert not any(k.startswith(("s3:", "/")) for k in keys)
    assert not Path("s3:").exists(), "nothing local named like the URI"


def test_a_rerun_on_the_store_adds_nothing(
    lakes: dict[str, Any], object_store: ObjectStore, spark: Any
) -> None:
    before = stored_keys(object_store, lakes["remote"])
    again = build_silver(spark, lakes["remote"], object_store.config)
    assert again.symbols_processed == [] and again.symbols_unchanged == SYMBOLS
    assert stored_keys(object_store, lakes["remote"]) == before


def test_a_build_that_dies_before_its_commit_leaves_the_previous_silver_and_the_rerun_completes(
    lakes: dict[str, Any], object_store: ObjectStore, spark: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A third day for SIMA: the build dies after writing its files, before its commit; readers
    keep the previous Silver, and the rerun equals the same incremental build on local disk."""
    remote, local, config = lakes["remote"], lakes["local"], lakes["config"]
    committed = silver_frame(remote, object_store.config)
    ingest(remote, ["SIMA"], 3, config, object_store.config)

    def die(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed between the data files and the commit")

    monkeypatch.setattr(ManifestLake, "commit", die)
    with pytest.raises(RuntimeError, match="killed"):
        build_silver(spark, remote, object_store.config)
    monkeypatch.undo()
    orphans = [k for k in stored_keys(object_store, remote) if "month=2024-02" in k]
    assert orphans, "the dead build wrote February's files"
    assert silver_frame(remote, object_store.config).equals(committed)

    rerun = build_silver(spark, remote, object_store.config)
    assert rerun.symbols_processed == ["SIMA"] and rerun.symbols_unchanged == ["SIMB"]
    assert rerun.months_written == {"SIMA": ["2024-01", "2024-02"]}
    ingest(local, ["SIMA"], 3, config, None)
    build_silver(spark, local)
    assert silver_frame(remote, object_store.config).equals(silver_frame(local))
    assert not set(orphans) & set(stored_keys(object_store, remote)), "the dead build's files"


def test_the_sweeps_reader_reads_silver_from_the_store(
    lakes: dict[str, Any], object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.dataset import SILVER_COLUMNS, arrays_from_table, load_silver

    for name, value in object_store.environment.items():
        monkeypatch.setenv(name, value)
    on_store = load_silver(lakes["remote"], ["SIMB"])
    local_table = open_silver(lakes["local"]).to_table(columns=list(SILVER_COLUMNS))
    local = arrays_from_table(local_table.filter(pc.equal(local_table["symbol"], "SIMB")))
    assert on_store.symbols == ("SIMB",) and on_store.bars > 2 * 1400
    assert np.array_equal(on_store.open_time_ms, local.open_time_ms)
    assert np.array_equal(on_store.inputs, local.inputs, equal_nan=True)


def test_the_dashboards_reader_reads_silver_from_the_store(
    lakes: dict[str, Any], object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serve.dashboard.silver import latest_silver_time, load_silver_window, silver_symbols

    for name, value in object_store.environment.items():
        monkeypatch.setenv(name, value)
    remote, local = lakes["remote"], lakes["local"]
    assert silver_symbols(remote) == silver_symbols(local) == SYMBOLS
    end = latest_silver_time(remote, "SIMA")
    assert end is not None and end == latest_silver_time(local, "SIMA")
    start = end - timedelta(hours=6)
    window = load_silver_window(remote, "SIMA", start, end)
    assert window.height > 300 and window.equals(load_silver_window(local, "SIMA", start, end))


def test_a_build_that_another_build_overtakes_plans_again_and_both_succeed(
    lakes: dict[str, Any], object_store: ObjectStore, spark: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A third day for SIMB; while the first build is between its files and its commit, a second
    build of the same lake runs whole and commits first. The first must not overwrite that
    commit: it discards its files, plans again from the new state (nothing left to do) and
    succeeds; Silver equals the same build on local disk, and no file of the lost attempt stays.
    """
    remote, local, config = lakes["remote"], lakes["local"], lakes["config"]
    ingest(remote, ["SIMB"], 3, config, object_store.config)
    real_commit = ManifestLake.commit
    overtaken: dict[str, Any] = {}

    def commit_after_another_build(lake: ManifestLake, *args: Any, **kwargs: Any) -> Any:
        if not overtaken:
            overtaken["written"] = list(kwargs["written"])
            overtaken["other"] = build_silver(spark, remote, object_store.config)
        return real_commit(lake, *args, **kwargs)

    monkeypatch.setattr(ManifestLake, "commit", commit_after_another_build)
    first = build_silver(spark, remote, object_store.config)
    monkeypatch.undo()

    other = overtaken["other"]
    assert other.symbols_processed == ["SIMB"] and other.commit_conflicts == 0
    assert first.commit_conflicts == 1
    assert first.symbols_processed == [] and first.symbols_unchanged == SYMBOLS
    lake = resolve(remote, object_store.config)
    state = ManifestLake(lake.filesystem, lake.path).read_state()
    assert state.generation == 3, "the first build, the dead one's rerun, the overtaking one"
    stored = stored_keys(object_store, remote)
    assert not {f"{lake.path}/{key}" for key in overtaken["written"]} & set(stored)
    ingest(local, ["SIMB"], 3, config, None)
    build_silver(spark, local)
    assert silver_frame(remote, object_store.config).equals(silver_frame(local))


FEATURES = (sys.executable, "-m", "jobs.features")


def _job_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    return env | {"PYTHONPATH": str(REPO)} | extra


def test_the_features_job_fails_at_once_against_an_unreachable_store(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    result = subprocess.run(
        [*FEATURES, "--lake", "s3://bucket/lake"],
        cwd=tmp_path,
        env=_job_env(env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "[features] error: cannot reach 's3://bucket/lake'"
    )
    assert endpoint in lines[0] and result.stdout == ""
    assert list(tmp_path.iterdir()) == [], "no local directory named like the URI"
