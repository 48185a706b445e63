"""JWT issuance and verification for the signal API (DESIGN.md §5).

Tokens are short-lived OAuth2-style bearer JWTs: `sub` (the client id), `aud`, `iss`, `iat`,
`nbf`, `exp` (epoch seconds), `scope` (space-separated) and a random `jti` (32 hex digits).
Verification accepts exactly one algorithm, the configured one, so `alg: none` and HS/RS
algorithm confusion are rejected, and no lifetime (`exp - iat`) over `max_ttl_s`. Whether the
token's client is still enabled and its `jti` not revoked is the client store's check
(`serve.api.clients`). Every failure raises `AuthError`, whose `code` labels
`auth_failures_total{reason}` and whose `detail` is safe to return to the caller: it never
contains the token or a key.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, get_args

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from configs.schema import JwtConfig

log = logging.getLogger(__name__)

AuthErrorCode = Literal[
    "missing_token",
    "malformed_header",
    "token_too_large",
    "invalid_token",
    "token_expired",
    "token_not_yet_valid",
    "invalid_audience",
    "invalid_issuer",
    "insufficient_scope",
    "invalid_client",
    "revoked_token",
]
AUTH_ERROR_CODES: Final[tuple[AuthErrorCode, ...]] = get_args(AuthErrorCode)
"""Every `AuthError.code`: pre-register them as metric labels so a zero shows before a failure."""

MIN_HMAC_SECRET_BYTES: Final = 32
"""RFC 7518 §3.2: an HS256 key must be at least as long as the hash output (256 bits)."""
MIN_RSA_KEY_BITS: Final = 2048

# Claims without which a token is rejected. `iss` is enforced separately by passing `issuer`.
_REQUIRED_CLAIMS: Final = ("exp", "iat", "sub", "aud", "scope")


class AuthError(Exception):
    """An authentication (401) or authorisation (403) failure that the API turns into
    `{"error": code, "detail": detail}`. `detail` is written for the caller and never holds the
    token, a secret or a key. Raised as `AuthError(status, code, detail)`; `status` must be
    403 for "insufficient_scope" and 401 for every other code."""

    def __init__(self, status: int, code: AuthErrorCode, detail: str) -> None:
        # The status is implied by the code; checking it catches a mislabelled raise in tests
        # instead of answering 401 where a client should be told 403 (or vice versa).
        expected = 403 if code == "insufficient_scope" else 401
        if code not in AUTH_ERROR_CODES or status != expected:
            raise ValueError(f"AuthError({status}, {code!r}): expected status {expected}")
        super().__init__(f"{code}: {detail}")
        self.status = status
        self.code: AuthErrorCode = code
        self.detail = detail

    @property
    def www_authenticate(self) -> str | None:
        """The RFC 6750 `WWW-Authenticate` header value for this failure, or None (the
        client-credentials failure of POST /token, which is not a bearer-token challenge)."""
        if self.code == "invalid_client":
            return None
        if self.code == "missing_token":
            # RFC 6750 §3.1: a request without credentials gets no error attribute.
            return 'Bearer realm="quant-ai"'
        error = {
            "malformed_header": "invalid_request",
            "insufficient_scope": "insufficient_scope",
        }.get(self.code, "invalid_token")
        return f'Bearer realm="quant-ai", error="{error}"'


class KeyConfigError(RuntimeError):
    """Key material is missing, unreadable or too weak. An operator problem found at start-up
    (or when minting without a private key), never a client's fault: not an `AuthError`."""


@dataclass(frozen=True)
class Claims:
    """The verified identity of a request. Times are epoch seconds (UTC); `token_id` is the
    `jti` claim (None for a token without one, which can only be revoked with its client)."""

    subject: str
    scopes: frozenset[str]
    issued_at: int
    expires_at: int
    token_id: str | None = None


def _validate_scope_names(scopes: Iterable[str]) -> list[str]:
    """Scopes travel space-separated in one claim, so a scope may not contain whitespace."""
    names = sorted(set(scopes))
    for name in names:
        if not name or any(ch.isspace() for ch in name):
            raise ValueError(f"invalid scope name {name!r}: must be non-empty, no whitespace")
    return names


