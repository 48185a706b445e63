"""Storage locations: paths and URIs resolved to a filesystem, or refused at once."""

from __future__ import annotations

import importlib
import socket
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from pydantic import SecretStr, ValidationError

from configs.schema import ObjectStoreConfig, PipelineConfig
from market.bronze import BronzeStore, open_bronze
from market.lake import Lake
from market.storage import StorageError, object_store_settings, require_local, resolve
from tests.conftest import REPO

PIPELINE_CONFIG = REPO / "configs" / "pipeline" / "local.yaml"


def test_a_plain_path_and_a_file_uri_are_the_same_local_location(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    relative = resolve("lake")
    from_uri = resolve(f"file://{tmp_path}/lake")
    assert relative.is_local and from_uri.is_local
    assert relative.local_path() == from_uri.local_path() == tmp_path / "lake"
    assert relative.child("bronze", "x").path == str(tmp_path / "lake" / "bronze" / "x")
    assert isinstance(open_bronze(f"file://{tmp_path}/lake"), BronzeStore)


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("hdfs://namenode/lake", "unknown storage scheme 'hdfs'"),
        ("s4://bucket/lake", "unknown storage scheme 's4'"),
        ("s3://", "names no bucket"),
        ("", "empty"),
    ],
)
def test_an_unusable_location_is_refused_at_once_without_creating_anything(
    location: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match=message):
        open_bronze(location)
    assert list(tmp_path.iterdir()) == [], "nothing named like the URI on local disk"


def _refused_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the socket is closed


def test_an_unreachable_object_store_fails_fast_naming_location_and_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    endpoint = _refused_endpoint()
    config = ObjectStoreConfig(
        endpoint_url=endpoint, access_key_id="k", secret_access_key=SecretStr("s")
    )
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        open_bronze("s3://bucket/lake", config)
    assert time.monotonic() - started < 10
    assert "s3://bucket/lake" in str(caught.value) and endpoint in str(caught.value)
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_unset_object_store_fields_come_from_the_standard_environment() -> None:
    environ = {
        "AWS_ENDPOINT_URL": "http://env:1",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "env-key",
        "AWS_SECRET_ACCESS_KEY": "env-secret",
    }
    from_env = object_store_settings(None, environ)
    assert from_env.endpoint_url == "http://env:1" and from_env.region == "eu-west-1"
    assert from_env.access_key_id == "env-key"
    assert from_env.secret_access_key is not None
    assert from_env.secret_access_key.get_secret_value() == "env-secret"

    configured = ObjectStoreConfig(endpoint_url="http://config:2", region="ap-south-1")
    merged = object_store_settings(configured, environ | {"AWS_REGION": "us-west-2"})
    assert (merged.endpoint_url, merged.region) == ("http://config:2", "ap-south-1")
    assert merged.access_key_id == "env-key", "what the config leaves unset"

    assert object_store_settings(None, {}).region == "us-east-1"
    assert object_store_settings(None, {}).endpoint_url is None


def test_the_object_store_config_refuses_unknown_keys_and_non_http_endpoints() -> None:
    with pytest.raises(ValidationError, match="endpoint_url"):
        ObjectStoreConfig(endpoint_url="127.0.0.1:8333")
    with pytest.raises(ValidationError, match="extra"):
        PipelineConfig.model_validate({"object_store": {"bucket": "x"}})
    config = PipelineConfig.model_validate(
        {"object_store": {"endpoint_url": "https://s3.example", "connect_timeout_s": 1}}
    )
    assert config.object_store.endpoint_url == "https://s3.example"
    assert "hunter2" not in repr(ObjectStoreConfig(secret_access_key=SecretStr("hunter2")))


def test_a_gcs_location_resolves_to_the_gcs_filesystem_without_a_probe() -> None:
    location = resolve("gs://bucket/lake", probe=False)
    assert isinstance(location.filesystem, pafs.GcsFileSystem)
    assert (location.uri, location.path) == ("gs://bucket/lake", "bucket/lake")


