"""Storage locations: a local path or a URI, resolved to a pyarrow filesystem and a path in it.

Every location the platform is given (a lake, a registry, a sweep's runs) is read by these rules
(which of them may be on an object store so far: the README's "Storage locations"):

* no scheme (`lake`, `/data/lake`, `~/lake`): a local path, made absolute;
* `file:///data/lake`: the same local path;
* `s3://bucket/prefix`: Amazon S3 or any S3-compatible store (SeaweedFS, MinIO, Ceph). Its
  endpoint, region and credentials come from `ObjectStoreConfig`, and every field left unset
  from the standard environment (`AWS_ENDPOINT_URL`, `AWS_REGION` / `AWS_DEFAULT_REGION`,
  `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`); the region defaults to `us-east-1`;
* `gs://bucket/prefix`: Google Cloud Storage, credentials as its client library finds them;
* any other scheme: a `StorageError` at once.

A remote location is probed when it is resolved (its bucket is looked up, each connection
attempt bounded by `ObjectStoreConfig.connect_timeout_s`), so an unreachable store or a missing
bucket is a `StorageError` naming the location before any work starts. A URI is never turned
into a local path: nothing here creates a directory named like one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from configs.schema import ObjectStoreConfig
from market.files import write_bytes_durably

SCHEMES: Final = ("file", "s3", "gs")
"""The URI schemes a location may have; a location without one is a local path."""

DEFAULT_REGION: Final = "us-east-1"

_REQUEST_ATTEMPTS: Final = 2
"""Attempts of every S3 request, the reachability probe's included: one retry absorbs a dropped
connection or a throttled request, while an unreachable store fails a job within two connect
timeouts."""


class StorageError(Exception):
    """A location that cannot be used: unknown scheme, unreachable store, missing bucket."""


def is_uri(location: str | Path) -> bool:
    """True for `scheme://...` locations (object stores, `file://`), False for plain paths."""
    return "://" in str(location)


def local_path(location: str | Path) -> Path | None:
    """The local path that a plain path or a `file://` URI names (as given: relative stays
    relative); None for any other URI."""
    text = str(location)
    if not is_uri(text):
        return Path(text)
    if text.split("://", 1)[0].lower() == "file":
        return Path(urlsplit(text).path)
    return None


def require_local(location: str | Path, what: str) -> Path:
    """`local_path(location)`, for what is stored on the local filesystem only; StorageError for
    an object-store URI, so that no local directory is ever named like one."""
    path = local_path(location)
    if path is None:
        raise StorageError(
            f"{what} {str(location)!r} is a URI, but {what} is stored on a local path only"
        )
    return path


@dataclass(frozen=True)
class Location:
    """A resolved location: the URI (or absolute local path) it was named by, its filesystem and
    the path inside that filesystem (`bucket/prefix` on an object store, no trailing slash)."""

    uri: str
    filesystem: pafs.FileSystem
    path: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def local_path(self) -> Path:
        """The location on the local filesystem; StorageError for an object store."""
        if not self.is_local:
            raise StorageError(f"{self.uri!r} is an object-store location, not a local path")
        return Path(self.path)

    def child(self, *names: str) -> Location:
        """The location `names` below this one, on the same filesystem."""
        suffix = "/".join(names)
        return Location(f"{self.uri}/{suffix}", self.filesystem, f"{self.path}/{suffix}")

    def __truediv__(self, name: str) -> Location:
        return self.child(name)

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        """The last component of the path."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def _info(self) -> pafs.FileInfo:
        return self.filesystem.get_file_info(self.path)

    def exists(self) -> bool:
        return bool(self._info().type != pafs.FileType.NotFound)

    def is_file(self) -> bool:
        return bool(self._info().type == pafs.FileType.File)

    def is_dir(self) -> bool:
        """A directory, or on an object store a prefix holding objects."""
        return bool(self._info().type == pafs.FileType.Directory)

    def mtime(self) -> float:
        """When the file was last written, epoch seconds; 0.0 when it is missing or the store
        does not say."""
        info = self._info()
        if info.type == pafs.FileType.NotFound or info.mtime is None:
            return 0.0
        return float(info.mtime.timestamp())

    def iterdir(self) -> list[Location]:
        """The entries directly below this location, sorted by name; empty when it is absent."""
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        names = sorted(info.base_name for info in self.filesystem.get_file_info(selector))
        return [self.child(name) for name in names]

    def mkdir(self) -> None:
        """Create the directory and its parents (object stores need none: a no-op there)."""
        if self.is_local:
            self.filesystem.create_dir(self.path, recursive=True)

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as stream:
            return bytes(stream.readall())

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Write the file whole, so that a reader sees the old content or the new, never a
        part: locally a temporary file beside it, fsynced and renamed into place (parents
        created); on an object store one PUT."""
        if not self.is_local:
            with self.filesystem.open_output_stream(self.path) as stream:
                stream.write(data)
            return
        target = Path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_durably(target, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def upload(self, directory: Path) -> None:
        """Copy the local `directory`'s files (recursively) to this location, replacing
        files of the same name and leaving others in place."""
        if self.is_local:
            shutil.copytree(directory, self.path, dirs_exist_ok=True)
            return
        pafs.copy_files(
            str(directory),
            self.path,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.filesystem,
        )


def object_store_settings(
    config: ObjectStoreConfig | None = None, environ: Mapping[str, str] | None = None
) -> ObjectStoreConfig:
    """`config` with every unset field taken from the standard AWS environment variables.

    Resolve this once on a job's driver and hand the result to its tasks: a task on another
    node then reaches the same store whatever that node's environment holds."""
    config = config or ObjectStoreConfig()
    env = os.environ if environ is None else environ
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    secret = env.get("AWS_SECRET_ACCESS_KEY")
    filled = {
        "endpoint_url": config.endpoint_url or env.get("AWS_ENDPOINT_URL") or None,
        "region": config.region or region or DEFAULT_REGION,
        "access_key_id": config.access_key_id or env.get("AWS_ACCESS_KEY_ID") or None,
        "secret_access_key": config.secret_access_key or secret or None,
    }
    return ObjectStoreConfig.model_validate(config.model_dump() | filled)


