"""The filesystem model registry: versions, integrity, concurrency, aliases, rollback and CLI."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest

from models.registry import (
    ModelRegistry,
    RegistryError,
    current_git_commit,
    main,
    version_id,
)

NAME = "signal"


def files(tag: str = "a") -> dict[str, bytes]:
    return {
        "weights.pt": f"weights-{tag}".encode() * 100,
        "config.json": json.dumps({"family": "lstm", "tag": tag}).encode(),
        "scaler.json": b'{"mean": [0.0], "std": [1.0]}',
    }


def meta(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "feature_spec_hash": "abc123",
        "train_range": ["2024-01-01T00:00:00Z", "2024-03-01T00:00:00Z"],
        "seed": 7,
        "metrics": {"dsr": 0.97, "sharpe": 1.234567, "trades": 42, "folds": [0.1, 0.2]},
        # A fixed commit keeps most tests from shelling out to git.
        "git_commit": "0" * 40,
    }
    base.update(extra)
    return base


def registry_with(root: Path, count: int) -> tuple[ModelRegistry, list[str]]:
    registry = ModelRegistry(str(root))
    return registry, [registry.register(NAME, files(str(i)), meta(i=i)) for i in range(count)]


# Versions


def test_register_and_read_round_trip(tmp_path: Path) -> None:
    registry = ModelRegistry(str(tmp_path / "reg"))
    payload = files()
    version = registry.register(NAME, payload, meta())
    assert version == "v0001"
    assert registry.versions(NAME) == ["v0001"]
    for filename, data in payload.items():
        assert registry.read_file(NAME, version, filename) == data
    metadata = registry.metadata(NAME, version)
    assert metadata["name"] == NAME and metadata["version"] == version
    assert metadata["seed"] == 7 and metadata["feature_spec_hash"] == "abc123"
    assert metadata["metrics"]["folds"] == [0.1, 0.2]
    assert metadata["git_commit"] == "0" * 40
    created = datetime.fromisoformat(metadata["created_at"])
    assert created.utcoffset() == timedelta(0)
    weights = payload["weights.pt"]
    assert metadata["files"]["weights.pt"] == {
        "size": len(weights),
        "sha256": hashlib.sha256(weights).hexdigest(),
    }
    on_disk = tmp_path / "reg" / NAME / "versions" / version
    assert sorted(p.name for p in on_disk.iterdir()) == sorted([*payload, "metadata.json"])


def test_git_commit_is_recorded_when_the_caller_gives_none(tmp_path: Path) -> None:
    registry = ModelRegistry(str(tmp_path))
    metadata = meta()
    del metadata["git_commit"]
    version = registry.register(NAME, files(), metadata)
    assert registry.metadata(NAME, version)["git_commit"] == current_git_commit()


def test_versions_are_numbered_per_model_and_never_reused(tmp_path: Path) -> None:
    registry, versions = registry_with(tmp_path, 3)
    assert versions == ["v0001", "v0002", "v0003"]
    assert registry.register("other", files(), meta()) == "v0001"
    assert registry.versions(NAME) == versions
    assert registry.versions("never-registered") == []
    # Versions are immutable: registering identical content again makes a new version.
    assert registry.register(NAME, files("0"), meta(i=0)) == "v0004"
    assert registry.metadata(NAME, "v0001")["i"] == 0
    assert version_id(12) == "v0012" and version_id(12345) == "v12345"


def test_incomplete_version_is_invisible_and_its_number_skipped(tmp_path: Path) -> None:
    registry, _ = registry_with(tmp_path, 1)
    # What a registration killed before writing metadata.json leaves behind.
    crashed = tmp_path / NAME / "versions" / "v9999"
    crashed.mkdir()
    (crashed / "weights.pt").write_bytes(b"partial")
    assert registry.versions(NAME) == ["v0001"]
    with pytest.raises(RegistryError, match="unknown version 'v9999'"):
        registry.metadata(NAME, "v9999")
    with pytest.raises(RegistryError, match="unknown version"):
        registry.read_file(NAME, "v9999", "weights.pt")
    with pytest.raises(RegistryError, match="unknown version"):
        registry.set_alias(NAME, "production", "v9999", "must not point at a partial version")
    # Numbering continues past the leftover and sorts numerically beyond four digits.
    assert registry.register(NAME, files(), meta()) == "v10000"
    assert registry.versions(NAME) == ["v0001", "v10000"]


def test_corrupt_or_missing_file_is_detected(tmp_path: Path) -> None:
    registry, (version,) = registry_with(tmp_path, 1)
    weights = tmp_path / NAME / "versions" / version / "weights.pt"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + b"X")  # same size, different content
    with pytest.raises(RegistryError, match="corrupt"):
        registry.read_file(NAME, version, "weights.pt")
    weights.write_bytes(original + b"extra")
    with pytest.raises(RegistryError, match="corrupt"):
        registry.read_file(NAME, version, "weights.pt")
    weights.unlink()
    with pytest.raises(RegistryError, match="missing"):
        registry.read_file(NAME, version, "weights.pt")
    with pytest.raises(RegistryError, match=r"has no file 'nope\.bin'"):
        registry.read_file(NAME, version, "nope.bin")


def test_invalid_registrations_are_refused_without_using_a_number(tmp_path: Path) -> None:
    registry = ModelRegistry(str(tmp_path))
    with pytest.raises(RegistryError, match="reserved"):
        registry.register(NAME, files(), meta(version="v0042"))
    with pytest.raises(RegistryError, match="reserved"):
        registry.register(NAME, {"metadata.json": b"{}"}, meta())
    with pytest.raises(RegistryError, match="JSON-serialisable"):
        registry.register(NAME, files(), meta(seed=object()))
    with pytest.raises(RegistryError, match="JSON-serialisable"):
        registry.register(NAME, files(), meta(metrics={"dsr": float("nan")}))
    with pytest.raises(RegistryError, match="invalid file name"):
        registry.register(NAME, {"../escape": b"x"}, meta())
    with pytest.raises(RegistryError, match="invalid model name"):
        registry.register("a/b", files(), meta())
    with pytest.raises(RegistryError, match="at least one file"):
        registry.register(NAME, {}, meta())
    with pytest.raises(RegistryError, match="not a version id"):
        registry.metadata(NAME, "latest")
    assert registry.register(NAME, files(), meta()) == "v0001"


def _register_many(root: str, worker: int, count: int, barrier: Any) -> list[str]:
    """Register `count` versions, tagged with the worker, after all workers are ready."""
    registry = ModelRegistry(root)
    barrier.wait()
    return [
        registry.register(NAME, files(f"{worker}-{i}"), meta(worker=worker, i=i))
        for i in range(count)
    ]


def _check_all_registered(
    registry: ModelRegistry, results: list[list[str]], count: int, *, dense: bool
) -> None:
    versions = [version for batch in results for version in batch]
    assert len(set(versions)) == len(versions) == len(results) * count
    assert registry.versions(NAME) == sorted(versions)
    if dense:
        assert registry.versions(NAME) == [version_id(n) for n in range(1, len(versions) + 1)]
    for worker, batch in enumerate(results):
        for i, version in enumerate(batch):
            metadata = registry.metadata(NAME, version)
            assert (metadata["worker"], metadata["i"]) == (worker, i)
            expected = files(f"{worker}-{i}")["weights.pt"]
            assert registry.read_file(NAME, version, "weights.pt") == expected


def test_concurrent_registrations_from_processes_get_unique_versions(tmp_path: Path) -> None:
    workers, count = 4, 5
    context = multiprocessing.get_context("spawn")
    barrier = context.Manager().Barrier(workers)
    with context.Pool(workers) as pool:
        results = pool.starmap(
            _register_many, [(str(tmp_path), worker, count, barrier) for worker in range(workers)]
        )
    # mkdir claims never withdraw, so concurrent registrations leave no gaps.
    _check_all_registered(ModelRegistry(str(tmp_path)), results, count, dense=True)


def test_object_store_claim_protocol_gives_unique_versions(tmp_path: Path) -> None:
    # A SubTreeFileSystem is not a LocalFileSystem, so the registry takes the object-store path
    # (claim objects + listing) while the test still runs on local disk.
    filesystem = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    registry = ModelRegistry("reg", filesystem=filesystem)
    workers, count = 4, 5
    with ThreadPoolExecutor(workers) as pool:
        futures = [
            pool.submit(_register_many_on, registry, worker, count) for worker in range(workers)
        ]
        results = [future.result() for future in futures]
    # A claim withdrawn after a tie may leave its number unused: unique, not gap-free.
    _check_all_registered(registry, results, count, dense=False)
    claims = {
        p.name: len(list(p.iterdir())) for p in (tmp_path / "reg" / NAME / "claims").iterdir()
    }
    assert {v for v, n in claims.items() if n} == set(registry.versions(NAME))
    assert set(claims.values()) <= {0, 1}


def test_store_without_directories_behaves_like_an_object_store() -> None:
    fsspec = pytest.importorskip("fsspec")
    # fsspec's in-memory filesystem has no real directories, like S3 or GCS.
    memory = fsspec.filesystem("memory")
    root = f"/registry-test-{uuid.uuid4().hex}"
    registry = ModelRegistry(root, filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(memory)))
    try:
        assert not registry.exists() and registry.versions(NAME) == []
        v1, v2 = (registry.register(NAME, files(tag), meta()) for tag in "ab")
        assert registry.versions(NAME) == [v1, v2] == ["v0001", "v0002"]
        assert registry.read_file(NAME, v2, "weights.pt") == files("b")["weights.pt"]
        registry.set_alias(NAME, "production", v1, "first")
        registry.set_alias(NAME, "production", v2, "second")
        assert registry.rollback(NAME) == v1 == registry.resolve(NAME, "production")
        with pytest.raises(RegistryError, match="unknown version 'v0003'"):
            registry.metadata(NAME, "v0003")
    finally:
        memory.rm(root, recursive=True)


def _register_many_on(registry: ModelRegistry, worker: int, count: int) -> list[str]:
    return [
        registry.register(NAME, files(f"{worker}-{i}"), meta(worker=worker, i=i))
        for i in range(count)
    ]


# Aliases and rollback


def test_alias_set_get_and_history(tmp_path: Path) -> None:
    registry, (v1, v2) = registry_with(tmp_path, 2)
    assert registry.get_alias(NAME, "production") is None
    assert registry.alias_history(NAME, "production") == []
    registry.set_alias(NAME, "production", v1, "gate passed: dsr 0.97")
    registry.set_alias(NAME, "production", v2, "gate passed: dsr 0.99")
    registry.set_alias(NAME, "staging", v1, "canary")
    assert registry.get_alias(NAME, "production") == v2
    assert registry.aliases(NAME) == {"production": v2, "staging": v1}
    history = registry.alias_history(NAME, "production")
    assert [(h["version"], h["previous"], h["reason"]) for h in history] == [
        (v1, None, "gate passed: dsr 0.97"),
        (v2, v1, "gate passed: dsr 0.99"),
    ]
    assert all(h["action"] == "set" and "@" in h["by"] for h in history)
    assert all(datetime.fromisoformat(h["at"]).utcoffset() is not None for h in history)
    # A refused move leaves the alias where it was.
    with pytest.raises(RegistryError, match="unknown version 'v0042'"):
        registry.set_alias(NAME, "production", "v0042", "typo")
    with pytest.raises(RegistryError, match="looks like a version id"):
        registry.set_alias(NAME, "v0001", v1, "confusing")
    assert registry.get_alias(NAME, "production") == v2
    assert len(registry.alias_history(NAME, "production")) == 2
    alias_file = tmp_path / NAME / "aliases" / "production.json"
    assert json.loads(alias_file.read_text())["version"] == v2
    assert not [p for p in alias_file.parent.iterdir() if ".tmp-" in p.name]


def test_concurrent_alias_moves_keep_every_history_entry(tmp_path: Path) -> None:
    registry, versions = registry_with(tmp_path, 2)

    def move(worker: int) -> None:
        for i in range(5):
            registry.set_alias(NAME, "production", versions[(worker + i) % 2], f"{worker}-{i}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(move, range(4)))
    history = registry.alias_history(NAME, "production")
    assert sorted(h["reason"] for h in history) == sorted(
        f"{w}-{i}" for w in range(4) for i in range(5)
    )
    assert registry.get_alias(NAME, "production") == history[-1]["version"]


def test_rollback_steps_back_through_history(tmp_path: Path) -> None:
    registry, (v1, v2, v3) = registry_with(tmp_path, 3)
    for version in (v1, v2, v3):
        registry.set_alias(NAME, "production", version, f"promote {version}")
    assert registry.rollback(NAME) == v2
    assert registry.get_alias(NAME, "production") == v2
    # Rolling back a rollback keeps going back (undo twice), it does not return to v3.
    assert registry.rollback(NAME, reason="still bad") == v1
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback(NAME)
    assert registry.get_alias(NAME, "production") == v1
    history = registry.alias_history(NAME, "production")
    assert [(h["action"], h["version"], h["previous"], h["reason"]) for h in history[-2:]] == [
        ("rollback", v2, v3, "rollback"),
        ("rollback", v1, v2, "still bad"),
    ]
    # A promotion after rollbacks is what the next rollback undoes.
    registry.set_alias(NAME, "production", v3, "fixed", action="override")
    assert registry.rollback(NAME) == v1


def test_rollback_with_nothing_to_return_to(tmp_path: Path) -> None:
    registry, (v1,) = registry_with(tmp_path, 1)
    with pytest.raises(RegistryError, match="never been set"):
        registry.rollback(NAME)
    registry.set_alias(NAME, "production", v1, "first")
    registry.set_alias(NAME, "production", v1, "re-promoted the same version")
    with pytest.raises(RegistryError, match="only ever pointed at v0001"):
        registry.rollback(NAME)
    assert len(registry.alias_history(NAME, "production")) == 2


def test_resolve_version_or_alias(tmp_path: Path) -> None:
    registry, (v1, v2) = registry_with(tmp_path, 2)
    registry.set_alias(NAME, "production", v1, "first")
    assert registry.resolve(NAME, v2) == v2
    assert registry.resolve(NAME, "production") == v1
    with pytest.raises(RegistryError, match="unknown version or alias 'staging'"):
        registry.resolve(NAME, "staging")
    with pytest.raises(RegistryError, match="unknown version 'v0003'"):
        registry.resolve(NAME, "v0003")


def test_file_uri_and_relative_path_reach_the_same_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "reg"
    by_uri = ModelRegistry(root.as_uri())
    assert by_uri.uri == root.as_uri()
    version = by_uri.register(NAME, files(), meta())
    by_uri.set_alias(NAME, "production", version, "first")
    monkeypatch.chdir(tmp_path)
    relative = ModelRegistry("reg")
    assert relative.uri == str(root)
    assert relative.versions(NAME) == [version]
    assert relative.get_alias(NAME, "production") == version
    assert relative.read_file(NAME, version, "weights.pt") == files()["weights.pt"]
    assert (root / NAME / "versions" / version / "metadata.json").is_file()


# Git commit


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True,
        capture_output=True,
    )


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_current_git_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    assert current_git_commit(repo) is None  # not a checkout (tmp_path is outside any repo)
    _git(repo, "init", "-q")
    assert current_git_commit(repo) is None  # no commit yet
    (repo / "code.py").write_text("x = 1\n")
    _git(repo, "add", "code.py")
    _git(repo, "commit", "-q", "-m", "first")
    sha = current_git_commit(repo)
    assert sha is not None and len(sha) == 40 and int(sha, 16) >= 0
    (repo / "untracked.txt").write_text("ignored")
    assert current_git_commit(repo) == sha
    (repo / "code.py").write_text("x = 2\n")
    assert current_git_commit(repo) == f"{sha}-dirty"
    assert current_git_commit(tmp_path / "missing") is None
    monkeypatch.setenv("PATH", str(tmp_path / "no-binaries-here"))
    assert current_git_commit(repo) is None


# CLI


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_cli_list_show_promote_rollback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry, (v1, v2) = registry_with(tmp_path, 2)
    registry.set_alias(NAME, "production", v1, "gate passed")
    base = ["--registry", str(tmp_path), "--name", NAME]

    code, out, _ = run_cli(capsys, *base, "list")
    assert code == 0
    listing = json.loads(out[-1])
    assert [row["version"] for row in listing["versions"]] == [v1, v2]
    assert listing["versions"][0]["aliases"] == ["production"]
    assert listing["versions"][1]["aliases"] == []
    # Scalar metrics are listed; nested ones are left to `show`.
    assert listing["versions"][0]["metrics"] == {"dsr": 0.97, "sharpe": 1.234567, "trades": 42}
    assert "[production]" in out[0] and "sharpe=1.235" in out[0]

    code, out, _ = run_cli(capsys, *base, "show", "production")
    assert code == 0 and json.loads(out[-1]) == registry.metadata(NAME, v1)
    code, out, _ = run_cli(capsys, *base, "show", v2)
    assert code == 0 and json.loads(out[-1])["version"] == v2

    code, out, _ = run_cli(capsys, *base, "promote", v2, "--reason", "manual: gate too strict")
    assert code == 0
    assert json.loads(out[-1]) == {
        "name": NAME,
        "alias": "production",
        "version": v2,
        "previous": v1,
    }
    last = registry.alias_history(NAME, "production")[-1]
    assert (last["action"], last["reason"]) == ("override", "manual: gate too strict")

    code, out, _ = run_cli(capsys, *base, "rollback", "--reason", "live PnL off")
    assert code == 0
    assert json.loads(out[-1])["version"] == v1 == registry.get_alias(NAME, "production")
    assert registry.alias_history(NAME, "production")[-1]["reason"] == "live PnL off"


def test_cli_errors_are_clear_and_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry, (v1,) = registry_with(tmp_path, 1)
    base = ["--registry", str(tmp_path)]

    code, out, err = run_cli(capsys, *base, "promote", "v0007", "--reason", "typo")
    assert code == 1 and out == []
    assert err.strip() == "error: unknown version 'v0007' of model 'signal'"
    assert "Traceback" not in err
    assert registry.get_alias(NAME, "production") is None

    code, _, err = run_cli(capsys, *base, "show", "v0007")
    assert code == 1 and "unknown version 'v0007'" in err
    code, _, err = run_cli(capsys, *base, "rollback")
    assert code == 1 and "nothing to roll back to" in err
    code, _, err = run_cli(capsys, "--registry", str(tmp_path / "absent"), "list")
    assert code == 1 and "no registry at" in err
    code, _, err = run_cli(capsys, *base, "promote", v1)  # --reason is required
    assert code == 2 and "--reason" in err
