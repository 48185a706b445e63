"""API clients and revoked tokens, kept in one YAML file that every ingress replica follows.

File format (written by `python -m serve.api.tokens`, atomically, mode 0600)::

    clients:
      - client_id: dev
        secret_hash: scrypt$16384$8$1$<salt b64>$<hash b64>
        scopes: [signals:read, signals:predict]
        disabled: false
    revoked_tokens:
      - jti: 9f86d081884c7d659a2feaa0c55ad015
        expires_at: 1767225600

Only hashes are stored; a secret is shown once, when it is generated. A bearer token is
accepted only while its `sub` names a client of the file that is not `disabled` and its `jti`
is not in `revoked_tokens`. A revoked entry is kept until its token can no longer be accepted
(`expires_at` plus the largest JWT leeway) and dropped at the next write.

Replicas re-read the file when it changes: each checks its mtime, size and inode at most once
per `reload_interval_s` and swaps in the new contents whole. A file that turns invalid keeps the
last good contents (logged as an error); a file that disappears means no clients, so every token
and every POST /token is refused until it is back (logged as an error).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from configs.schema import MAX_JWT_LEEWAY_S
from market.files import exclusive_lock, write_durably
from serve.api.auth import AuthError, Claims

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
# Seconds between the extra checks of the file a client not known yet triggers (see
# ClientStore._lookup): short, so a client another replica has just added is accepted at once,
# but bounded, so a stream of unknown ids or removed clients' tokens costs at most 10 stats/s.
UNKNOWN_CLIENT_CHECK_S: Final = 0.1

CLIENT_ID_PATTERN: Final = r"^[A-Za-z0-9._@:-]+$"


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
    """One API client. `scopes` are what its tokens may carry; a `disabled` client gets no
    token from POST /token and the tokens it holds are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Ids end up in logs and token `sub` claims: keep them to a plain, printable alphabet.
    client_id: str = Field(min_length=1, max_length=128, pattern=CLIENT_ID_PATTERN)
    secret_hash: str = Field(min_length=1)
    scopes: list[str] = Field(default_factory=list)
    disabled: bool = False

    @field_validator("scopes")
    @classmethod
    def _scope_names(cls, scopes: list[str]) -> list[str]:
        for name in scopes:
            if not name or any(ch.isspace() for ch in name):
                raise ValueError(f"invalid scope {name!r}: must be non-empty, no whitespace")
        return scopes


