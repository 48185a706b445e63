"""Filesystem model registry: immutable numbered versions and audited aliases.

The registry lives under one root, a local directory (relative paths are made absolute) or a
`file://`, `s3://` or `gs://` URI, resolved and probed by `market.storage` (an `s3://` endpoint
and credentials from an `ObjectStoreConfig`, every unset field from the standard AWS
environment):

    <root>/<name>/versions/v0001/<file>...          the version's files (weights, config, scaler)
    <root>/<name>/versions/v0001/metadata.json      written last: its presence commits the version
    <root>/<name>/aliases/production.json           current version + every move of the alias
    <root>/<name>/aliases/.production.lock          local filesystems only: serialises alias moves
    <root>/<name>/claims/v0001/<token>              object stores only: version-number claims

`metadata.json` holds what the caller registered (model config, feature-spec hash, training data
range, seed, metrics, ...) plus what the registry adds: `name`, `version`, `created_at` (ISO UTC),
`files` (size and sha256 of each file) and, unless the caller gave one, `git_commit` (the code's
commit, see `current_git_commit`). `read_file` checks a file against its size and sha256.

Guarantees:

* Version ids `v0001`, `v0002`, ... are never handed out twice. On a local filesystem a number is
  claimed with `mkdir`, which atomically fails when the directory exists, so concurrent
  registrations in any number of processes (or hosts sharing a POSIX filesystem) get distinct
  ids. Object stores have no exclusive create in `pyarrow.fs`, so there a writer puts a uniquely
  named claim object under `claims/<version>/` and then lists that prefix: it owns the number
  only if its claim is the sole one, otherwise it withdraws and tries the next number. Two
  writers cannot both see themselves alone, provided listing is strongly consistent (true of S3
  since 2020 and of GCS); on a store with eventually consistent listing two writers could claim
  the same number. Local and object-store writers must not share a registry concurrently.
  Ids are unique and increasing but not gap-free: a crashed registration, or on object stores
  a claim withdrawn after a tie, leaves its number unused.
* A version is visible only once complete: files are written (and, locally, fsynced) first and
  `metadata.json` last, atomically (temp file + rename locally, one PUT on object stores).
  Readers ignore a version directory without it, e.g. one left by a crashed registration; its
  number is simply skipped.
* Versions are immutable: `register` always allocates a new id and never writes into an
  existing version.
* An alias file is replaced atomically (temp + rename locally, one PUT on object stores), and
  only ever points at a complete version, so a serve replica polling `get_alias` always reads
  one consistent version id with a single small read. Locally, moves are serialised with
  `flock`, so concurrent moves never lose a history entry; on object stores concurrent moves
  of the same alias are last-writer-wins (moves are rare, operator- or gate-driven events).

Rollback treats an alias's history as an undo stack: every move other than a rollback pushes its
version, a rollback pops one. Rolling back therefore returns to the version the alias pointed at
before the current one, and rolling back a rollback goes one further step back (like pressing
undo twice) rather than redoing; redo is a `promote`. Promoting after rollbacks pushes on top of
what remains: promote v1, v2, v3, rollback (v2), promote v4, rollback gives v2 again.

CLI: `python -m models.registry --registry URI [--name signal] {list,show,promote,rollback}`.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import getpass
import hashlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from configs.schema import ObjectStoreConfig
from market.files import exclusive_lock, write_bytes_durably
from market.storage import StorageError, is_uri, resolve

PRODUCTION = "production"
METADATA_FILE = "metadata.json"
RESERVED_METADATA_KEYS = frozenset({"name", "version", "created_at", "files"})
ACTIONS = frozenset({"set", "override", "rollback"})

_VERSION = re.compile(r"^v(\d{4,})$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_CLAIM_ATTEMPTS = 200
_GIT_TIMEOUT_S = 10.0


class RegistryError(Exception):
    """A registry operation cannot be done: unknown version or alias, bad input, corrupt file."""


def version_id(number: int) -> str:
    """The version id of a version number: 1 -> `v0001` (more digits past 9999)."""
    return f"v{number:04d}"


def version_number(version: str) -> int | None:
    """The number of a version id (`v0012` -> 12), or None when `version` is not one."""
    match = _VERSION.match(version)
    return int(match.group(1)) if match else None


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _operator() -> str:
    """Who makes a change, as `user@host`, for the alias history."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        # Containers often run as a uid with no passwd entry and no USER variable.
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _SAFE_NAME.match(value):
        raise RegistryError(
            f"invalid {kind} {value!r}: use letters, digits, '.', '_' and '-', starting with a "
            "letter or digit (at most 128 characters)"
        )
    return value


