"""The signal API's security layer: JWTs, hashed client secrets, rate limits, operator CLI."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import stat
import threading
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from configs.schema import ALL_SCOPES, SCOPE_PREDICT, SCOPE_READ, AuthConfig, JwtConfig
from serve.api import tokens
from serve.api.auth import (
    AUTH_ERROR_CODES,
    AuthError,
    Claims,
    KeyConfigError,
    TokenService,
)
from serve.api.clients import ClientEntry, ClientStore, hash_secret, verify_secret
from serve.api.ratelimit import RateLimiter

NOW = 1_700_000_000
SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
OTHER_SECRET = "another-secret-0123456789-abcdefghijklmnopqrstu"
HS = JwtConfig()  # HS256, audience/issuer "quant-ai", leeway 10 s, ttl 900 s
RS = JwtConfig(algorithm="RS256")
ENV = HS.secret_env


# ---------------------------------------------------------------------------------- helpers


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segments(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())


def _hs256_token(payload: dict[str, Any], key: bytes, header: dict[str, Any] | None = None) -> str:
    """Sign by hand (PyJWT refuses some keys we need to attack with, e.g. a PEM)."""
    signing_input = _segments(header or {"alg": "HS256", "typ": "JWT"}, payload)
    mac = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + _b64(mac)


def _payload(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "alice",
        "aud": "quant-ai",
        "iss": "quant-ai",
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + 900,
        "scope": f"{SCOPE_READ} {SCOPE_PREDICT}",
        "jti": "abc",
    }
    for key, value in overrides.items():
        if value is _DROP:
            base.pop(key)
        else:
            base[key] = value
    return base


_DROP = object()


def _expect(
    service: TokenService,
    header: str | None,
    code: str,
    *,
    scope: str = SCOPE_READ,
    now: int | None = NOW,
    status: int = 401,
) -> AuthError:
    with pytest.raises(AuthError) as info:
        service.verify(header, scope, now=now)
    err = info.value
    assert err.code == code, err.detail
    assert err.status == status
    assert err.code in AUTH_ERROR_CODES
    # The token (or any long piece of it) never leaks into what the caller or the logs see.
    token = (header or "").split()[-1] if header and header.split() else ""
    if len(token) >= 8:
        assert token not in err.detail and token not in str(err)
        for part in token.split("."):
            if len(part) >= 8:
                assert part not in err.detail
    for secret in (SECRET, OTHER_SECRET):
        assert secret not in err.detail
    return err


@pytest.fixture
def hs() -> TokenService:
    return TokenService(HS, secret=SECRET)


@pytest.fixture(scope="module")
def rsa_key() -> RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_pems(rsa_key: RSAPrivateKey) -> tuple[bytes, bytes]:
    public = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return public, private


@pytest.fixture
def rs(rsa_pems: tuple[bytes, bytes]) -> TokenService:
    public, private = rsa_pems
    return TokenService(RS, public_key=public, private_key=private)


# -------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", ["hs", "rs"])
def test_mint_verify_round_trip(kind: str, request: pytest.FixtureRequest) -> None:
    service: TokenService = request.getfixturevalue(kind)
    token, expires_in = service.mint("alice", [SCOPE_PREDICT, SCOPE_READ], now=NOW)
    assert expires_in == 900
    claims = service.verify(f"Bearer {token}", SCOPE_READ, now=NOW + 5)
    raw = jwt.decode(token, options={"verify_signature": False})
    assert claims == Claims(
        subject="alice",
        scopes=frozenset({SCOPE_READ, SCOPE_PREDICT}),
        issued_at=NOW,
        expires_at=NOW + 900,
        token_id=raw["jti"],
    )
    header = jwt.get_unverified_header(token)
    assert header["alg"] == ("HS256" if kind == "hs" else "RS256")
    assert raw["scope"] == "signals:predict signals:read"  # OAuth2 space-separated
    assert raw["aud"] == raw["iss"] == "quant-ai"
    assert raw["nbf"] == raw["iat"] == NOW
    assert isinstance(raw["jti"], str) and len(raw["jti"]) >= 16


def test_real_clock_and_custom_ttl(hs: TokenService) -> None:
    token, expires_in = hs.mint("bob", [SCOPE_READ], ttl_s=60)
    assert expires_in == 60
    claims = hs.verify(f"Bearer {token}", SCOPE_READ)
    assert claims.expires_at - claims.issued_at == 60


def test_jti_is_unique(hs: TokenService) -> None:
    first, _ = hs.mint("alice", [SCOPE_READ], now=NOW)
    second, _ = hs.mint("alice", [SCOPE_READ], now=NOW)
    assert first != second


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_scheme_is_case_insensitive(hs: TokenService, scheme: str) -> None:
    token, _ = hs.mint("alice", [SCOPE_READ], now=NOW)
    assert hs.verify(f"{scheme}  {token} ", SCOPE_READ, now=NOW).subject == "alice"


def test_mint_rejects_bad_arguments(hs: TokenService) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        hs.mint("alice", [SCOPE_READ], ttl_s=0)
    with pytest.raises(ValueError, match="scope"):
        hs.mint("alice", ["signals read"])
    with pytest.raises(ValueError, match="subject"):
        hs.mint("", [SCOPE_READ])


# --------------------------------------------------------------------- header and size


@pytest.mark.parametrize("header", [None, "", "   "])
def test_missing_token(hs: TokenService, header: str | None) -> None:
    err = _expect(hs, header, "missing_token")
    assert err.www_authenticate == 'Bearer realm="quant-ai"'


@pytest.mark.parametrize(
    "header", ["Basic x", "Bearer", "Bearer a b", "Token abc.def.ghi", "abc.def.ghi"]
)
def test_malformed_header(hs: TokenService, header: str) -> None:
    err = _expect(hs, header, "malformed_header")
    assert err.www_authenticate is not None and 'error="invalid_request"' in err.www_authenticate


def test_oversized_token_rejected_before_decoding(
    hs: TokenService, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("an oversized token must not be decoded")

    monkeypatch.setattr(jwt, "decode", no_decode)
    limit = HS.max_token_bytes
    _expect(hs, "Bearer " + "a" * (limit + 1), "token_too_large")
    # Multi-byte characters count as bytes, not characters.
    _expect(hs, "Bearer " + "é" * (limit // 2 + 1), "token_too_large")


def test_token_at_the_size_limit_is_decoded(hs: TokenService) -> None:
    _expect(hs, "Bearer " + "a" * HS.max_token_bytes, "invalid_token")


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "é.é.é", "..", "eyJhbGciOiJIUzI1NiJ9.x.y"])
def test_garbage_token(hs: TokenService, token: str) -> None:
    _expect(hs, f"Bearer {token}", "invalid_token")


def test_payload_not_an_object(hs: TokenService) -> None:
    signing_input = _b64(b'{"alg":"HS256","typ":"JWT"}') + "." + _b64(b"[1,2,3]")
    mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    _expect(hs, f"Bearer {signing_input}.{_b64(mac)}", "invalid_token")


# ---------------------------------------------------------------------------------- time


def test_expired_beyond_leeway(hs: TokenService) -> None:
    token, _ = hs.mint("alice", [SCOPE_READ], ttl_s=60, now=NOW)
    exp = NOW + 60
    _expect(hs, f"Bearer {token}", "token_expired", now=exp + HS.leeway_s)
    _expect(hs, f"Bearer {token}", "token_expired", now=exp + 3600)


def test_expired_within_leeway_accepted(hs: TokenService) -> None:
    token, _ = hs.mint("alice", [SCOPE_READ], ttl_s=60, now=NOW)
    claims = hs.verify(f"Bearer {token}", SCOPE_READ, now=NOW + 60 + HS.leeway_s - 1)
    assert claims.expires_at == NOW + 60


def test_no_leeway_means_expired_at_exp() -> None:
    service = TokenService(JwtConfig(leeway_s=0), secret=SECRET)
    token, _ = service.mint("alice", [SCOPE_READ], ttl_s=60, now=NOW)
    service.verify(f"Bearer {token}", SCOPE_READ, now=NOW + 59)
    _expect(service, f"Bearer {token}", "token_expired", now=NOW + 60)


def test_expired_token_with_bad_signature_is_invalid_not_expired(hs: TokenService) -> None:
    # The signature is checked before any claim, so forgers learn nothing about claims.
    forged = _hs256_token(_payload(exp=NOW - 3600), OTHER_SECRET.encode())
    _expect(hs, f"Bearer {forged}", "invalid_token")


def test_not_yet_valid_nbf(hs: TokenService) -> None:
    future = _hs256_token(_payload(nbf=NOW + 60), SECRET.encode())
    err = _expect(hs, f"Bearer {future}", "token_not_yet_valid")
    assert "nbf" in err.detail
    # Within leeway: accepted (clock skew between issuer and API).
    near = _hs256_token(_payload(nbf=NOW + HS.leeway_s), SECRET.encode())
    hs.verify(f"Bearer {near}", SCOPE_READ, now=NOW)


def test_not_yet_valid_iat(hs: TokenService) -> None:
    future = _hs256_token(_payload(iat=NOW + 60, nbf=_DROP), SECRET.encode())
    err = _expect(hs, f"Bearer {future}", "token_not_yet_valid")
    assert "iat" in err.detail
    near = _hs256_token(_payload(iat=NOW + HS.leeway_s, nbf=_DROP), SECRET.encode())
    hs.verify(f"Bearer {near}", SCOPE_READ, now=NOW)


def test_minted_in_the_future_is_not_yet_valid(hs: TokenService) -> None:
    token, _ = hs.mint("alice", [SCOPE_READ], now=NOW + 3600)
    _expect(hs, f"Bearer {token}", "token_not_yet_valid")


@pytest.mark.parametrize(
    "claim, value",
    [("exp", "tomorrow"), ("exp", True), ("iat", None), ("iat", [NOW]), ("nbf", "now")],
)
def test_time_claims_must_be_numbers(hs: TokenService, claim: str, value: object) -> None:
    token = _hs256_token(_payload(**{claim: value}), SECRET.encode())
    _expect(hs, f"Bearer {token}", "invalid_token")


def test_non_finite_exp_rejected(hs: TokenService) -> None:
    # Python's JSON parser accepts NaN/Infinity; they must not crash or pass verification.
    for text in ("NaN", "Infinity"):
        body = json.dumps(_payload(exp=0)).replace('"exp": 0', f'"exp": {text}')
        signing_input = _b64(b'{"alg":"HS256","typ":"JWT"}') + "." + _b64(body.encode())
        mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
        _expect(hs, f"Bearer {signing_input}.{_b64(mac)}", "invalid_token")


def test_float_times_are_accepted(hs: TokenService) -> None:
    token = _hs256_token(_payload(iat=NOW + 0.5, exp=NOW + 60.9), SECRET.encode())
    claims = hs.verify(f"Bearer {token}", SCOPE_READ, now=NOW)
    assert (claims.issued_at, claims.expires_at) == (NOW, NOW + 60)


# --------------------------------------------------------------------------- audience etc.


def test_wrong_audience(hs: TokenService) -> None:
    other = TokenService(JwtConfig(audience="someone-else"), secret=SECRET)
    token, _ = other.mint("alice", [SCOPE_READ], now=NOW)
    _expect(hs, f"Bearer {token}", "invalid_audience")
    listed = _hs256_token(_payload(aud=["x", "y"]), SECRET.encode())
    _expect(hs, f"Bearer {listed}", "invalid_audience")


def test_audience_list_containing_ours_is_accepted(hs: TokenService) -> None:
    token = _hs256_token(_payload(aud=["other", "quant-ai"]), SECRET.encode())
    assert hs.verify(f"Bearer {token}", SCOPE_READ, now=NOW).subject == "alice"


def test_wrong_issuer(hs: TokenService) -> None:
    other = TokenService(JwtConfig(issuer="evil"), secret=SECRET)
    token, _ = other.mint("alice", [SCOPE_READ], now=NOW)
    _expect(hs, f"Bearer {token}", "invalid_issuer")


def test_wrong_scope_is_403(hs: TokenService) -> None:
    token, _ = hs.mint("alice", [SCOPE_READ], now=NOW)
    err = _expect(hs, f"Bearer {token}", "insufficient_scope", scope=SCOPE_PREDICT, status=403)
    assert SCOPE_PREDICT in err.detail
    assert err.www_authenticate is not None and "insufficient_scope" in err.www_authenticate
    # Scopes are whole words: "signals:read" does not grant "signals".
    _expect(hs, f"Bearer {token}", "insufficient_scope", scope="signals", status=403)


def test_empty_scope_grants_nothing(hs: TokenService) -> None:
    token, _ = hs.mint("alice", [], now=NOW)
    _expect(hs, f"Bearer {token}", "insufficient_scope", status=403)


@pytest.mark.parametrize(
    "claim, value", [("scope", ["signals:read"]), ("sub", 123), ("sub", ""), ("jti", 5)]
)
def test_claim_types(hs: TokenService, claim: str, value: object) -> None:
    token = _hs256_token(_payload(**{claim: value}), SECRET.encode())
    _expect(hs, f"Bearer {token}", "invalid_token")


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "aud", "scope", "iss"])
def test_missing_claim(hs: TokenService, claim: str) -> None:
    token = _hs256_token(_payload(**{claim: _DROP}), SECRET.encode())
    err = _expect(hs, f"Bearer {token}", "invalid_token")
    assert claim in err.detail


def test_nbf_and_jti_are_optional(hs: TokenService) -> None:
    token = _hs256_token(_payload(nbf=_DROP, jti=_DROP), SECRET.encode())
    assert hs.verify(f"Bearer {token}", SCOPE_READ, now=NOW).subject == "alice"


# ------------------------------------------------------------------------------- forgery


def test_forged_signature(hs: TokenService) -> None:
    forger = TokenService(HS, secret=OTHER_SECRET)
    token, _ = forger.mint("alice", [SCOPE_READ], now=NOW)
    err = _expect(hs, f"Bearer {token}", "invalid_token")
    assert err.www_authenticate == 'Bearer realm="quant-ai", error="invalid_token"'


def test_tampered_payload(hs: TokenService) -> None:
    token, _ = hs.mint("alice", [SCOPE_READ], now=NOW)
    header, _, signature = token.split(".")
    escalated = _b64(json.dumps(_payload(sub="admin")).encode())
    _expect(hs, f"Bearer {header}.{escalated}.{signature}", "invalid_token")


@pytest.mark.parametrize("kind", ["hs", "rs"])
@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_rejected(kind: str, alg: str, request: pytest.FixtureRequest) -> None:
    service: TokenService = request.getfixturevalue(kind)
    unsigned = _segments({"alg": alg, "typ": "JWT"}, _payload()) + "."
    _expect(service, f"Bearer {unsigned}", "invalid_token")


def test_hs_rs_confusion_rejected(rs: TokenService, rsa_pems: tuple[bytes, bytes]) -> None:
    # The classic attack: take the public key (it is public) and use it as an HMAC secret.
    public_pem, _ = rsa_pems
    forged = _hs256_token(_payload(), public_pem)
    err = _expect(rs, f"Bearer {forged}", "invalid_token")
    assert "RS256" in err.detail


def test_rs_token_rejected_by_hs_service(hs: TokenService, rs: TokenService) -> None:
    token, _ = rs.mint("alice", [SCOPE_READ], now=NOW)
    _expect(hs, f"Bearer {token}", "invalid_token")


def test_rs_token_signed_by_another_key(rs: TokenService) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forger = TokenService(RS, public_key=other.public_key(), private_key=other)
    token, _ = forger.mint("alice", [SCOPE_READ], now=NOW)
    _expect(rs, f"Bearer {token}", "invalid_token")


# ------------------------------------------------------------------------ key material


def test_hs_secret_must_be_long_enough() -> None:
    with pytest.raises(KeyConfigError, match="at least 32"):
        TokenService(HS, secret="x" * 31)
    TokenService(HS, secret="x" * 32)


def test_key_kind_must_match_algorithm(rsa_pems: tuple[bytes, bytes]) -> None:
    public, _ = rsa_pems
    with pytest.raises(KeyConfigError):
        TokenService(HS, public_key=public)
    with pytest.raises(KeyConfigError):
        TokenService(RS, secret=SECRET)
    with pytest.raises(KeyConfigError, match="public key"):
        TokenService(RS)
    with pytest.raises(KeyConfigError, match="PEM"):
        TokenService(RS, public_key=b"not a key")


def test_weak_or_mismatched_rsa_keys(rsa_key: RSAPrivateKey) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(KeyConfigError, match="2048"):
        TokenService(RS, public_key=weak.public_key())
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(KeyConfigError, match="does not match"):
        TokenService(RS, public_key=rsa_key.public_key(), private_key=other)


def test_from_config_env_wins_over_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret_file = tmp_path / "jwt_secret"
    secret_file.write_text(OTHER_SECRET + "\n")
    config = JwtConfig(secret_file=str(secret_file))
    monkeypatch.setenv(ENV, SECRET)
    with caplog.at_level(logging.DEBUG):
        service = TokenService.from_config(config)
    token, _ = service.mint("alice", [SCOPE_READ], now=NOW)
    TokenService(HS, secret=SECRET).verify(f"Bearer {token}", SCOPE_READ, now=NOW)
    assert SECRET not in caplog.text and OTHER_SECRET not in caplog.text


def test_from_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    secret_file = tmp_path / "jwt_secret"
    secret_file.write_text(SECRET + "\n")  # the trailing newline of `echo` is not the key
    secret_file.chmod(0o644)
    with caplog.at_level(logging.DEBUG):
        service = TokenService.from_config(JwtConfig(secret_file=str(secret_file)))
    assert "chmod 600" in caplog.text  # warned about the loose mode
    assert SECRET not in caplog.text
    token, _ = service.mint("alice", [SCOPE_READ], now=NOW)
    TokenService(HS, secret=SECRET).verify(f"Bearer {token}", SCOPE_READ, now=NOW)


def test_from_config_without_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(KeyConfigError, match=f"{ENV}.*init-dev"):
        TokenService.from_config(JwtConfig(secret_file=str(tmp_path / "absent")))
    with pytest.raises(KeyConfigError, match=ENV):
        TokenService.from_config(JwtConfig(secret_file=None))
    monkeypatch.setenv(ENV, "short")
    with pytest.raises(KeyConfigError, match="at least 32"):
        TokenService.from_config(HS)


def test_from_config_rs256(tmp_path: Path, rsa_pems: tuple[bytes, bytes]) -> None:
    public, private = rsa_pems
    (tmp_path / "pub.pem").write_bytes(public)
    (tmp_path / "priv.pem").write_bytes(private)
    (tmp_path / "priv.pem").chmod(0o600)
    full = TokenService.from_config(
        JwtConfig(
            algorithm="RS256",
            public_key_file=str(tmp_path / "pub.pem"),
            private_key_file=str(tmp_path / "priv.pem"),
        )
    )
    verify_only = TokenService.from_config(
        JwtConfig(algorithm="RS256", public_key_file=str(tmp_path / "pub.pem"))
    )
    assert full.can_mint and not verify_only.can_mint
    token, _ = full.mint("alice", [SCOPE_READ], now=NOW)
    assert verify_only.verify(f"Bearer {token}", SCOPE_READ, now=NOW).subject == "alice"
    with pytest.raises(KeyConfigError, match="private key"):
        verify_only.mint("alice", [SCOPE_READ])
    with pytest.raises(KeyConfigError, match="public_key_file"):
        TokenService.from_config(JwtConfig(algorithm="RS256"))
    with pytest.raises(KeyConfigError, match="cannot read"):
        TokenService.from_config(
            JwtConfig(algorithm="RS256", public_key_file=str(tmp_path / "absent.pem"))
        )


def test_auth_error_statuses() -> None:
    assert set(AUTH_ERROR_CODES) == {
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
    }
    for code in AUTH_ERROR_CODES:
        status = 403 if code == "insufficient_scope" else 401
        err = AuthError(status, code, "d")
        assert (err.status, err.code, err.detail) == (status, code, "d")
        with pytest.raises(ValueError):
            AuthError(401 if status == 403 else 403, code, "d")
    with pytest.raises(ValueError):
        AuthError(401, "no_such_code", "d")  # type: ignore[arg-type]
    assert AuthError(401, "invalid_client", "d").www_authenticate is None


# ------------------------------------------------------------------------------- clients


def test_hash_secret_format_and_verify() -> None:
    encoded = hash_secret("s3cret")
    scheme, n, r, p, salt, digest = encoded.split("$")
    assert (scheme, n, r, p) == ("scrypt", str(2**14), "8", "1")
    assert len(base64.b64decode(salt)) == 16
    assert len(base64.b64decode(digest)) == 32
    assert verify_secret("s3cret", encoded)
    assert not verify_secret("s3cret ", encoded)
    assert not verify_secret("", encoded)
    assert hash_secret("s3cret") != encoded  # random salt
    assert "s3cret" not in encoded


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "scrypt",
        "bcrypt$16384$8$1$AAAA$AAAA",
        "scrypt$x$8$1$AAAA$AAAA",
        "scrypt$16384$8$1$!!!!$AAAA",
        "scrypt$1000$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,  # n not a power of two
        "scrypt$1073741824$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,  # absurd cost
    ],
)
def test_verify_secret_malformed_never_matches(encoded: str) -> None:
    assert verify_secret("anything", encoded) is False


def test_client_store_add_and_authenticate(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "clients.yaml"
    store = ClientStore.load(path)
    assert len(store) == 0
    secret = store.add("svc-a", [SCOPE_READ])
    assert len(secret) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert secret not in text and "scrypt$" in text
    assert not list(path.parent.glob("*.tmp"))  # the temporary file was renamed

    reloaded = ClientStore.load(path)
    entry = reloaded.authenticate("svc-a", secret)
    assert entry == ClientEntry(
        client_id="svc-a", secret_hash=entry.secret_hash, scopes=[SCOPE_READ]
    )

    second = reloaded.add("svc-b", [SCOPE_PREDICT, SCOPE_READ, SCOPE_READ])
    again = ClientStore.load(path)
    assert again.client_ids() == ["svc-a", "svc-b"]
    assert again.authenticate("svc-b", second).scopes == [SCOPE_PREDICT, SCOPE_READ]
    assert again.authenticate("svc-a", secret).client_id == "svc-a"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_client_store_rejects_wrong_secret_and_unknown_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ClientStore.load(tmp_path / "clients.yaml")
    secret = store.add("svc", [SCOPE_READ])

    calls: list[str] = []
    real_verify = verify_secret

    def counting_verify(presented: str, encoded: str) -> bool:
        calls.append(encoded)
        return real_verify(presented, encoded)

    monkeypatch.setattr("serve.api.clients.verify_secret", counting_verify)
    errors = []
    for client_id, presented in [
        ("svc", secret + "x"),
        ("svc", ""),
        ("nobody", secret),
        ("nobody", "whatever"),
    ]:
        with pytest.raises(AuthError) as info:
            store.authenticate(client_id, presented)
        errors.append(info.value)
    assert {(e.code, e.status, e.detail) for e in errors} == {
        ("invalid_client", 401, errors[0].detail)
    }  # one answer: which part was wrong is not revealed
    assert secret not in errors[0].detail
    # Unknown ids cost a scrypt verification too (timing does not reveal valid ids).
    assert len(calls) == 4

    with pytest.raises(AuthError):
        store.authenticate("svc", "x" * 5000)


def test_client_store_duplicates_and_invalid_input(tmp_path: Path) -> None:
    store = ClientStore.load(tmp_path / "clients.yaml")
    store.add("svc", [SCOPE_READ])
    with pytest.raises(ValueError, match="already exists"):
        store.add("svc", [SCOPE_READ])
    with pytest.raises(ValueError, match="client_id"):
        store.add("bad id with spaces", [SCOPE_READ])
    with pytest.raises(ValueError, match="scope"):
        store.add("svc2", ["two words"])
    with pytest.raises(ValueError, match="no file"):
        ClientStore().add("svc", [SCOPE_READ])
    assert ClientStore.load(tmp_path / "clients.yaml").client_ids() == ["svc"]


def test_client_store_missing_file_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="serve.api.clients"):
        store = ClientStore.load(tmp_path / "absent.yaml")
    assert len(store) == 0
    assert "absent.yaml" in caplog.text and "add-client" in caplog.text
    with pytest.raises(AuthError) as info:
        store.authenticate("dev", "x")
    assert info.value.code == "invalid_client"


def test_client_store_invalid_file_hides_hashes(tmp_path: Path) -> None:
    path = tmp_path / "clients.yaml"
    data = {"clients": [{"client_id": "a", "secret_hash": "scrypt$SECRETHASH", "extra": 1}]}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="invalid clients file") as info:
        ClientStore.load(path)
    assert "SECRETHASH" not in str(info.value)
    dup = {"clients": [{"client_id": "a", "secret_hash": "h"}] * 2}
    path.write_text(yaml.safe_dump(dup))
    with pytest.raises(ValueError, match="duplicate"):
        ClientStore.load(path)


# ---------------------------------------------------------------------------- rate limit


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rate_limiter_burst_then_limit_then_refill() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_minute=60, burst=3, clock=clock)  # 1 token per second
    assert [limiter.check("a") for _ in range(3)] == [None, None, None]
    assert limiter.check("a") == pytest.approx(1.0)
    assert limiter.check("b") is None  # keys are independent
    clock.t += 0.5
    assert limiter.check("a") == pytest.approx(0.5)
    clock.t += 0.5
    assert limiter.check("a") is None
    assert limiter.check("a") == pytest.approx(1.0)
    # A long pause refills only up to the burst.
    clock.t += 3600
    assert [limiter.check("a") for _ in range(4)] == [None, None, None, pytest.approx(1.0)]


def test_rate_limiter_tolerates_clock_going_back() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_minute=60, burst=1, clock=clock)
    assert limiter.check("a") is None
    clock.t -= 10
    assert limiter.check("a") == pytest.approx(1.0)


def test_rate_limiter_forgets_idle_keys() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_minute=60, burst=3, clock=clock)
    for key in ("a", "b", "c"):
        limiter.check(key)
    assert len(limiter) == 3
    clock.t += 2.9  # not yet refilled: remembered (forgetting would grant a new burst early)
    limiter.check("d")
    assert len(limiter) == 4
    clock.t += 0.2  # a, b, c now full: indistinguishable from new buckets
    limiter.check("d")
    assert len(limiter) == 1


def test_rate_limiter_caps_keys() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_minute=1, burst=1, clock=clock, max_keys=100)
    for i in range(1000):
        limiter.check(f"k{i}")
    assert len(limiter) == 100
    assert limiter.check("k999") is not None  # the most recent keys are kept


def test_rate_limiter_is_thread_safe() -> None:
    limiter = RateLimiter(rate_per_minute=1e-6, burst=50)  # no refill during the test
    allowed: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        count = sum(1 for _ in range(100) if limiter.check("shared") is None)
        with lock:
            allowed.append(count)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(allowed) == 50


@pytest.mark.parametrize("kwargs", [{"rate_per_minute": 0}, {"burst": 0}, {"max_keys": 0}])
def test_rate_limiter_validates(kwargs: dict[str, float]) -> None:
    args: dict[str, Any] = {"rate_per_minute": 60, "burst": 1, **kwargs}
    with pytest.raises(ValueError):
        RateLimiter(**args)


# ----------------------------------------------------------------------------------- CLI


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV, raising=False)
    return tmp_path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = tokens.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_init_dev_then_mint(
    workdir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    code, out, _ = _run(["init-dev"], capsys)
    assert code == 0
    created = json.loads(out)
    assert created["jwt_secret_file"] == ".secrets/jwt_secret"
    assert created["client_id"] == "dev"
    assert created["scopes"] == "signals:predict signals:read"
    assert created["clients_file"] == ".secrets/clients.yaml"
    dev_secret = created["client_secret"]

    secret_file = workdir / ".secrets" / "jwt_secret"
    jwt_secret = secret_file.read_text().strip()
    assert len(jwt_secret) >= 64  # token_urlsafe(48)
    assert jwt_secret not in out  # only the dev client's secret is ever printed
    for path in (secret_file, workdir / ".secrets" / "clients.yaml"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

    # Idempotent: nothing is replaced on a second run.
    code, out, _ = _run(["init-dev"], capsys)
    assert (code, json.loads(out)) == (0, {})
    assert secret_file.read_text().strip() == jwt_secret

    entry = ClientStore.load(".secrets/clients.yaml").authenticate("dev", dev_secret)
    assert sorted(entry.scopes) == sorted(ALL_SCOPES)

    code, out, _ = _run(
        ["mint", "--sub", "dev", "--scope", SCOPE_READ, "--scope", SCOPE_PREDICT, "--ttl", "120"],
        capsys,
    )
    assert code == 0
    token = out.strip()
    assert out == token + "\n"  # the token and nothing else
    claims = TokenService.from_config(AuthConfig().jwt).verify(f"Bearer {token}", SCOPE_PREDICT)
    assert claims.subject == "dev"
    assert claims.scopes == frozenset(ALL_SCOPES)
    assert claims.expires_at - claims.issued_at == 120

    for secret in (jwt_secret, dev_secret, token):
        assert secret not in caplog.text


def test_cli_mint_default_scope(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run(["init-dev"], capsys)
    code, out, _ = _run(["mint", "--sub", "dev"], capsys)
    assert code == 0
    claims = TokenService.from_config(AuthConfig().jwt).verify(f"Bearer {out.strip()}", SCOPE_READ)
    assert claims.scopes == frozenset({SCOPE_READ})


def test_cli_mint_without_secret_fails_clearly(
    workdir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    code, out, _ = _run(["mint", "--sub", "ops"], capsys)
    assert code == 2 and out == ""
    assert "init-dev" in caplog.text


def test_cli_add_client(
    workdir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    code, out, _ = _run(["add-client", "--id", "trader", "--scope", SCOPE_PREDICT], capsys)
    assert code == 0
    secret = out.strip()
    assert out == secret + "\n"
    entry = ClientStore.load(".secrets/clients.yaml").authenticate("trader", secret)
    assert entry.scopes == [SCOPE_PREDICT]
    assert secret not in caplog.text
    code, out, _ = _run(["add-client", "--id", "trader"], capsys)
    assert code == 2 and out == ""
    # init-dev adds no dev client when clients exist already.
    _, out, _ = _run(["init-dev"], capsys)
    assert "client_id" not in json.loads(out)


def test_cli_uses_config_and_env(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = workdir / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "auth": {
                    "clients_file": "creds/clients.yaml",
                    "jwt": {"secret_file": "creds/jwt", "audience": "aud-x", "issuer": "iss-x"},
                }
            }
        )
    )
    monkeypatch.setenv(ENV, SECRET)
    code, out, _ = _run(["init-dev", "--config", str(config)], capsys)
    assert code == 0
    created = json.loads(out)
    assert "jwt_secret_file" not in created  # the env var provides the secret
    assert not (workdir / "creds" / "jwt").exists()
    assert created["clients_file"] == "creds/clients.yaml"
    assert (workdir / "creds" / "clients.yaml").exists()

    code, out, _ = _run(["mint", "--sub", "dev", "--config", str(config)], capsys)
    service = TokenService(JwtConfig(audience="aud-x", issuer="iss-x"), secret=SECRET)
    assert service.verify(f"Bearer {out.strip()}", SCOPE_READ).subject == "dev"


def test_ensure_dev_secrets_rs256_creates_no_secret(workdir: Path) -> None:
    created = tokens.ensure_dev_secrets(AuthConfig(jwt=JwtConfig(algorithm="RS256")))
    assert "jwt_secret_file" not in created
    assert created["client_id"] == "dev"
    assert not (workdir / ".secrets" / "jwt_secret").exists()


def test_cli_requires_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        tokens.main([])
    with pytest.raises(SystemExit):
        tokens.main(["mint"])  # --sub is required
    assert "usage" in capsys.readouterr().err