class RevokedToken(BaseModel):
    """One revoked token: its `jti` and until when (epoch seconds) the entry must be kept."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    jti: str = Field(min_length=1, max_length=256)
    expires_at: int


class _ClientsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clients: list[ClientEntry] = Field(default_factory=list)
    revoked_tokens: list[RevokedToken] = Field(default_factory=list)


FileSignature = tuple[int, int, int, int]
"""(device, inode, mtime in ns, size) of the clients file: an atomic rewrite changes the inode,
an in-place edit the mtime or size."""


@dataclass(frozen=True)
class _Contents:
    """One consistent reading of the clients file, swapped in whole. `signature` is None when
    the contents did not come from a file (built in memory, or the file is absent)."""

    clients: Mapping[str, ClientEntry]
    revoked: Mapping[str, int]  # jti -> expires_at (epoch seconds)
    signature: FileSignature | None = None


_EMPTY: Final = _Contents({}, {})


def _by_id(clients: Iterable[ClientEntry]) -> dict[str, ClientEntry]:
    by_id: dict[str, ClientEntry] = {}
    for entry in clients:
        if entry.client_id in by_id:
            raise ValueError(f"duplicate client id {entry.client_id!r}")
        by_id[entry.client_id] = entry
    return by_id


class ClientStore:
    """The registered API clients and revoked tokens, optionally backed by a YAML file.

    Requests read an immutable `_Contents` held in one attribute: lookups are lock-free and a
    reload or a write swaps in a new one, so concurrent requests see either the old or the new
    file, never a mix. With a file, `refresh` (called by `authenticate` and `check_token`)
    re-reads it when it has changed, checking at most once per `reload_interval_s` of `clock`
    (monotonic seconds). Writes (`add`, `remove`, `set_disabled`, `revoke`) re-read the file
    under an exclusive lock, apply the change, prune revoked entries whose tokens have expired
    by `wall_clock` (epoch seconds) and replace the file atomically, so operators running the
    CLI on one node do not lose each other's changes.
    """

    def __init__(
        self,
        clients: Iterable[ClientEntry] = (),
        path: str | Path | None = None,
        *,
        revoked: Iterable[RevokedToken] = (),
        reload_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if reload_interval_s < 0:
            raise ValueError(f"reload_interval_s must be >= 0, got {reload_interval_s}")
        self._path = Path(path) if path is not None else None
        # Serialises writes and reloads of this store; requests never wait on it.
        self._lock = threading.Lock()
        self._contents = _Contents(_by_id(clients), {r.jti: r.expires_at for r in revoked})
        self._reload_interval_s = reload_interval_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._next_check = clock()
        self._last_check = -math.inf
        # The signature of a file found invalid: not re-read (nor re-logged) until it changes.
        self._rejected: FileSignature | None = None

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        reload_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> ClientStore:
        """Read the clients file. A missing file means no clients (logged as a warning, since
        every POST /token will then fail); an invalid one raises ValueError."""
        file = Path(path)
        store = cls(
            path=file, reload_interval_s=reload_interval_s, clock=clock, wall_clock=wall_clock
        )
        contents = _read(file)
        if contents is None:
            log.warning(
                "clients file %s not found: no API clients (add one with "
                "`python -m serve.api.tokens add-client`)",
                file,
            )
            return store
        store._contents = contents
        log.info("loaded %s from %s", _summary(contents), file)
        return store

    @property
    def path(self) -> Path | None:
        return self._path

    def __len__(self) -> int:
        return len(self._contents.clients)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._contents.clients

    def client_ids(self) -> list[str]:
        return sorted(self._contents.clients)

    def get(self, client_id: str) -> ClientEntry | None:
        """The client `client_id` as last read, disabled or not; None if there is none."""
        return self._contents.clients.get(client_id)

    def revoked_token_ids(self) -> dict[str, int]:
        """Revoked `jti`s and until when (epoch seconds) each entry is kept, as last read."""
        return dict(self._contents.revoked)

    def authenticate(self, client_id: str, secret: str) -> ClientEntry:
        """The enabled client whose id and secret these are; else
        `AuthError(401, "invalid_client")`. Unknown ids and disabled clients cost one scrypt
        too, and the error does not say what was wrong."""
        entry = self._lookup(client_id)
        if len(secret) > MAX_SECRET_CHARS:
            # No hashing of attacker-sized input; length is not secret, so this leaks nothing.
            raise AuthError(401, "invalid_client", _INVALID_CLIENT_DETAIL)
        encoded = entry.secret_hash if entry is not None else _DUMMY_HASH
        matches = verify_secret(secret, encoded)
        if entry is None or not matches:
            raise AuthError(401, "invalid_client", _INVALID_CLIENT_DETAIL)
        if entry.disabled:
            log.info("refused a token to disabled API client %s", client_id)
            raise AuthError(401, "invalid_client", _INVALID_CLIENT_DETAIL)
        return entry

    def check_token(self, claims: Claims) -> None:
        """Refuse a verified token whose client is no longer registered or is disabled, or
        whose `jti` is revoked: `AuthError(401, "revoked_token")`. Two dictionary lookups, plus
        one stat of the file per reload interval (more often for a client not known yet)."""
        entry = self._lookup(claims.subject)
        contents = self._contents
        if entry is None or entry.disabled:
            raise AuthError(401, "revoked_token", "the token's client has been removed or disabled")
        if claims.token_id is not None and claims.token_id in contents.revoked:
            raise AuthError(401, "revoked_token", "the token has been revoked")

    def _lookup(self, client_id: str) -> ClientEntry | None:
        """The entry of `client_id` after `refresh`; a client not known yet gets the file checked
        again `soon`. Another replica sharing the file may have just added the client (and
        issued it a token): without that check this replica would refuse the client for up to
        a reload interval."""
        self.refresh()
        entry = self._contents.clients.get(client_id)
        if entry is None:
            self.refresh(soon=True)
            entry = self._contents.clients.get(client_id)
        return entry

    def refresh(self, soon: bool = False) -> None:
        """Re-read the file if it changed since it was last read; at most one check (a stat)
        per reload interval, or with `soon` one per UNKNOWN_CLIENT_CHECK_S (0.1 s; the interval
        if shorter). Never raises: an unreadable or invalid file keeps the last good contents
        and is logged as an error, an absent file means no clients."""
        if self._path is None:
            return
        if soon:
            due = self._last_check + min(self._reload_interval_s, UNKNOWN_CLIENT_CHECK_S)
        else:
            due = self._next_check
        if self._clock() < due:
            return
        # One thread checks; requests arriving meanwhile go on with the current contents.
        if not self._lock.acquire(blocking=False):
            return
        try:
            checked_at = self._clock()
            if checked_at < due:
                return
            self._last_check = checked_at
            self._next_check = checked_at + self._reload_interval_s
            self._reload(self._path)
        finally:
            self._lock.release()

    def _reload(self, path: Path) -> None:
        current = self._contents
        try:
            signature = _signature(os.stat(path))
        except FileNotFoundError:
            self._file_gone(path)
            return
        except OSError as exc:
            log.error(
                "cannot stat clients file %s (%s); keeping the last good %s",
                path,
                exc.strerror,
                _summary(current),
            )
            return
        if signature in (current.signature, self._rejected):
            return
        try:
            contents = _read(path)
        except (OSError, ValueError) as exc:
            self._rejected = signature
            log.error(
                "cannot reload clients file %s; keeping the last good %s: %s",
                path,
                _summary(current),
                exc,
            )
            return
        if contents is None:
            self._file_gone(path)
            return
        self._rejected = None
        self._contents = contents
        log.info("reloaded %s from %s", _summary(contents), path)

    def _file_gone(self, path: Path) -> None:
        # Failing closed: the file is the list of who may call, and its removal is read as
        # "nobody" rather than as "whoever was allowed before".
        if self._contents.signature is not None or self._contents.clients:
            log.error(
                "clients file %s has disappeared: no API clients until it is restored; "
                "every token and POST /token is refused",
                path,
            )
        self._contents = _EMPTY
        self._rejected = None

    def add(self, client_id: str, scopes: Iterable[str]) -> str:
        """Register a client with a new random secret and save the file (atomically, mode
        0600). Returns the secret: it is not stored and cannot be shown again."""
        self._require_path()
        secret = secrets.token_urlsafe(32)
        try:
            entry = ClientEntry(
                client_id=client_id, secret_hash=hash_secret(secret), scopes=sorted(set(scopes))
            )
        except ValidationError as exc:
            raise ValueError(f"invalid client: {_describe(exc)}") from None

        def change(clients: dict[str, ClientEntry], _: dict[str, int]) -> None:
            if client_id in clients:
                raise ValueError(f"client {client_id!r} already exists")
            clients[client_id] = entry

        self._update(change)
        log.info("added API client %s with scopes %s to %s", client_id, entry.scopes, self._path)
        return secret

    def remove(self, client_id: str) -> None:
        """Delete a client: its secret stops working and every token it holds is refused."""

        def change(clients: dict[str, ClientEntry], _: dict[str, int]) -> None:
            if clients.pop(client_id, None) is None:
                raise ValueError(f"no client {client_id!r}")

        self._update(change)
        log.info("removed API client %s from %s", client_id, self._path)

    def set_disabled(self, client_id: str, disabled: bool) -> None:
        """Disable a client (no new tokens, its tokens refused) or enable it again (the
        tokens it holds that have not expired or been revoked work again)."""

        def change(clients: dict[str, ClientEntry], _: dict[str, int]) -> None:
            entry = clients.get(client_id)
            if entry is None:
                raise ValueError(f"no client {client_id!r}")
            clients[client_id] = entry.model_copy(update={"disabled": disabled})

        self._update(change)
        state = "disabled" if disabled else "enabled"
        log.info("%s API client %s in %s", state, client_id, self._path)

    def revoke(self, token_id: str, expires_at: int) -> None:
        """Revoke the token whose `jti` is `token_id`. `expires_at` (epoch seconds) is its
        `exp`, or any later time: the entry is kept until then (plus the largest leeway)."""
        try:
            revoked = RevokedToken(jti=token_id, expires_at=expires_at)
        except ValidationError as exc:
            raise ValueError(f"invalid token id: {_describe(exc)}") from None

        def change(_: dict[str, ClientEntry], tokens: dict[str, int]) -> None:
            tokens[revoked.jti] = max(revoked.expires_at, tokens.get(revoked.jti, 0))

        self._update(change)
        log.info("revoked token %s (kept until %d) in %s", token_id, expires_at, self._path)

    def _require_path(self) -> Path:
        if self._path is None:
            raise ValueError("this client store has no file to save to")
        return self._path

    def _update(self, change: Callable[[dict[str, ClientEntry], dict[str, int]], None]) -> None:
        """Apply `change` to the file's current clients and revoked tokens (mutable copies;
        it raises ValueError to refuse) and write the result, under a lock held across the
        read and the write."""
        path = self._require_path()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The lock file beside it, so that concurrent writers on this node do not lose each
        # other's changes between the read and the write.
        with self._lock, exclusive_lock(path.parent / f".{path.name}.lock"):
            current = _read(path) or _EMPTY
            clients = dict(current.clients)
            revoked = dict(current.revoked)
            change(clients, revoked)
            # Past `expires_at` plus the largest leeway no verifier accepts the token anyway.
            horizon = self._wall_clock() - MAX_JWT_LEEWAY_S
            kept = {jti: until for jti, until in revoked.items() if until >= horizon}
            # Atomic (readers see the old file or the new one), 0600: it holds secret hashes.
            write_durably(path, _dump(clients.values(), kept), mode=0o600)
            self._contents = _read(path) or _EMPTY
            self._rejected = None


def _signature(info: os.stat_result) -> FileSignature:
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


def _read(path: Path) -> _Contents | None:
    """The file's contents, None if it does not exist; ValueError if it is invalid (with a
    message that never holds the file's values: they include secret hashes)."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below; fstat needs the descriptor
    except FileNotFoundError:
        return None
    with handle:
        # The signature of the file actually read, not of whatever the path names by now.
        signature = _signature(os.fstat(handle.fileno()))
        raw = handle.read()
    try:
        data = yaml.safe_load(raw.decode("utf-8")) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ValueError(f"{path}: invalid clients file: not UTF-8 YAML{where}") from None
    try:
        parsed = _ClientsFile.model_validate(data)
    except ValidationError as exc:
        # Pydantic echoes input values in its message, and those include secret hashes.
        raise ValueError(f"{path}: invalid clients file: {_describe(exc)}") from None
    revoked: dict[str, int] = {}
    for token in parsed.revoked_tokens:
        revoked[token.jti] = max(token.expires_at, revoked.get(token.jti, token.expires_at))
    return _Contents(_by_id(parsed.clients), revoked, signature)


def _summary(contents: _Contents) -> str:
    disabled = sum(entry.disabled for entry in contents.clients.values())
    return (
        f"{len(contents.clients)} API client(s) ({disabled} disabled) and "
        f"{len(contents.revoked)} revoked token(s)"
    )


def _describe(exc: ValidationError) -> str:
    """Pydantic's errors without the input values, which may include secret hashes."""
    return "; ".join(
        f"{'.'.join(str(part) for part in err['loc'])}: {err['msg']}" for err in exc.errors()
    )


def _dump(clients: Iterable[ClientEntry], revoked: Mapping[str, int]) -> str:
    data = {
        "clients": [entry.model_dump() for entry in clients],
        "revoked_tokens": [
            {"jti": jti, "expires_at": until} for jti, until in sorted(revoked.items())
        ],
    }
    return yaml.safe_dump(data, sort_keys=False)