def _dumps(document: Mapping[str, Any], what: str) -> bytes:
    try:
        # Strict JSON (no NaN/Infinity) so any JSON reader, not only Python's, can parse it.
        text = json.dumps(document, sort_keys=True, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RegistryError(
            f"{what} is not JSON-serialisable ({exc}); NaN and infinities are not allowed"
        ) from exc
    return text.encode("utf-8") + b"\n"


def _loads(data: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{what} is corrupt: {exc}") from exc
    if not isinstance(document, dict):
        raise RegistryError(f"{what} is corrupt: expected a JSON object")
    return document


class _Store(abc.ABC):
    """Byte-level access to the registry root; paths are '/'-separated and relative to it."""

    @abc.abstractmethod
    def exists(self, path: str = "") -> bool:
        """Whether `path` (a file or directory; "" is the root) exists."""

    @abc.abstractmethod
    def read(self, path: str) -> bytes:
        """The bytes of a file; FileNotFoundError when it is absent."""

    @abc.abstractmethod
    def write(self, path: str, data: bytes) -> None:
        """Write a file that nobody reads yet (a file of an uncommitted version)."""

    @abc.abstractmethod
    def write_atomic(self, path: str, data: bytes) -> None:
        """Write or replace a file so readers see either the old or the new content, whole."""

    @abc.abstractmethod
    def children(self, path: str) -> list[str]:
        """The names directly under a directory; empty when it is absent."""

    @abc.abstractmethod
    def claim_version(self, versions_dir: str, claims_dir: str) -> str:
        """Allocate a version id no other writer gets; its directory may now be written."""

    @abc.abstractmethod
    def locked(self, path: str) -> contextlib.AbstractContextManager[None]:
        """A lock held around an alias's read-modify-write, where the filesystem has one."""

    def highest_number(self, *dirs: str) -> int:
        numbers = [
            number
            for directory in dirs
            for child in self.children(directory)
            if (number := version_number(child)) is not None
        ]
        return max(numbers, default=0)


class _LocalStore(_Store):
    """A local (or POSIX network) filesystem: mkdir claims, rename commits, flock serialises."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, path: str) -> Path:
        return self.root / path if path else self.root

    def exists(self, path: str = "") -> bool:
        return self._path(path).exists()

    def read(self, path: str) -> bytes:
        return self._path(path).read_bytes()

    def write(self, path: str, data: bytes) -> None:
        target = self._path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as handle:
            handle.write(data)
            handle.flush()
            # Durable before metadata.json commits the version, so a power cut cannot leave a
            # committed version whose files are empty.
            os.fsync(handle.fileno())

    def write_atomic(self, path: str, data: bytes) -> None:
        target = self._path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_durably(target, data)

    def children(self, path: str) -> list[str]:
        try:
            return [entry.name for entry in os.scandir(self._path(path))]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def claim_version(self, versions_dir: str, claims_dir: str) -> str:
        directory = self._path(versions_dir)
        directory.mkdir(parents=True, exist_ok=True)
        number = self.highest_number(versions_dir) + 1
        while True:
            candidate = version_id(number)
            try:
                # mkdir is atomic and exclusive: exactly one concurrent caller creates it.
                (directory / candidate).mkdir()
            except FileExistsError:
                number += 1
                continue
            return candidate

    @contextlib.contextmanager
    def locked(self, path: str) -> Iterator[None]:
        lock_path = self._path(path)
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(lock_path):
            yield


class _ArrowStore(_Store):
    """Any `pyarrow.fs` filesystem, assumed to be an object store: claim objects, single PUTs."""

    def __init__(self, filesystem: Any, root: str) -> None:
        self.filesystem = filesystem
        self.root = root.rstrip("/")

    def _path(self, path: str) -> str:
        if not path:
            return self.root
        return f"{self.root}/{path}" if self.root else path

    def _info(self, path: str) -> Any:
        return self.filesystem.get_file_info(self._path(path))

    def exists(self, path: str = "") -> bool:
        return bool(self._info(path).type != pafs.FileType.NotFound)

    def read(self, path: str) -> bytes:
        try:
            with self.filesystem.open_input_stream(self._path(path)) as stream:
                return bytes(stream.readall())
        except FileNotFoundError:
            raise
        except OSError:
            # Not every filesystem maps "no such object" to FileNotFoundError.
            if not self.exists(path):
                raise FileNotFoundError(self._path(path)) from None
            raise

    def write(self, path: str, data: bytes) -> None:
        full = self._path(path)
        parent = full.rsplit("/", 1)[0] if "/" in full else ""
        if parent:
            self.filesystem.create_dir(parent, recursive=True)
        with self.filesystem.open_output_stream(full) as stream:
            stream.write(data)

    def write_atomic(self, path: str, data: bytes) -> None:
        # An object store PUT (one output stream, committed on close) is atomic.
        self.write(path, data)

    def children(self, path: str) -> list[str]:
        selector = pafs.FileSelector(self._path(path), allow_not_found=True, recursive=False)
        return [info.base_name for info in self.filesystem.get_file_info(selector)]

    def claim_version(self, versions_dir: str, claims_dir: str) -> str:
        token = f"{uuid.uuid4().hex}.claim"
        for attempt in range(_MAX_CLAIM_ATTEMPTS):
            candidate = version_id(self.highest_number(versions_dir, claims_dir) + 1)
            claim = f"{claims_dir}/{candidate}"
            self.write(f"{claim}/{token}", b"")
            # Whoever lists after both claims exist sees both, so at most one writer can find
            # its claim alone; both stepping back on a tie is safe, retrying breaks the tie.
            if self.children(claim) == [token]:
                return candidate
            with contextlib.suppress(OSError):
                self.filesystem.delete_file(self._path(f"{claim}/{token}"))
            time.sleep(random.uniform(0.0, 0.01 * (attempt + 1)))
        raise RegistryError(
            f"could not claim a version number after {_MAX_CLAIM_ATTEMPTS} attempts "
            "(too many concurrent registrations?)"
        )

    @contextlib.contextmanager
    def locked(self, path: str) -> Iterator[None]:
        # No lock primitive on object stores: alias moves there are last-writer-wins.
        yield


def _open_store(
    uri: str, filesystem: Any | None, object_store: ObjectStoreConfig | None = None
) -> tuple[_Store, str]:
    """The store of a registry URI and the URI as reported (local paths made absolute)."""
    if filesystem is not None:
        if isinstance(filesystem, pafs.LocalFileSystem):
            root = Path(uri).absolute()
            return _LocalStore(root), str(root)
        return _ArrowStore(filesystem, uri), uri
    try:
        location = resolve(uri, object_store)
    except StorageError as exc:
        raise RegistryError(f"cannot open registry: {exc}") from exc
    if location.is_local:
        return _LocalStore(location.local_path()), uri if is_uri(uri) else location.uri
    return _ArrowStore(location.filesystem, location.path), uri


class ModelRegistry:
    """Numbered, immutable model versions and audited aliases under one root (see module doc)."""

    def __init__(
        self,
        uri: str,
        *,
        filesystem: Any | None = None,
        object_store: ObjectStoreConfig | None = None,
    ) -> None:
        """Open (without creating) the registry at `uri`.

        `filesystem` is an already configured `pyarrow.fs.FileSystem` (credentials, endpoint);
        `uri` is then the root path inside it. Otherwise an `s3://` registry is reached with
        `object_store`, its unset fields taken from the AWS environment.
        """
        if not uri:
            raise RegistryError("registry URI is empty")
        self._store, self._uri = _open_store(uri, filesystem, object_store)

    @property
    def uri(self) -> str:
        """Where the registry lives; a relative local path is reported as an absolute one."""
        return self._uri

    def exists(self) -> bool:
        """Whether the registry root exists (nothing has been registered when it does not)."""
        return self._store.exists()

    # Versions

    def register(self, name: str, files: Mapping[str, bytes], metadata: Mapping[str, Any]) -> str:
        """Store `files` and `metadata` as a new version of model `name`; returns its id.

        `metadata` must be JSON-serialisable and must not use the keys the registry adds
        (`name`, `version`, `created_at`, `files`). When it has no `git_commit`, the code's
        current commit is recorded.
        """
        _check_name("model name", name)
        if not files:
            raise RegistryError("a version needs at least one file")
        payloads: dict[str, bytes] = {}
        for filename, data in files.items():
            _check_name("file name", filename)
            if filename == METADATA_FILE:
                raise RegistryError(f"file name {METADATA_FILE!r} is reserved for the registry")
            if not isinstance(data, bytes | bytearray | memoryview):
                raise RegistryError(f"file {filename!r} must be bytes, not {type(data).__name__}")
            payloads[filename] = bytes(data)
        clashes = sorted(RESERVED_METADATA_KEYS.intersection(metadata))
        if clashes:
            raise RegistryError(f"metadata keys {clashes} are reserved for the registry")
        document: dict[str, Any] = dict(metadata)
        if "git_commit" not in document:
            document["git_commit"] = current_git_commit()
        document["files"] = {
            filename: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for filename, data in sorted(payloads.items())
        }
        # Serialise before claiming so bad metadata does not burn a version number.
        _dumps(document, "metadata")

        version = self._store.claim_version(f"{name}/versions", f"{name}/claims")
        document["name"] = name
        document["version"] = version
        document["created_at"] = _utc_now()
        directory = f"{name}/versions/{version}"
        for filename, data in payloads.items():
            self._store.write(f"{directory}/{filename}", data)
        self._store.write_atomic(f"{directory}/{METADATA_FILE}", _dumps(document, "metadata"))
        return version

    def versions(self, name: str) -> list[str]:
        """The complete versions of model `name`, oldest first (empty when there are none)."""
        _check_name("model name", name)
        candidates = [
            child
            for child in self._store.children(f"{name}/versions")
            if version_number(child) is not None
        ]
        complete = [
            version
            for version in candidates
            if self._store.exists(f"{name}/versions/{version}/{METADATA_FILE}")
        ]
        return sorted(complete, key=lambda version: version_number(version) or 0)

    def metadata(self, name: str, version: str) -> dict[str, Any]:
        """The metadata of a complete version; RegistryError when there is no such version."""
        _check_name("model name", name)
        if version_number(version) is None:
            raise RegistryError(f"{version!r} is not a version id (expected e.g. v0001)")
        try:
            data = self._store.read(f"{name}/versions/{version}/{METADATA_FILE}")
        except FileNotFoundError:
            raise RegistryError(f"unknown version {version!r} of model {name!r}") from None
        return _loads(data, f"metadata of {name} {version}")

    def read_file(self, name: str, version: str, filename: str) -> bytes:
        """One file of a version, checked against the size and sha256 in its metadata."""
        _check_name("file name", filename)
        entry = self.metadata(name, version).get("files", {}).get(filename)
        if entry is None:
            raise RegistryError(f"version {version} of model {name!r} has no file {filename!r}")
        try:
            data = self._store.read(f"{name}/versions/{version}/{filename}")
        except FileNotFoundError:
            raise RegistryError(
                f"file {filename!r} of {name} {version} is missing from the registry"
            ) from None
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != entry.get("size") or digest != entry.get("sha256"):
            raise RegistryError(
                f"file {filename!r} of {name} {version} is corrupt: expected "
                f"{entry.get('size')} bytes with sha256 {entry.get('sha256')}, found "
                f"{len(data)} bytes with sha256 {digest}"
            )
        return data

    def resolve(self, name: str, ref: str) -> str:
        """The version id `ref` names: a version id as is (if it exists) or an alias's target."""
        if version_number(ref) is not None:
            self.metadata(name, ref)
            return ref
        _check_name("alias", ref)
        version = self.get_alias(name, ref)
        if version is None:
            raise RegistryError(f"unknown version or alias {ref!r} of model {name!r}")
        return version

    # Aliases

    def _alias_path(self, name: str, alias: str) -> str:
        _check_name("model name", name)
        _check_name("alias", alias)
        if version_number(alias) is not None:
            raise RegistryError(f"alias {alias!r} looks like a version id; pick another name")
        return f"{name}/aliases/{alias}.json"

    def _read_alias(self, name: str, alias: str) -> dict[str, Any] | None:
        try:
            data = self._store.read(self._alias_path(name, alias))
        except FileNotFoundError:
            return None
        return _loads(data, f"alias {alias} of {name}")

    def get_alias(self, name: str, alias: str) -> str | None:
        """The version `alias` points at (one small read), or None when it was never set."""
        document = self._read_alias(name, alias)
        return None if document is None else str(document["version"])

    def alias_history(self, name: str, alias: str) -> list[dict[str, Any]]:
        """Every move of `alias`, oldest first: version, previous, action, reason, by, at."""
        document = self._read_alias(name, alias)
        return [] if document is None else list(document.get("history", []))

    def aliases(self, name: str) -> dict[str, str]:
        """Every alias of model `name` and the version it points at."""
        _check_name("model name", name)
        found: dict[str, str] = {}
        for child in sorted(self._store.children(f"{name}/aliases")):
            alias, suffix = child[: -len(".json")], child[-len(".json") :]
            if suffix != ".json" or not _SAFE_NAME.match(alias):
                continue
            version = self.get_alias(name, alias)
            if version is not None:
                found[alias] = version
        return found

    def set_alias(
        self, name: str, alias: str, version: str, reason: str, *, action: str = "set"
    ) -> None:
        """Point `alias` at `version` (which must be complete), recording why in its history.

        `action` labels the move in the history: "set" (e.g. a promotion whose gate passed)
        or "override" (an operator's manual promotion).
        """
        if action not in ACTIONS - {"rollback"}:
            raise RegistryError(f"unknown alias action {action!r}")
        self._move_alias(name, alias, lambda history: version, reason, action)

    def rollback(self, name: str, alias: str = PRODUCTION, reason: str = "rollback") -> str:
        """Move `alias` back to the version it pointed at before the current one.

        History is an undo stack (see the module doc): repeated rollbacks keep stepping back.
        Returns the version the alias now points at; RegistryError when there is nothing to roll
        back to.
        """

        def target(history: list[dict[str, Any]]) -> str:
            stack = _undo_stack(history)
            if len(stack) < 2:
                current = f"only ever pointed at {stack[0]}" if stack else "never been set"
                raise RegistryError(
                    f"nothing to roll back to: alias {alias!r} of model {name!r} has {current}"
                )
            return stack[-2]

        return self._move_alias(name, alias, target, reason, "rollback")

    def _move_alias(
        self,
        name: str,
        alias: str,
        choose: Callable[[list[dict[str, Any]]], str],
        reason: str,
        action: str,
    ) -> str:
        path = self._alias_path(name, alias)
        lock = f"{name}/aliases/.{alias}.lock"
        with self._store.locked(lock):
            document = self._read_alias(name, alias)
            history: list[dict[str, Any]] = [] if document is None else document["history"]
            version: str = choose(history)
            # Only complete versions may be aliased, so a reader never gets a half-written one.
            self.metadata(name, version)
            previous = None if document is None else document["version"]
            now = _utc_now()
            history.append(
                {
                    "version": version,
                    "previous": previous,
                    "action": action,
                    "reason": reason,
                    "by": _operator(),
                    "at": now,
                }
            )
            new_document = {
                "name": name,
                "alias": alias,
                "version": version,
                "updated_at": now,
                "history": history,
            }
            self._store.write_atomic(path, _dumps(new_document, f"alias {alias}"))
        return version


def _undo_stack(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """The versions a rollback can return to, most recent last, replayed from the history."""
    stack: list[str] = []
    for entry in history:
        version = str(entry["version"])
        if entry.get("action") == "rollback" and stack:
            stack.pop()
        # Re-pointing at the current version adds nothing to undo.
        if not stack or stack[-1] != version:
            stack.append(version)
    return stack


def current_git_commit(repo_dir: str | Path | None = None) -> str | None:
    """The HEAD commit of the checkout holding `repo_dir` (default: this code's own checkout).

    A "-dirty" suffix marks uncommitted changes to tracked files (untracked files are ignored).
    None outside a git checkout or when git is not installed.
    """
    directory = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parent
    # Read-only status must not take index.lock and so race a concurrent git command.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*args: str) -> subprocess.CompletedProcess[str] | None:
        try:
            return subprocess.run(
                ["git", "-C", str(directory), *args],
                capture_output=True,
                text=True,
                timeout=_GIT_TIMEOUT_S,
                env=env,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None

    head = git("rev-parse", "--verify", "--quiet", "HEAD")
    if head is None or head.returncode != 0 or not head.stdout.strip():
        return None
    sha = head.stdout.strip()
    status = git("status", "--porcelain", "--untracked-files=no")
    # When cleanliness cannot be established, claim the weaker "dirty".
    if status is None or status.returncode != 0 or status.stdout.strip():
        return f"{sha}-dirty"
    return sha


# CLI


def _key_metrics(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar entries of a version's `metrics` (nested values are left to `show`)."""
    metrics = metadata.get("metrics")
    if not isinstance(metrics, Mapping):
        return {}
    return {
        key: value
        for key, value in metrics.items()
        if value is None or isinstance(value, bool | int | float | str)
    }


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cmd_list(registry: ModelRegistry, name: str, args: argparse.Namespace) -> dict[str, Any]:
    by_version: dict[str, list[str]] = {}
    for alias, version in registry.aliases(name).items():
        by_version.setdefault(version, []).append(alias)
    rows: list[dict[str, Any]] = []
    for version in registry.versions(name):
        metadata = registry.metadata(name, version)
        aliases = by_version.get(version, [])
        metrics = _key_metrics(metadata)
        shown = " ".join(f"{k}={_format_value(v)}" for k, v in sorted(metrics.items()))
        print(f"{version}  {metadata.get('created_at')}  [{','.join(aliases) or '-'}]  {shown}")
        rows.append(
            {
                "version": version,
                "created_at": metadata.get("created_at"),
                "aliases": aliases,
                "metrics": metrics,
            }
        )
    return {"name": name, "versions": rows}


def _cmd_show(registry: ModelRegistry, name: str, args: argparse.Namespace) -> dict[str, Any]:
    return registry.metadata(name, registry.resolve(name, args.ref))


def _cmd_promote(registry: ModelRegistry, name: str, args: argparse.Namespace) -> dict[str, Any]:
    previous = registry.get_alias(name, args.alias)
    registry.set_alias(name, args.alias, args.version, args.reason, action="override")
    return {"name": name, "alias": args.alias, "version": args.version, "previous": previous}


def _cmd_rollback(registry: ModelRegistry, name: str, args: argparse.Namespace) -> dict[str, Any]:
    previous = registry.get_alias(name, args.alias)
    version = registry.rollback(name, args.alias, args.reason)
    return {"name": name, "alias": args.alias, "version": version, "previous": previous}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m models.registry",
        description="Inspect the model registry, promote a version or roll an alias back.",
    )
    parser.add_argument("--registry", required=True, help="registry root: a path or URI")
    parser.add_argument("--name", default="signal", help="model name (default: signal)")
    commands = parser.add_subparsers(dest="command", required=True)

    listing = commands.add_parser("list", help="versions, key metrics and their aliases")
    listing.set_defaults(handler=_cmd_list)

    show = commands.add_parser("show", help="metadata of a version or alias")
    show.add_argument("ref", metavar="VERSION|ALIAS")
    show.set_defaults(handler=_cmd_show)

    promote = commands.add_parser(
        "promote", help="operator override: point an alias at a version, whatever the gate said"
    )
    promote.add_argument("version", metavar="VERSION")
    promote.add_argument("--reason", required=True, help="why (recorded in the alias history)")
    promote.add_argument("--alias", default=PRODUCTION, help="alias to move (default: production)")
    promote.set_defaults(handler=_cmd_promote)

    rollback = commands.add_parser("rollback", help="move an alias back to its previous version")
    rollback.add_argument("--alias", default=PRODUCTION, help="alias to move (default: production)")
    rollback.add_argument("--reason", default="rollback", help="why (recorded in the history)")
    rollback.set_defaults(handler=_cmd_rollback)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the registry CLI; the last line printed is one JSON object. Returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        # argparse exits on --help and on usage errors; a callable main returns instead.
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        registry = ModelRegistry(args.registry)
        if not registry.exists():
            raise RegistryError(f"no registry at {registry.uri}")
        result = args.handler(registry, args.name, args)
    except (RegistryError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
