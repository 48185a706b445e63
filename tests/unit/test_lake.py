"""market.lake: the one owner of the lake layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from market.bronze import BronzeStore
from market.lake import GOLD_SQLITE_FILE, SILVER_STATE_FILE, Lake
from market.storage import StorageError, is_uri


def test_local_lake_zones_are_directories_under_the_root(tmp_path: Path) -> None:
    lake = Lake.at(tmp_path / "lake")
    assert lake.bronze == tmp_path / "lake" / "bronze"
    assert lake.silver == tmp_path / "lake" / "silver"
    assert lake.quarantine == tmp_path / "lake" / "quarantine"
    assert lake.silver_state_file == tmp_path / "lake" / "silver" / SILVER_STATE_FILE
    assert lake.silver_location == str(tmp_path / "lake" / "silver")


def test_gold_sqlite_url_is_absolute_even_for_a_relative_lake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    url = Lake.at("lake").gold_sqlite_url
    assert url == f"sqlite:///{tmp_path.resolve() / 'lake' / 'gold' / GOLD_SQLITE_FILE}"


def test_uri_lake_keeps_uris_and_refuses_local_directories(tmp_path: Path) -> None:
    lake = Lake.at("s3://bucket/lake/")
    assert lake.root == "s3://bucket/lake"
    assert lake.silver_location == "s3://bucket/lake/silver"
    assert lake.location("quarantine") == "s3://bucket/lake/quarantine"
    with pytest.raises(StorageError, match="is a URI"):
        _ = lake.bronze
    with pytest.raises(StorageError, match="is a URI"):
        _ = lake.gold_sqlite_url
    # Nothing named like the URI was created anywhere relative to the working directory.
    assert not Path("s3:").exists()


@pytest.mark.parametrize(
    ("location", "expected"),
    [("s3://b/k", True), ("file:///tmp/x", True), ("/tmp/lake", False), ("lake", False)],
)
def test_is_uri(location: str, expected: bool) -> None:
    assert is_uri(location) is expected


def test_the_local_bronze_store_refuses_a_uri_lake_without_creating_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match="is a URI"):
        BronzeStore("s3://bucket/lake")
    assert list(tmp_path.iterdir()) == []