class TokenService:
    """Mints and verifies the API's JWTs with one algorithm (`config.algorithm`).

    HS256 takes `secret` (at least 32 bytes; it both signs and verifies). RS256 takes
    `public_key` (verifies) and optionally `private_key` (signs; without it `mint` raises
    `KeyConfigError`, which suits API replicas that only verify). Keys are PEM bytes or
    `cryptography` key objects; RSA keys must be at least 2048 bits.
    """

    def __init__(
        self,
        config: JwtConfig,
        *,
        secret: bytes | str | None = None,
        public_key: RSAPublicKey | bytes | str | None = None,
        private_key: RSAPrivateKey | bytes | str | None = None,
    ) -> None:
        self._config = config
        self._verify_key: bytes | RSAPublicKey
        self._sign_key: bytes | RSAPrivateKey | None
        if config.algorithm == "HS256":
            if public_key is not None or private_key is not None:
                raise KeyConfigError("HS256 takes a shared secret, not RSA keys")
            if secret is None:
                raise KeyConfigError("HS256 needs a secret")
            raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
            if len(raw) < MIN_HMAC_SECRET_BYTES:
                raise KeyConfigError(
                    f"the HS256 secret is {len(raw)} bytes; at least {MIN_HMAC_SECRET_BYTES} "
                    "are required (generate one with `python -m serve.api.tokens init-dev`)"
                )
            self._verify_key = raw
            self._sign_key = raw
        else:
            if secret is not None:
                raise KeyConfigError("RS256 takes RSA keys, not a shared secret")
            if public_key is None:
                raise KeyConfigError("RS256 needs a public key (jwt.public_key_file)")
            public = _load_public_key(public_key)
            private = _load_private_key(private_key) if private_key is not None else None
            if private is not None and (
                private.public_key().public_numbers() != public.public_numbers()
            ):
                raise KeyConfigError("the RS256 private key does not match the public key")
            self._verify_key = public
            self._sign_key = private

    @classmethod
    def from_config(cls, config: JwtConfig) -> TokenService:
        """Build from `config`, reading key material from the environment or files.

        HS256: the secret comes from env var `secret_env` if set and non-empty, else from
        `secret_file` (surrounding whitespace stripped). RS256: `public_key_file` is required,
        `private_key_file` optional. Relative paths are relative to the working directory.
        Raises `KeyConfigError` with the fix when material is missing or too weak.
        """
        if config.algorithm == "HS256":
            env_value = os.environ.get(config.secret_env)
            if env_value:
                log.info("JWT HS256 secret read from env var %s", config.secret_env)
                return cls(config, secret=env_value.strip())
            if config.secret_file is None:
                raise KeyConfigError(
                    f"no HS256 secret: set env var {config.secret_env} or jwt.secret_file"
                )
            path = Path(config.secret_file)
            if not path.is_file():
                raise KeyConfigError(
                    f"no HS256 secret: env var {config.secret_env} is unset and {path} does "
                    "not exist (create it with `python -m serve.api.tokens init-dev`)"
                )
            _warn_if_readable_by_others(path)
            log.info("JWT HS256 secret read from %s", path)
            return cls(config, secret=_read_bytes(path).strip())

        if config.public_key_file is None:
            raise KeyConfigError("RS256 needs jwt.public_key_file")
        public = _read_bytes(Path(config.public_key_file))
        private = None
        if config.private_key_file is not None:
            private_path = Path(config.private_key_file)
            _warn_if_readable_by_others(private_path)
            private = _read_bytes(private_path)
        log.info(
            "JWT RS256 keys: public %s, private %s",
            config.public_key_file,
            config.private_key_file or "none (verify only)",
        )
        return cls(config, public_key=public, private_key=private)

    @property
    def config(self) -> JwtConfig:
        return self._config

    @property
    def can_mint(self) -> bool:
        """Whether this service holds a signing key."""
        return self._sign_key is not None

    def mint(
        self,
        subject: str,
        scopes: Iterable[str],
        ttl_s: int | None = None,
        now: int | None = None,
    ) -> tuple[str, int]:
        """Sign a token for `subject` with `scopes`, valid for `ttl_s` seconds (default
        `config.token_ttl_s`, at most `config.max_ttl_s`, else ValueError) from `now` (epoch
        seconds, default the current time).

        Returns `(token, expires_in)`, `expires_in` in seconds as in an OAuth2 token response.
        """
        if self._sign_key is None:
            raise KeyConfigError(
                "cannot mint tokens: no RS256 private key configured (jwt.private_key_file)"
            )
        if not subject:
            raise ValueError("subject must be non-empty")
        ttl = self._config.token_ttl_s if ttl_s is None else int(ttl_s)
        if ttl < 1:
            raise ValueError(f"ttl_s must be >= 1 second, got {ttl}")
        if ttl > self._config.max_ttl_s:
            raise ValueError(
                f"ttl_s {ttl} exceeds the maximum token lifetime of {self._config.max_ttl_s} s "
                "(jwt.max_ttl_s)"
            )
        issued = int(time.time()) if now is None else int(now)
        payload: dict[str, Any] = {
            "sub": subject,
            "aud": self._config.audience,
            "iss": self._config.issuer,
            "iat": issued,
            "nbf": issued,
            "exp": issued + ttl,
            "scope": " ".join(_validate_scope_names(scopes)),
            # 128 random bits in hex: an operator pastes the jti after `revoke --jti`, and a
            # base64url text starts with "-" once in 64, which argparse takes for an option.
            "jti": secrets.token_hex(16),
        }
        token = jwt.encode(payload, self._sign_key, algorithm=self._config.algorithm)
        return token, ttl

    def verify(
        self,
        authorization: str | None,
        required_scope: str,
        now: int | None = None,
        *,
        still_valid: Callable[[Claims], None] | None = None,
    ) -> Claims:
        """Check an `Authorization` header value ("Bearer <jwt>") and that the token grants
        `required_scope`. `now` is epoch seconds (default the current time). `still_valid`,
        if given, is called with the verified claims before the scope is checked and raises
        `AuthError` to refuse the token (revocation: a revoked token is a 401 whatever it grants).

        Raises `AuthError` (401, or 403 for a valid token lacking the scope).
        """
        token = _bearer_token(authorization)
        # Checked before any base64/JSON/crypto work so oversized input costs nothing.
        if len(token) > self._config.max_token_bytes or (
            len(token.encode("utf-8", "surrogateescape")) > self._config.max_token_bytes
        ):
            raise AuthError(
                401,
                "token_too_large",
                f"the bearer token exceeds {self._config.max_token_bytes} bytes",
            )
        payload = self._decode(token)
        claims = self._check_claims(payload, int(time.time()) if now is None else int(now))
        if still_valid is not None:
            still_valid(claims)
        if required_scope not in claims.scopes:
            raise AuthError(
                403, "insufficient_scope", f"this endpoint needs the {required_scope!r} scope"
            )
        return claims

    def _decode(self, token: str) -> dict[str, Any]:
        """Signature, algorithm, audience, issuer and presence of the required claims.

        Time claims are left to `_check_claims` so that the real clock and an injected `now`
        go through one code path (PyJWT would compare against the wall clock).
        """
        try:
            payload: dict[str, Any] = jwt.decode(
                token,
                self._verify_key,
                # An explicit allow-list of one: the header's `alg` is never trusted, which
                # rules out `none` and signing HS256 with the RSA public key as the secret.
                algorithms=[self._config.algorithm],
                audience=self._config.audience,
                issuer=self._config.issuer,
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": True,
                    "verify_iss": True,
                    "require": list(_REQUIRED_CLAIMS),
                },
            )
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(
                401, "invalid_token", f"the token lacks the required {exc.claim!r} claim"
            ) from None
        except jwt.InvalidAudienceError:
            raise AuthError(
                401,
                "invalid_audience",
                f"the token is not meant for audience {self._config.audience!r}",
            ) from None
        except jwt.InvalidIssuerError:
            raise AuthError(
                401, "invalid_issuer", f"the token was not issued by {self._config.issuer!r}"
            ) from None
        except jwt.InvalidAlgorithmError:
            raise AuthError(
                401, "invalid_token", f"the token must be signed with {self._config.algorithm}"
            ) from None
        except jwt.InvalidSignatureError:
            raise AuthError(401, "invalid_token", "the token signature does not verify") from None
        except jwt.InvalidTokenError:
            # Garbage, bad base64/JSON, a non-string sub/jti, ...: one generic answer.
            raise AuthError(401, "invalid_token", "the bearer token is not a valid JWT") from None
        return payload

    def _check_claims(self, payload: dict[str, Any], now: int) -> Claims:
        """Types of the claims, the lifetime cap and the time window, all in epoch seconds
        (the window with `leeway_s`)."""
        leeway = self._config.leeway_s
        exp = _numeric_date(payload, "exp")
        iat = _numeric_date(payload, "iat")
        nbf = _numeric_date(payload, "nbf") if "nbf" in payload else None
        subject = payload["sub"]
        scope = payload["scope"]
        if not isinstance(subject, str) or not subject:
            raise AuthError(401, "invalid_token", "the 'sub' claim must be a non-empty string")
        if not isinstance(scope, str):
            raise AuthError(
                401, "invalid_token", "the 'scope' claim must be a space-separated string"
            )
        token_id = payload.get("jti")
        if token_id is not None and (not isinstance(token_id, str) or not token_id):
            raise AuthError(401, "invalid_token", "the 'jti' claim must be a non-empty string")
        # A token signed elsewhere with the same key (another minting tool, a leaked secret
        # used once) may not outlive what this service would mint; no leeway: not a clock matter.
        if exp - iat > self._config.max_ttl_s:
            raise AuthError(
                401,
                "invalid_token",
                f"the token's lifetime exceeds the maximum of {self._config.max_ttl_s} s",
            )
        # Same comparison as PyJWT/RFC 7519: expired once now >= exp (plus leeway for skew).
        if exp <= now - leeway:
            raise AuthError(401, "token_expired", "the token has expired; request a new one")
        if nbf is not None and nbf > now + leeway:
            raise AuthError(401, "token_not_yet_valid", "the token is not valid yet (nbf)")
        # A token "issued in the future" is a clock problem or a forgery; don't accept it.
        if iat > now + leeway:
            raise AuthError(401, "token_not_yet_valid", "the token is not valid yet (iat)")
        return Claims(
            subject=subject,
            scopes=frozenset(scope.split()),
            issued_at=iat,
            expires_at=exp,
            token_id=token_id,
        )


