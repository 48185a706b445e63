"""API clients of POST /token: ids, scrypt-hashed secrets and scopes, kept in a YAML file.

File format (written by `python -m serve.api.tokens add-client`, mode 0600)::

    clients:
      - client_id: dev
        secret_hash: scrypt$16384$8$1$<salt b64>$<hash b64>
        scopes: [signals:read, signals:predict]

Only hashes are stored; a secret is shown once, when it is generated.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serve.api.auth import AuthError

log = logging.getLogger(__name__)

# scrypt cost: 16 MiB of memory and ~50 ms per hash; POST /token is rare (tokens are reused
# for their lifetime) so this is affordable for us and expensive for an offline attacker.
SCRYPT_N: Final = 2**14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
SALT_BYTES: Final = 16
HASH_BYTES: Final = 32
# Bounds on parameters read back from the file, so a damaged or hostile entry cannot make
# every login allocate gigabytes.
_MAX_N: Final = 2**20
_MAX_R: Final = 32
_MAX_P: Final = 16
MAX_SECRET_CHARS: Final = 1024
"""Longer presented secrets are rejected without hashing (ours are 43 characters)."""

_INVALID_CLIENT_DETAIL: Final = "unknown client id or wrong client secret"


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    # OpenSSL's own accounting of scrypt memory (128*r*(n+p+2) bytes) plus slack; Python's
    # default 32 MiB limit would reject the larger parameters a file may legitimately hold.
    maxmem = 128 * r * (n + p + 2) + 2**20
    return hashlib.scrypt(
        secret.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=maxmem
    )


def hash_secret(secret: str) -> str:
    """Hash a client secret: "scrypt$n$r$p$salt_b64$hash_b64" with a random 16-byte salt."""
    salt = os.urandom(SALT_BYTES)
    digest = _scrypt(secret, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, HASH_BYTES)
    return "$".join(
        (
            "scrypt",
            str(SCRYPT_N),
            str(SCRYPT_R),
            str(SCRYPT_P),
            base64.b64encode(salt).decode("ascii"),
            base64.b64encode(digest).decode("ascii"),
        )
    )


def verify_secret(secret: str, encoded: str) -> bool:
    """Whether `secret` matches `encoded` (from `hash_secret`); constant-time comparison.
    A malformed `encoded` never matches."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return False
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt = base64.b64decode(parts[4], validate=True)
        expected = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error):
        return False
    # n must be a power of two > 1 for scrypt.
    if not (1 < n <= _MAX_N and n & (n - 1) == 0 and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        return False
    if not salt or not 16 <= len(expected) <= 64:
        return False
    actual = _scrypt(secret, salt, n, r, p, len(expected))
    return hmac.compare_digest(actual, expected)


# Verified against for unknown client ids so they cost what a known id costs (one scrypt of
# the same parameters: the response time must not reveal which ids exist). A fixed string, not
# a hash made on first use, which would make the first unknown id cost two scrypts. Whether a
# secret matches it is irrelevant: an unknown id is refused either way.
_DUMMY_HASH: Final = "$".join(
    (
        "scrypt",
        str(SCRYPT_N),
        str(SCRYPT_R),
        str(SCRYPT_P),
        base64.b64encode(bytes(SALT_BYTES)).decode("ascii"),
        base64.b64encode(bytes(HASH_BYTES)).decode("ascii"),
    )
)


class ClientEntry(BaseModel):
    """One API client. `scopes` are what its tokens may carry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Ids end up in logs and token `sub` claims: keep them to a plain, printable alphabet.
    client_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._@:-]+$")
    secret_hash: str = Field(min_length=1)
    scopes: list[str] = Field(default_factory=list)

    @field_validator("scopes")
    @classmethod
    def _scope_names(cls, scopes: list[str]) -> list[str]:
        for name in scopes:
            if not name or any(ch.isspace() for ch in name):
                raise ValueError(f"invalid scope {name!r}: must be non-empty, no whitespace")
        return scopes


class _ClientsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clients: list[ClientEntry] = Field(default_factory=list)


class ClientStore:
    """The registered API clients, optionally backed by a YAML file that `add` rewrites.

    Reads are lock-free dictionary lookups; `add` is serialised by a lock and swaps in a new
    mapping, so concurrent `authenticate` calls see either the old or the new set.
    """

    def __init__(self, clients: Iterable[ClientEntry] = (), path: str | Path | None = None):
        self._path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        by_id: dict[str, ClientEntry] = {}
        for entry in clients:
            if entry.client_id in by_id:
                raise ValueError(f"duplicate client id {entry.client_id!r}")
            by_id[entry.client_id] = entry
        self._clients = by_id

    @classmethod
    def load(cls, path: str | Path) -> ClientStore:
        """Read the clients file. A missing file means no clients (logged as a warning, since
        every POST /token will then fail)."""
        file = Path(path)
        if not file.exists():
            log.warning(
                "clients file %s not found: no API clients (add one with "
                "`python -m serve.api.tokens add-client`)",
                file,
            )
            return cls(path=file)
        with open(file, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
        try:
            parsed = _ClientsFile.model_validate(data)
        except ValidationError as exc:
            # Pydantic echoes input values in its message, and those include secret hashes.
            raise ValueError(f"{file}: invalid clients file: {_describe(exc)}") from None
        log.info("loaded %d API client(s) from %s", len(parsed.clients), file)
        return cls(parsed.clients, path=file)

    @property
    def path(self) -> Path | None:
        return self._path

    def __len__(self) -> int:
        return len(self._clients)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._clients

    def client_ids(self) -> list[str]:
        return sorted(self._clients)

    def authenticate(self, client_id: str, secret: str) -> ClientEntry:
        """The client whose id and secret these are; else `AuthError(401, "invalid_client")`.
        Unknown ids cost one scrypt too, and the error does not say which part was wrong."""
        entry = self._clients.get(client_id)
        if len(secret) > MAX_SECRET_CHARS:
            # No hashing of attacker-sized input; length is not secret, so this leaks nothing.
            raise AuthError(401, "invalid_client", _INVALID_CLIENT_DETAIL)
        encoded = entry.secret_hash if entry is not None else _DUMMY_HASH
        matches = verify_secret(secret, encoded)
        if entry is None or not matches:
            raise AuthError(401, "invalid_client", _INVALID_CLIENT_DETAIL)
        return entry

    def add(self, client_id: str, scopes: Iterable[str]) -> str:
        """Register a client with a new random secret and save the file (atomically, mode
        0600). Returns the secret: it is not stored and cannot be shown again."""
        if self._path is None:
            raise ValueError("this client store has no file to save to")
        secret = secrets.token_urlsafe(32)
        try:
            entry = ClientEntry(
                client_id=client_id, secret_hash=hash_secret(secret), scopes=sorted(set(scopes))
            )
        except ValidationError as exc:
            raise ValueError(f"invalid client: {_describe(exc)}") from None
        with self._lock:
            if client_id in self._clients:
                raise ValueError(f"client {client_id!r} already exists")
            clients = {**self._clients, client_id: entry}
            _write_atomic(self._path, _dump(clients.values()))
            self._clients = clients
        log.info("added API client %s with scopes %s to %s", client_id, entry.scopes, self._path)
        return secret


def _describe(exc: ValidationError) -> str:
    """Pydantic's errors without the input values, which may include secret hashes."""
    return "; ".join(
        f"{'.'.join(str(part) for part in err['loc'])}: {err['msg']}" for err in exc.errors()
    )


def _dump(clients: Iterable[ClientEntry]) -> str:
    data = {"clients": [entry.model_dump() for entry in clients]}
    return yaml.safe_dump(data, sort_keys=False)


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory and rename it over `path`, so a
    crash never leaves a truncated file; mkstemp creates it 0600 and that mode is kept."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
