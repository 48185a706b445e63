"""Silver's manifest commit (`market.silver_manifest`) on pyarrow's local filesystem seen through
a SubTreeFileSystem, the way an object-store lake is addressed: readers see only committed
files, a build that dies before its commit leaves the previous state, and garbage collection
keeps one generation for readers still on it."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from market.silver_manifest import (
    ManifestLake,
    SilverCommitConflictError,
    SilverState,
    new_build_id,
    partition_values,
)


@pytest.fixture
def lake(tmp_path: Path) -> ManifestLake:
    (tmp_path / "store").mkdir()
    return ManifestLake(
        pafs.SubTreeFileSystem(str(tmp_path / "store"), pafs.LocalFileSystem()), "b/lake"
    )


def table(*values: int) -> pa.Table:
    return pa.table({"x": pa.array(values, pa.int64())})


def rows(lake: ManifestLake) -> list[int]:
    files = lake.committed_files()
    assert files is not None
    return sorted(
        v for f in files for v in pq.read_table(f, filesystem=lake.filesystem)["x"].to_pylist()
    )


def build(lake: ManifestLake, parts: dict[str, tuple[int, ...]], symbols: list[str]) -> SilverState:
    """One build: write `parts` (lake-relative directory -> rows), replace those partitions."""
    previous = lake.read_state()
    build_id = new_build_id()
    written = [lake.write_part(d, build_id, table(*v)) for d, v in parts.items()]
    done = {**previous.symbols, **{s: [f"part-of-{s}"] for s in symbols}}
    return lake.commit(
        previous,
        spec_hash="h",
        symbols=done,
        replaced=lambda key: any(key.startswith(d + "/") for d in parts),
        written=written,
        build_id=build_id,
    )


def test_a_lake_without_a_manifest_is_read_as_a_directory(lake: ManifestLake) -> None:
    assert lake.read_state() == SilverState()
    assert lake.committed_files() is None


def test_a_commit_replaces_only_the_partitions_it_rewrote(lake: ManifestLake) -> None:
    build(
        lake,
        {"silver/symbol=A/month=2024-01": (1, 2), "silver/symbol=B/month=2024-01": (3,)},
        ["A", "B"],
    )
    assert rows(lake) == [1, 2, 3]
    state = build(lake, {"silver/symbol=A/month=2024-01": (4,)}, ["A"])
    assert rows(lake) == [3, 4], "A's partition replaced, B's kept"
    assert set(state.symbols) == {"A", "B"}
    assert len(state.retained) == 2, "the previous commit's files stay for readers still on it"
    assert all(partition_values(k)["symbol"] in {"A", "B"} for k in state.files or ())


def test_a_build_that_dies_before_its_commit_is_invisible_and_its_rerun_commits_once(
    lake: ManifestLake,
) -> None:
    build(lake, {"silver/symbol=A/month=2024-01": (1,)}, ["A"])
    before = lake.read_state()
    # Written, never committed: a crash between the data and the state.
    orphan = lake.write_part("silver/symbol=A/month=2024-01", new_build_id(), table(9, 9))
    lake.write_part("quarantine/symbol=A", new_build_id(), table(9))
    assert lake.read_state() == before
    assert rows(lake) == [1]

    state = build(lake, {"silver/symbol=A/month=2024-01": (2,)}, ["A"])
    assert rows(lake) == [2]
    assert orphan not in (state.files or ())
    assert lake.collect_garbage(state) == 2, "the dead build's two files"
    assert rows(lake) == [2]


def test_garbage_collection_keeps_one_generation_of_replaced_files(lake: ManifestLake) -> None:
    first = build(lake, {"silver/symbol=A/month=2024-01": (1,)}, ["A"])
    second = build(lake, {"silver/symbol=A/month=2024-01": (2,)}, ["A"])
    assert lake.collect_garbage(second) == 0
    assert all(lake.filesystem.get_file_info(lake.path(k)).is_file for k in first.files or ())
    third = build(lake, {"silver/symbol=A/month=2024-01": (3,)}, ["A"])
    assert lake.collect_garbage(third) == 1, "the first build's file, two generations back"
    assert rows(lake) == [3]


def test_the_state_round_trips_and_a_local_state_has_no_manifest() -> None:
    local = SilverState.from_json({"spec_hash": "h", "symbols": {"A": ["p"]}})
    assert local.files is None and "files" not in local.to_json()
    remote = SilverState("h", {"A": ["p"]}, ("silver/symbol=A/month=2024-01/part-x.parquet",))
    assert SilverState.from_json(remote.to_json()) == remote
    assert partition_values("silver/symbol=A/month=2024-01/part-x.parquet") == {
        "symbol": "A",
        "month": "2024-01",
    }


def test_a_build_that_planned_before_another_commit_is_refused_and_writes_nothing(
    lake: ManifestLake,
) -> None:
    build(lake, {"silver/symbol=A/month=2024-01": (1,)}, ["A"])
    planned_from = lake.read_state()
    first_id = new_build_id()
    late = lake.write_part("silver/symbol=B/month=2024-01", first_id, table(9))
    winner = build(lake, {"silver/symbol=A/month=2024-01": (2,)}, ["A"])
    with pytest.raises(SilverCommitConflictError, match=f"generation {planned_from.generation}"):
        lake.commit(
            planned_from,
            spec_hash="h",
            symbols={"B": ["part-of-B"]},
            replaced=lambda key: False,
            written=[late],
            build_id=first_id,
        )
    assert lake.read_state() == winner and winner.generation == planned_from.generation + 1
    assert rows(lake) == [2]


def test_garbage_collection_spares_files_of_builds_younger_than_the_commit(
    lake: ManifestLake,
) -> None:
    older, committing, younger = sorted(new_build_id() for _ in range(3))
    dead = lake.write_part("silver/symbol=A/month=2024-01", older, table(1))
    in_progress = lake.write_part("silver/symbol=B/month=2024-01", younger, table(2))
    state = lake.commit(
        lake.read_state(),
        spec_hash="h",
        symbols={},
        replaced=lambda key: False,
        written=[lake.write_part("silver/symbol=C/month=2024-01", committing, table(3))],
        build_id=committing,
    )
    assert lake.collect_garbage(state) == 1
    assert not lake.filesystem.get_file_info(lake.path(dead)).is_file
    assert lake.filesystem.get_file_info(lake.path(in_progress)).is_file
    build(lake, {"silver/symbol=D/month=2024-01": (4,)}, ["D"])
    lake.write_part("silver/symbol=E/month=2024-01", older, table(5))
    assert lake.collect_garbage(state) == 0, "a superseded commit collects nothing"