@dataclass(frozen=True)
class TokenIdentity:
    """What revoking one token needs: its `jti` and `exp` (epoch seconds), either may be
    missing from a token."""

    token_id: str | None
    expires_at: int | None


def read_token_identity(token: str) -> TokenIdentity:
    """`jti` and `exp` of a JWT string, without checking its signature: an operator pastes a
    token to revoke it, and a forged token is refused on verification whatever its `jti`.
    Raises ValueError when `token` is not a JWT."""
    try:
        payload: dict[str, Any] = jwt.decode(
            token.strip(), options={"verify_signature": False, "verify_exp": False}
        )
    except jwt.InvalidTokenError:
        raise ValueError("not a JWT") from None
    token_id = payload.get("jti")
    exp = payload.get("exp")
    return TokenIdentity(
        token_id=token_id if isinstance(token_id, str) and token_id else None,
        expires_at=math.floor(exp)
        if isinstance(exp, int | float) and not isinstance(exp, bool) and math.isfinite(exp)
        else None,
    )


def _bearer_token(authorization: str | None) -> str:
    """The token of "Bearer <token>" (scheme case-insensitive, RFC 7235 §2.1)."""
    if authorization is None or not authorization.strip():
        raise AuthError(
            401, "missing_token", "send an 'Authorization: Bearer <token>' header (see POST /token)"
        )
    parts = authorization.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise AuthError(
            401, "malformed_header", "the Authorization header must be exactly 'Bearer <token>'"
        )
    return parts[1]


