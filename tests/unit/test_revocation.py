"""Revocation of API credentials: removed and disabled clients and revoked token ids are refused
by the running API once it has re-read the clients file (written by the token CLI), the file's
reload survives broken and deleted files and concurrent use, and no token lives longer than
`jwt.max_ttl_s`."""

from __future__ import annotations

import io
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from configs.schema import (
    MAX_JWT_LEEWAY_S,
    SCOPE_PREDICT,
    SCOPE_READ,
    AuthConfig,
    GoldConfig,
    JwtConfig,
    ServeConfig,
)
from serve.api import tokens as cli
from serve.api.auth import AuthError, Claims, TokenService, read_token_identity
from serve.api.clients import UNKNOWN_CLIENT_CHECK_S, ClientStore, RevokedToken, verify_secret
from serve.api.metrics import ApiMetrics
from serve.api.operator import make_operator_api
from serve.api.routes import make_api
from tests.serve_support import NoEngine

SECRET = "revocation-secret-" + "r" * 40
INTERVAL_S = 2.0


class Clock:
    """A settable clock: monotonic seconds for the reload cadence, or epoch seconds."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Deployment:
    """The API over a clients file, as a replica runs it, plus the operator's CLI on that file."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("QUANT_AI_REVOCATION_SECRET", SECRET)
        self.clients_file = tmp_path / "clients.yaml"
        self.config = ServeConfig(
            registry=str(tmp_path / "registry"),
            auth=AuthConfig(
                jwt=JwtConfig(secret_env="QUANT_AI_REVOCATION_SECRET", secret_file=None),
                clients_file=str(self.clients_file),
                clients_reload_interval_s=INTERVAL_S,
            ),
            gold=GoldConfig(url=f"sqlite:///{tmp_path / 'gold.sqlite'}"),
        )
        self.config_file = tmp_path / "serve.yaml"
        self.config_file.write_text(yaml.safe_dump(self.config.model_dump(mode="json")))
        self.secrets = {
            "desk": self.cli_out("add-client", "--id", "desk", "--scope", SCOPE_READ),
            "other": self.cli_out("add-client", "--id", "other", "--scope", SCOPE_READ),
        }
        self.clock = Clock()
        self.store = ClientStore.load(
            self.clients_file, reload_interval_s=INTERVAL_S, clock=self.clock
        )
        self.tokens = TokenService.from_config(self.config.auth.jwt)
        backend = NoEngine()
        metrics = ApiMetrics(backend.snapshot, time.time)
        self.client = TestClient(
            make_api(backend, self.config, self.tokens, self.store, metrics=metrics)
        )
        self.operator = TestClient(make_operator_api(backend.snapshot, metrics))

    def cli(self, *argv: str) -> int:
        return cli.main([*argv, "--config", str(self.config_file)])

    def cli_out(self, *argv: str) -> str:
        out = io.StringIO()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("sys.stdout", out)
            assert self.cli(*argv) == 0
        return out.getvalue().strip()

    def token(self, subject: str = "desk") -> str:
        return self.tokens.mint(subject, [SCOPE_READ])[0]

    def models(self, token: str) -> Any:
        """An authenticated route that needs no engine: 503 means the token was accepted."""
        return self.client.get("/models/current", headers={"Authorization": f"Bearer {token}"})

    def post_token(self, client_id: str) -> Any:
        form = {
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_secret": self.secrets[client_id],
        }
        return self.client.post("/token", data=form)

    def count_stats(self, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
        """From now on, every `stat` of the clients file by the store, in a list."""
        stats: list[Any] = []
        real_stat = os.stat

        def counting_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            if Path(path) == self.clients_file:
                stats.append(path)
            return real_stat(path, *args, **kwargs)

        monkeypatch.setattr("serve.api.clients.os.stat", counting_stat)
        return stats

    def wait_reload(self) -> None:
        """Let the reload interval pass (the file is checked on the next request)."""
        self.clock.now += INTERVAL_S


ACCEPTED = 503  # /models/current without an engine: past authentication


def refused(response: Any, code: str = "revoked_token") -> bool:
    return (
        response.status_code == 401
        and response.json()["error"] == code
        and response.headers["WWW-Authenticate"].startswith("Bearer")
    )


@pytest.fixture
def dep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Deployment:
    return Deployment(tmp_path, monkeypatch)


def auth_failures(operator: TestClient) -> dict[str, float]:
    """`quant_ai_auth_failures_total` by reason, as the operator port exports it."""
    families = {f.name: f for f in text_string_to_metric_families(operator.get("/metrics").text)}
    return {
        s.labels["reason"]: s.value
        for s in families["quant_ai_auth_failures"].samples
        if s.name.endswith("_total")
    }


# ---------------------------------------------------------------------- through the API


def test_removed_client_is_refused_once_the_file_is_reloaded(dep: Deployment) -> None:
    token = dep.token()
    assert dep.models(token).status_code == ACCEPTED
    assert auth_failures(dep.operator)["revoked_token"] == 0  # pre-registered label
    assert dep.cli("remove-client", "--id", "desk") == 0
    assert "desk" not in ClientStore.load(dep.clients_file)
    dep.wait_reload()
    answer = dep.models(token)
    assert refused(answer), answer.text
    assert answer.json()["detail"] == "the token's client has been removed or disabled"
    assert auth_failures(dep.operator)["revoked_token"] == 1
    # Its secret no longer buys a token either; the other client is untouched.
    assert dep.post_token("desk").json()["error"] == "invalid_client"
    assert dep.models(dep.token("other")).status_code == ACCEPTED
    # Revoked before the scope is looked at: a 401, not the 403 of a missing scope.
    narrow = dep.tokens.mint("desk", [])[0]
    assert refused(
        dep.client.get("/signal?symbol=SIMBTC", headers={"Authorization": f"Bearer {narrow}"})
    )


def test_the_file_is_checked_at_most_once_per_interval(
    dep: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = dep.token()
    assert dep.models(token).status_code == ACCEPTED  # the first check, at start
    stats = dep.count_stats(monkeypatch)
    assert dep.cli("remove-client", "--id", "desk") == 0
    dep.clock.now += INTERVAL_S - 0.01
    # Within the interval the replica has not looked yet: the token is still served.
    assert all(dep.models(token).status_code == ACCEPTED for _ in range(20))
    assert stats == []
    dep.clock.now += 0.01
    assert [refused(dep.models(token)) for _ in range(20)] == [True] * 20
    assert len(stats) == 1


def test_disabled_client_is_refused_and_accepted_again_when_enabled(dep: Deployment) -> None:
    token = dep.token()
    assert dep.post_token("desk").status_code == 200
    assert dep.cli("disable-client", "--id", "desk") == 0
    dep.wait_reload()
    assert refused(dep.models(token))
    # POST /token refuses it with the answer of a wrong secret, after the same scrypt.
    denied = dep.post_token("desk")
    assert denied.status_code == 401 and denied.json()["error"] == "invalid_client"
    assert "WWW-Authenticate" in denied.headers
    assert dep.models(dep.token("other")).status_code == ACCEPTED

    assert dep.cli("enable-client", "--id", "desk") == 0
    dep.wait_reload()
    assert dep.models(token).status_code == ACCEPTED
    issued = dep.post_token("desk")
    assert issued.status_code == 200
    assert dep.models(issued.json()["access_token"]).status_code == ACCEPTED


def test_revoked_jti_is_refused_while_the_clients_other_tokens_work(dep: Deployment) -> None:
    first, second, third = dep.token(), dep.token(), dep.token()
    jti = jwt.decode(first, options={"verify_signature": False})["jti"]
    assert dep.cli("revoke", "--jti", jti) == 0
    dep.wait_reload()
    answer = dep.models(first)
    assert refused(answer) and answer.json()["detail"] == "the token has been revoked"
    assert dep.models(second).status_code == ACCEPTED

    # By the token itself, as an operator pastes it.
    assert dep.cli("revoke", "--token", second) == 0
    dep.wait_reload()
    assert refused(dep.models(second))
    assert dep.models(third).status_code == ACCEPTED
    assert set(ClientStore.load(dep.clients_file).revoked_token_ids()) == {
        jti,
        jwt.decode(second, options={"verify_signature": False})["jti"],
    }


def test_a_minted_jti_is_revocable_with_the_cli_whatever_its_random_bytes(
    dep: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`revoke --jti JTI` must take every jti the API mints. Bytes 0xf8 start a base64url text
    with "-", which argparse reads as an option instead of the value of --jti."""
    monkeypatch.setattr(secrets, "token_bytes", lambda nbytes=None: b"\xf8" * (nbytes or 32))
    token = dep.token()
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    assert dep.cli("revoke", "--jti", jti) == 0
    dep.wait_reload()
    assert refused(dep.models(token))
    # A jti beginning with "-" from another issuer goes in the documented `--jti=JTI` form.
    assert dep.cli("revoke", "--jti=-issued-elsewhere") == 0
    assert set(ClientStore.load(dep.clients_file).revoked_token_ids()) == {
        jti,
        "-issued-elsewhere",
    }


def test_revoke_reads_the_token_from_stdin(
    dep: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = dep.token()
    monkeypatch.setattr("sys.stdin", io.StringIO(token + "\n"))
    assert dep.cli("revoke", "--token", "-") == 0
    dep.wait_reload()
    assert refused(dep.models(token))
    claims = jwt.decode(token, options={"verify_signature": False})
    # Kept exactly until the token's own expiry.
    assert ClientStore.load(dep.clients_file).revoked_token_ids() == {claims["jti"]: claims["exp"]}


def test_cli_errors_are_one_line_and_exit_2(
    dep: Deployment, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    capsys.readouterr()
    unsigned = jwt.encode({"sub": "desk"}, "k" * 40, algorithm="HS256")  # no jti
    for argv in (
        ("remove-client", "--id", "ghost"),
        ("disable-client", "--id", "ghost"),
        ("enable-client", "--id", "ghost"),
        ("revoke", "--token", "not-a-token"),
        ("revoke", "--token", unsigned),
        ("mint", "--sub", "ghost"),
        ("mint", "--sub", "desk", "--ttl", str(86_400 + 1)),
    ):
        caplog.clear()
        assert dep.cli(*argv) == 2, argv
        assert capsys.readouterr().out == ""
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "\n" not in errors[0], (argv, errors)
    assert "exceeds the maximum token lifetime of 86400 s" in errors[0]
    assert dep.cli("disable-client", "--id", "desk") == 0
    caplog.clear()
    assert dep.cli("mint", "--sub", "desk") == 2
    assert "is disabled" in caplog.text


def test_a_client_added_after_the_start_is_accepted_after_the_reload(dep: Deployment) -> None:
    dep.secrets["late"] = dep.cli_out("add-client", "--id", "late", "--scope", SCOPE_READ)
    dep.wait_reload()
    issued = dep.post_token("late")
    assert issued.status_code == 200, issued.text
    assert dep.models(issued.json()["access_token"]).status_code == ACCEPTED


def test_a_client_another_replica_just_added_is_accepted_within_the_interval(
    dep: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica sharing the file adds a client and issues it a token: this replica checks
    the file again for the unknown client (at most once per UNKNOWN_CLIENT_CHECK_S) instead of
    refusing it for the rest of its reload interval."""
    assert dep.models(dep.token()).status_code == ACCEPTED  # the regular check, at start
    stats = dep.count_stats(monkeypatch)
    dep.secrets["late"] = dep.cli_out("add-client", "--id", "late", "--scope", SCOPE_READ)
    late = dep.token("late")  # as minted by the replica that has read the new file
    # Right after the regular check, unknown clients wait for the short recheck interval.
    assert all(refused(dep.models(late)) for _ in range(5))
    assert stats == []
    dep.clock.now += UNKNOWN_CLIENT_CHECK_S
    assert UNKNOWN_CLIENT_CHECK_S < INTERVAL_S
    assert all(dep.models(late).status_code == ACCEPTED for _ in range(5))
    assert len(stats) == 1
    # A token of a client that stays unknown costs one stat per recheck interval, not per request.
    ghost = dep.token("ghost")
    dep.clock.now += UNKNOWN_CLIENT_CHECK_S
    assert all(refused(dep.models(ghost)) for _ in range(20))
    assert len(stats) == 2


def test_a_token_over_the_lifetime_cap_is_refused_by_the_api(dep: Deployment) -> None:
    now = int(time.time())
    claims = {"sub": "desk", "aud": "quant-ai", "iss": "quant-ai", "iat": now, "scope": SCOPE_READ}
    longest = jwt.encode({**claims, "exp": now + 86_400}, SECRET, algorithm="HS256")
    too_long = jwt.encode({**claims, "exp": now + 86_401}, SECRET, algorithm="HS256")
    assert dep.models(longest).status_code == ACCEPTED
    answer = dep.models(too_long)
    assert answer.status_code == 401 and answer.json()["error"] == "invalid_token"
    assert "lifetime" in answer.json()["detail"]


# ------------------------------------------------------------------ the client store


def test_check_token_lookups(tmp_path: Path) -> None:
    store = ClientStore.load(tmp_path / "clients.yaml")
    store.add("desk", [SCOPE_READ])
    store.revoke("gone", 2_000_000_000)

    def claims(subject: str, token_id: str | None) -> Claims:
        return Claims(subject, frozenset({SCOPE_READ}), 0, 2_000_000_000, token_id)

    store.check_token(claims("desk", "kept"))
    store.check_token(claims("desk", None))  # no jti: revocable only with its client
    for subject, token_id in (("desk", "gone"), ("ghost", "kept")):
        with pytest.raises(AuthError) as info:
            store.check_token(claims(subject, token_id))
        assert (info.value.status, info.value.code) == (401, "revoked_token")


def test_revoked_entries_are_pruned_after_their_tokens_expire(tmp_path: Path) -> None:
    wall = Clock(1_700_000_000.0)
    path = tmp_path / "clients.yaml"
    store = ClientStore.load(path, wall_clock=wall)
    store.add("desk", [SCOPE_READ])
    store.revoke("short", int(wall.now) + 60)
    store.revoke("long", int(wall.now) + 3_600)
    assert set(ClientStore.load(path).revoked_token_ids()) == {"short", "long"}
    # Within the largest leeway past its expiry a token may still be accepted: kept.
    wall.now += 60 + MAX_JWT_LEEWAY_S
    store.set_disabled("desk", False)
    assert set(ClientStore.load(path).revoked_token_ids()) == {"short", "long"}
    wall.now += 1
    store.set_disabled("desk", False)  # any write prunes
    assert ClientStore.load(path).revoked_token_ids() == {"long": 1_700_003_600}
    wall.now += 3_600
    store.add("other", [SCOPE_READ])
    assert ClientStore.load(path).revoked_token_ids() == {}
    assert "revoked_tokens: []" in path.read_text()


def test_revoke_by_jti_is_kept_for_the_longest_possible_lifetime(dep: Deployment) -> None:
    before = int(time.time())
    assert dep.cli("revoke", "--jti", "abc") == 0
    kept = ClientStore.load(dep.clients_file).revoked_token_ids()["abc"]
    # Any token accepted from now on expires by now + leeway (10 s) + max_ttl_s.
    assert before + 10 + 86_400 <= kept <= int(time.time()) + 10 + 86_400


def test_broken_file_keeps_the_last_good_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "clients.yaml"
    ClientStore.load(path).add("desk", [SCOPE_READ])
    clock = Clock()
    store = ClientStore.load(path, reload_interval_s=1.0, clock=clock)
    desk = Claims("desk", frozenset({SCOPE_READ}), 0, 0, "t")
    good = path.read_text()
    for broken in (
        "clients: [unclosed\n",
        "clients:\n  - client_id: desk\n    secret_hash: scrypt$HASHVALUE\n    extra: 1\n",
        "\xff\xfe not utf-8",
    ):
        path.write_bytes(broken.encode("latin-1"))
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="serve.api.clients"):
            clock.now += 1.0
            store.check_token(desk)  # still the last good set: accepted
            assert "keeping the last good 1 API client(s)" in caplog.text
            assert "HASHVALUE" not in caplog.text
            # Logged once, not at every interval while the file stays broken.
            caplog.clear()
            clock.now += 1.0
            store.check_token(desk)
            assert caplog.text == ""
    path.write_text(good.replace("disabled: false", "disabled: true"))
    clock.now += 1.0
    with pytest.raises(AuthError, match="revoked_token"):
        store.check_token(desk)


def test_deleted_file_means_no_clients(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "clients.yaml"
    secret = ClientStore.load(path).add("desk", [SCOPE_READ])
    clock = Clock()
    store = ClientStore.load(path, reload_interval_s=1.0, clock=clock)
    desk = Claims("desk", frozenset({SCOPE_READ}), 0, 0, None)
    saved = path.read_text()
    path.unlink()
    clock.now += 1.0
    with (
        caplog.at_level(logging.ERROR, logger="serve.api.clients"),
        pytest.raises(AuthError, match="revoked_token"),
    ):
        store.check_token(desk)
    assert "has disappeared" in caplog.text
    with pytest.raises(AuthError, match="invalid_client"):
        store.authenticate("desk", secret)
    path.write_text(saved)
    clock.now += 1.0
    store.check_token(desk)
    assert store.authenticate("desk", secret).client_id == "desk"


def test_disabled_client_costs_one_scrypt_like_any_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ClientStore.load(tmp_path / "clients.yaml")
    secret = store.add("desk", [SCOPE_READ])
    store.set_disabled("desk", True)
    calls: list[str] = []

    def counting_verify(presented: str, encoded: str) -> bool:
        calls.append(encoded)
        return verify_secret(presented, encoded)

    monkeypatch.setattr("serve.api.clients.verify_secret", counting_verify)
    with pytest.raises(AuthError) as info:
        store.authenticate("desk", secret)
    assert info.value.code == "invalid_client" and len(calls) == 1
    assert info.value.detail == "unknown client id or wrong client secret"


def test_concurrent_requests_during_reloads_see_whole_files(tmp_path: Path) -> None:
    """Requests on many threads while the file is rewritten over and over with interval 0:
    no request fails other than by `AuthError`, the steady client is never refused and the
    churned one is accepted or refused, never anything else."""
    path = tmp_path / "clients.yaml"
    writer = ClientStore.load(path)
    writer.add("steady", [SCOPE_READ])
    store = ClientStore.load(path, reload_interval_s=0.0)
    steady = Claims("steady", frozenset({SCOPE_READ}), 0, 0, "s")
    churn = Claims("churn", frozenset({SCOPE_READ}), 0, 0, "c")
    stop = threading.Event()
    errors: list[BaseException] = []
    outcomes: set[str] = set()

    def reader() -> None:
        try:
            while not stop.is_set():
                store.check_token(steady)
                try:
                    store.check_token(churn)
                    outcomes.add("accepted")
                except AuthError as err:
                    outcomes.add(err.code)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        for round_ in range(15):
            writer.add("churn", [SCOPE_READ])
            writer.revoke(f"jti-{round_}", 2_000_000_000)
            writer.remove("churn")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert errors == []
    assert outcomes <= {"accepted", "revoked_token"} and "revoked_token" in outcomes


def test_concurrent_writers_do_not_lose_changes(tmp_path: Path) -> None:
    """Two stores on one file (two operators' CLIs) writing at once: every change lands."""
    path = tmp_path / "clients.yaml"
    ClientStore.load(path).add("base", [SCOPE_READ])
    stores = [ClientStore.load(path), ClientStore.load(path)]
    barrier = threading.Barrier(2)

    def revoke_many(store: ClientStore, prefix: str) -> None:
        barrier.wait()
        for n in range(20):
            store.revoke(f"{prefix}-{n}", 2_000_000_000)

    threads = [
        threading.Thread(target=revoke_many, args=(store, prefix))
        for store, prefix in zip(stores, ("a", "b"), strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(ClientStore.load(path).revoked_token_ids()) == 40


def test_file_format_is_backward_compatible(tmp_path: Path) -> None:
    path = tmp_path / "clients.yaml"
    path.write_text("clients:\n  - client_id: old\n    secret_hash: h\n    scopes: []\n")
    store = ClientStore.load(path)
    entry = store.get("old")
    assert entry is not None and not entry.disabled
    assert store.revoked_token_ids() == {}
    with pytest.raises(ValidationError):
        RevokedToken(jti="", expires_at=1)


def test_token_subject_prefers_the_dev_client(tmp_path: Path) -> None:
    store = ClientStore.load(tmp_path / "clients.yaml")
    assert cli.token_subject(store, SCOPE_READ) is None
    store.add("zeta", [SCOPE_READ])
    store.add("alpha", [SCOPE_PREDICT])
    assert cli.token_subject(store, SCOPE_READ) == "zeta"
    store.add("dev", [SCOPE_READ])
    assert cli.token_subject(store, SCOPE_READ) == "dev"
    store.set_disabled("dev", True)
    assert cli.token_subject(store, SCOPE_READ) == "zeta"


# -------------------------------------------------------------------- lifetime cap


def test_mint_and_verify_respect_the_lifetime_cap() -> None:
    config = JwtConfig(token_ttl_s=60, max_ttl_s=3_600)
    service = TokenService(config, secret=SECRET)
    now = 1_700_000_000
    token, expires_in = service.mint("desk", [SCOPE_READ], ttl_s=3_600, now=now)
    assert expires_in == 3_600
    assert service.verify(f"Bearer {token}", SCOPE_READ, now=now).expires_at == now + 3_600
    with pytest.raises(ValueError, match="exceeds the maximum token lifetime of 3600 s"):
        service.mint("desk", [SCOPE_READ], ttl_s=3_601, now=now)
    # Signed elsewhere with the same key: refused whatever its remaining time.
    longer = TokenService(JwtConfig(max_ttl_s=7_200), secret=SECRET)
    token, _ = longer.mint("desk", [SCOPE_READ], ttl_s=3_601, now=now)
    with pytest.raises(AuthError) as info:
        service.verify(f"Bearer {token}", SCOPE_READ, now=now + 3_000)
    assert info.value.code == "invalid_token" and "3600 s" in info.value.detail


def test_default_ttl_must_fit_under_the_cap() -> None:
    assert JwtConfig().token_ttl_s <= JwtConfig().max_ttl_s == 86_400
    with pytest.raises(ValidationError, match="exceeds max_ttl_s"):
        JwtConfig(token_ttl_s=7_200, max_ttl_s=3_600)


def test_read_token_identity() -> None:
    token = jwt.encode({"jti": "j-1", "exp": 123.9, "sub": "x"}, "k" * 40, algorithm="HS256")
    identity = read_token_identity(token)
    assert (identity.token_id, identity.expires_at) == ("j-1", 123)
    bare = read_token_identity(jwt.encode({"sub": "x"}, "k" * 40, algorithm="HS256"))
    assert (bare.token_id, bare.expires_at) == (None, None)
    with pytest.raises(ValueError, match="not a JWT"):
        read_token_identity("garbage")