def s3_filesystem(config: ObjectStoreConfig) -> pafs.S3FileSystem:
    """An S3 filesystem for `config` as is (see `object_store_settings` for the environment)."""
    endpoint: dict[str, str] = {}
    if config.endpoint_url:
        url = urlsplit(config.endpoint_url)
        endpoint = {"endpoint_override": url.netloc, "scheme": url.scheme}
    secret = config.secret_access_key.get_secret_value() if config.secret_access_key else None
    return pafs.S3FileSystem(
        access_key=config.access_key_id,
        secret_key=secret,
        region=config.region or DEFAULT_REGION,
        connect_timeout=config.connect_timeout_s,
        request_timeout=config.request_timeout_s,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=_REQUEST_ATTEMPTS),
        allow_bucket_creation=False,
        allow_bucket_deletion=False,
        **endpoint,
    )


def as_location(
    location: Location | str | Path, config: ObjectStoreConfig | None = None
) -> Location:
    """`location` as is when it is already resolved, else `resolve`d without a probe."""
    if isinstance(location, Location):
        return location
    return resolve(location, config, probe=False)


def resolve(
    location: str | Path, config: ObjectStoreConfig | None = None, *, probe: bool = True
) -> Location:
    """The filesystem and path of `location` (see the module's rules). A remote one is probed
    unless `probe` is False; StorageError when it cannot be used."""
    text = str(location)
    if not text:
        raise StorageError("a storage location is empty")
    local = local_path(text)
    if local is not None:
        path = local.expanduser().absolute()
        return Location(str(path), pafs.LocalFileSystem(), str(path))
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise StorageError(
            f"{text!r}: unknown storage scheme {scheme!r}; a location is a local path or a "
            f"URI with one of {', '.join(s + '://' for s in SCHEMES)}"
        )
    bucket_and_prefix = rest.strip("/")
    if not bucket_and_prefix:
        raise StorageError(f"{text!r} names no bucket")
    uri = f"{scheme}://{bucket_and_prefix}"
    filesystem: pafs.FileSystem
    if scheme == "s3":
        filesystem = s3_filesystem(object_store_settings(config))
    else:
        try:
            filesystem, _ = pafs.FileSystem.from_uri(uri)
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot open {uri!r}: {_first_line(exc)}") from exc
    resolved = Location(uri, filesystem, bucket_and_prefix)
    if probe:
        endpoint = "Google Cloud Storage"
        if scheme == "s3":
            endpoint = object_store_settings(config).endpoint_url or "AWS S3"
        _probe(resolved, bucket_and_prefix.split("/", 1)[0], endpoint)
    return resolved


def _probe(location: Location, bucket: str, endpoint: str) -> None:
    try:
        info = location.filesystem.get_file_info(bucket)
    except OSError as exc:
        raise StorageError(
            f"cannot reach {location.uri!r} at {endpoint}: {_first_line(exc)}"
        ) from exc
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{location.uri!r}: bucket {bucket!r} does not exist")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