def _numeric_date(payload: dict[str, Any], claim: str) -> int:
    """An RFC 7519 NumericDate as whole epoch seconds; bools, NaN and infinities rejected
    (Python's JSON parser accepts NaN/Infinity, and int(inf) would raise)."""
    value = payload[claim]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError(401, "invalid_token", f"the {claim!r} claim must be a number of seconds")
    if isinstance(value, float) and not math.isfinite(value):
        raise AuthError(401, "invalid_token", f"the {claim!r} claim must be a finite number")
    return math.floor(value)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyConfigError(f"cannot read key material from {path}: {exc.strerror}") from None


def _warn_if_readable_by_others(path: Path) -> None:
    """Secrets readable by group/others are probably a mistake; say so, but keep working."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is accessible by group/others (mode %o); chmod 600 it", path, mode & 0o777)


def _load_public_key(key: RSAPublicKey | bytes | str) -> RSAPublicKey:
    if isinstance(key, RSAPublicKey):
        loaded: object = key
    else:
        data = key.encode("utf-8") if isinstance(key, str) else key
        try:
            loaded = serialization.load_pem_public_key(data)
        except ValueError:
            raise KeyConfigError("the RS256 public key is not a PEM public key") from None
    if not isinstance(loaded, RSAPublicKey):
        raise KeyConfigError("the RS256 public key is not an RSA key")
    if loaded.key_size < MIN_RSA_KEY_BITS:
        raise KeyConfigError(f"the RSA key has {loaded.key_size} bits; {MIN_RSA_KEY_BITS}+ needed")
    return loaded


def _load_private_key(key: RSAPrivateKey | bytes | str) -> RSAPrivateKey:
    if isinstance(key, RSAPrivateKey):
        loaded: object = key
    else:
        data = key.encode("utf-8") if isinstance(key, str) else key
        try:
            loaded = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            # TypeError: the key is encrypted; there is no passphrase to give it.
            raise KeyConfigError(
                "the RS256 private key is not an unencrypted PEM private key"
            ) from None
    if not isinstance(loaded, RSAPrivateKey):
        raise KeyConfigError("the RS256 private key is not an RSA key")
    if loaded.key_size < MIN_RSA_KEY_BITS:
        raise KeyConfigError(f"the RSA key has {loaded.key_size} bits; {MIN_RSA_KEY_BITS}+ needed")
    return loaded
