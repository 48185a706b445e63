"""Bronze on a real S3-compatible store (SeaweedFS on loopback): commit markers instead of
renames, the same rows as on local disk, reruns that add nothing, and `jobs.ingest --lake s3://`
working against the store or failing at once against an unreachable one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pytest

from configs.schema import IngestConfig, SimConfig
from market.bronze import ObjectBronzeStore, open_bronze
from market.ingest import build_source
from market.sources.base import ingest_symbol
from market.sources.dump import DumpSource
from tests.conftest import REPO
from tests.ingest_child import stored_rows, write_dump_file
from tests.object_store import ObjectStore

pytestmark = pytest.mark.integration

FIRST_DAY = date(2024, 3, 1)
INGEST = (sys.executable, "-m", "jobs.ingest")


def test_a_dump_ingested_to_the_object_store_equals_the_local_one_and_a_rerun_adds_nothing(
    object_store: ObjectStore, object_prefix: str, tmp_path: Path
) -> None:
    dump = write_dump_file(tmp_path, "BTCUSDT", 0, FIRST_DAY, days=2)
    local = tmp_path / "lake"
    remote = object_store.uri(object_prefix)
    for lake, config in ((str(local), None), (remote, object_store.config)):
        report = ingest_symbol(DumpSource(str(dump)), "BTCUSDT", open_bronze(lake, config))
        assert report.rows_written == 2 * 1440 + 3, "two days of bars and 3 malformed lines"

    on_store = stored_rows(remote, object_store.config)
    assert on_store == stored_rows(local), "row for row, batch tags and dates included"
    assert set(on_store.values()) == {1}

    again = ingest_symbol(
        DumpSource(str(dump)), "BTCUSDT", open_bronze(remote, object_store.config)
    )
    assert (again.rows_written, again.days_written) == (0, 0)
    assert again.rows_already_stored == 0, "the file's done-marker on the store: skipped unread"
    assert stored_rows(remote, object_store.config) == on_store


def test_a_part_without_its_commit_marker_is_invisible_and_the_rerun_overwrites_it_once(
    object_store: ObjectStore, object_prefix: str
) -> None:
    lake = object_store.uri(object_prefix)
    config = IngestConfig(source="sim", symbols=["SIMA"], sim_days=2, sim=SimConfig(seed=3))
    store = open_bronze(lake, object_store.config)
    assert isinstance(store, ObjectBronzeStore)
    ingest_symbol(build_source(config), "SIMA", store)
    complete = stored_rows(lake, object_store.config)
    first, second = store.parts("sim", "SIMA")

    # A writer killed between the part and its marker: the part (here half of it) is there,
    # its marker is not.
    store.filesystem.delete_file(str(second.path).replace(store.root, f"{store.root}/_committed"))
    with store.filesystem.open_output_stream(str(second.path)) as stream:
        stream.write(b'{"raw":"half a part"')
    assert store.parts("sim", "SIMA") == [first], "readers list through the commit markers"
    assert sum(stored_rows(lake, object_store.config).values()) == sum(
        1 for _ in store.records(first)
    )

    rerun = ingest_symbol(build_source(config), "SIMA", store)
    assert rerun.days_written == 1 and rerun.parts == [str(second.path)]
    assert stored_rows(lake, object_store.config) == complete, "overwritten, not duplicated"
    assert ingest_symbol(build_source(config), "SIMA", store).rows_written == 0


def _job_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return env | {"PYTHONPATH": str(REPO)} | extra


def test_the_ingest_job_writes_bronze_to_the_object_store(
    object_store: ObjectStore, object_prefix: str, tmp_path: Path
) -> None:
    """`python -m jobs.ingest --lake s3://...` with the store named only by the environment
    (its Ray tasks included) stores what the same ingest stores on local disk."""
    lake = object_store.uri(object_prefix)
    symbols = "SIMA,SIMB"
    result = subprocess.run(
        [*INGEST, "--source", "sim", "--symbols", symbols, "--sim-days", "2", "--lake", lake],
        cwd=tmp_path,
        env=_job_env(object_store.environment),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["symbols"] == ["SIMA", "SIMB"] and summary["rows_written"] > 2 * 2 * 1400
    assert list(tmp_path.iterdir()) == [], "nothing written to local disk"

    local = tmp_path / "lake"
    config = IngestConfig(source="sim", symbols=symbols.split(","), sim_days=2)
    for symbol in config.symbols:
        ingest_symbol(build_source(config), symbol, open_bronze(local))
    on_store = stored_rows(lake, object_store.config)
    assert on_store == stored_rows(local)
    assert sum(on_store.values()) == summary["rows_written"]


def test_the_ingest_job_fails_at_once_against_an_unreachable_store(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    started = time.monotonic()
    result = subprocess.run(
        [*INGEST, "--source", "sim", "--symbols", "SIMA", "--lake", "s3://bucket/lake"],
        cwd=tmp_path,
        env=_job_env(env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "[ingest] error: cannot reach 's3://bucket/lake'"
    )
    assert endpoint in lines[0] and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == [], "no local directory named like the URI"
    assert elapsed < 60, f"{elapsed:.0f} s: failed before starting Ray"