def test_lake_zones_written_locally_take_a_file_uri_and_refuse_an_object_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert Lake.at(f"file://{tmp_path}/lake/").silver == tmp_path / "lake" / "silver"
    for lake in ("s3://bucket/lake", "s3://", "gs://bucket/lake/"):
        with pytest.raises(StorageError, match="is a URI"):
            _ = Lake.at(lake).silver
    with pytest.raises(StorageError, match=r"runs 's3://bucket/runs' is a URI"):
        require_local("s3://bucket/runs", "runs")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "refusal"),
    [
        (
            ("jobs.tune", "--lake", "lake", "--registry", "registry", "--out", "s3://bucket/runs"),
            "cannot reach 's3://bucket/runs'",
        ),
        (
            ("jobs.pipeline", "--lake", "s3://bucket/lake", "--config", str(PIPELINE_CONFIG)),
            "cannot reach 's3://bucket/lake'",
        ),
        (
            ("jobs.tune", "--lake", "lake", "--registry", "s3://bucket/registry"),
            "cannot reach 's3://bucket/registry'",
        ),
    ],
)
def test_jobs_refuse_an_unusable_location_before_ray_starts(
    argv: tuple[str, ...], refusal: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object-store location that cannot be reached (nothing listens at the endpoint)."""
    module = importlib.import_module(argv[0])

    def no_ray(*_: object) -> None:
        raise AssertionError("Ray was started before the location was checked")

    monkeypatch.setattr(module, "connect", no_ray)
    monkeypatch.chdir(tmp_path)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed.getsockname()[1]}")
    with pytest.raises(StorageError, match=refusal):
        module.main(list(argv[1:]))
    assert list(tmp_path.iterdir()) == []


def test_the_features_job_checks_an_object_store_lake_before_ray_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import jobs.features

    def no_ray(*_: object) -> None:
        raise AssertionError("Ray was started before the location was checked")

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(jobs.features, "connect", no_ray)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match=f"cannot reach 's3://bucket/lake' at {endpoint}"):
        jobs.features.main(["--lake", "s3://bucket/lake"])
    assert list(tmp_path.iterdir()) == []


def test_resuming_a_sweep_needs_the_out_it_was_stored_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from jobs import tune

    monkeypatch.setattr(tune, "connect", lambda *_: None)
    with pytest.raises(SystemExit) as exited:
        tune.main(["--lake", "lake", "--registry", "registry", "--resume"])
    assert exited.value.code == 2 and "--resume needs the --out" in capsys.readouterr().err


def test_tune_and_serve_yaml_name_their_object_store_and_the_environment_fills_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One schema (`object_store:`) in the pipeline, tune and serve YAMLs; the endpoint from the
    YAML, the credentials from the environment; a Serve replica gets the secret in clear, any
    other dump masks it."""
    from configs.schema import ServeConfig, TuneJobConfig, load_config
    from serve.app import replica_args
    from serve.deploy import resolve_config
    from serve.engine.shards import ShardPlan

    section = "object_store:\n  endpoint_url: http://127.0.0.1:1\n  connect_timeout_s: 1.5\n"
    for name, model in (("tune", TuneJobConfig), ("serve", ServeConfig)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(section + "registry: s3://bucket/registry\n" * (name == "serve"))
        config = load_config(path, model)
        assert config.object_store.endpoint_url == "http://127.0.0.1:1"
        assert config.object_store.connect_timeout_s == 1.5
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://elsewhere:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-env")
    resolved = resolve_config(load_config(tmp_path / "serve.yaml", ServeConfig))
    assert resolved.registry == "s3://bucket/registry"
    store = resolved.object_store
    assert store.endpoint_url == "http://127.0.0.1:1", "the YAML's field wins"
    assert store.access_key_id == "key-from-env" and store.secret_access_key is not None
    assert store.secret_access_key.get_secret_value() == "secret-from-env"
    assert "secret-from-env" not in resolved.model_dump_json()
    replica = ServeConfig.model_validate(replica_args(resolved))
    assert replica.object_store == store
    engine_shard = ShardPlan.of(resolved).shard_config(resolved, 0)
    assert ServeConfig.model_validate(replica_args(engine_shard)).object_store == store
