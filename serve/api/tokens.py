"""`python -m serve.api.tokens`: operator tools for the signal API's credentials.

    mint --sub NAME [--scope S ...] [--ttl SECONDS]   print a signed JWT (and nothing else)
    add-client --id NAME [--scope S ...]              register a client, print its secret once
    remove-client --id NAME                           delete a client; its tokens are refused
    disable-client --id NAME                          refuse its tokens and POST /token
    enable-client --id NAME                           undo disable-client
    revoke (--jti JTI | --token TOKEN|-)              refuse one token (TOKEN "-": from stdin)
    init-dev                                          create the dev JWT secret and dev client

Each takes `--config SERVE_YAML` (its `auth` section applies; default: built-in defaults).
Secrets go to stdout exactly once and never to the log. The client commands rewrite the clients
file, which every API replica re-reads within `auth.clients_reload_interval_s`. `mint` signs
only for a registered, enabled client (any other token would be refused) and no longer than
`jwt.max_ttl_s`. Errors are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path

from configs.schema import ALL_SCOPES, SCOPE_READ, AuthConfig, ServeConfig, load_config
from serve.api.auth import KeyConfigError, TokenService, read_token_identity
from serve.api.clients import ClientStore

log = logging.getLogger(__name__)

DEV_CLIENT_ID = "dev"
DEV_CLIENT_SCOPES: tuple[str, ...] = ALL_SCOPES


def ensure_dev_secrets(auth: AuthConfig) -> dict[str, str]:
    """Create what a local run needs and is missing; return a description of what was made.

    - HS256 only: the JWT secret file (`secrets.token_urlsafe(48)`, mode 0600), when env var
      `jwt.secret_env` is unset and `jwt.secret_file` does not exist.
    - a client "dev" with scopes signals:read and signals:predict, when the clients file has
      no clients.

    The returned mapping has `jwt_secret_file` if the secret was created and `client_id`,
    `client_secret`, `scopes` (space-separated) and `clients_file` if the dev client was. The
    dev client's secret is in it because this is the only time it exists in clear; the JWT
    secret is never returned. An empty mapping means everything was already in place.
    """
    created: dict[str, str] = {}
    jwt_config = auth.jwt
    if jwt_config.algorithm == "HS256":
        if os.environ.get(jwt_config.secret_env):
            log.info("JWT secret comes from env var %s; no file created", jwt_config.secret_env)
        elif jwt_config.secret_file is None:
            log.warning(
                "no JWT secret: env var %s is unset and jwt.secret_file is not configured",
                jwt_config.secret_env,
            )
        elif _create_secret_file(Path(jwt_config.secret_file)):
            created["jwt_secret_file"] = jwt_config.secret_file
    else:
        log.info("RS256: keys are provisioned by the operator; no JWT secret created")

    store = ClientStore.load(auth.clients_file)
    if len(store) == 0:
        secret = store.add(DEV_CLIENT_ID, DEV_CLIENT_SCOPES)
        created.update(
            client_id=DEV_CLIENT_ID,
            client_secret=secret,
            scopes=" ".join(sorted(DEV_CLIENT_SCOPES)),
            clients_file=auth.clients_file,
        )
    return created


def token_subject(store: ClientStore, scope: str) -> str | None:
    """A client to mint an operator's token for: the dev client if it is registered and
    enabled, else the first enabled client (by id) granted `scope`; None if there is none."""
    dev = store.get(DEV_CLIENT_ID)
    if dev is not None and not dev.disabled:
        return DEV_CLIENT_ID
    for client_id in store.client_ids():
        entry = store.get(client_id)
        if entry is not None and not entry.disabled and scope in entry.scopes:
            return client_id
    return None


def _create_secret_file(path: Path) -> bool:
    """Write a fresh secret to `path` (mode 0600) unless it exists; True when created."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        # O_EXCL: never overwrite a secret that appeared meanwhile (tokens signed with it
        # would silently stop verifying). The mode is set at creation, never briefly wider.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        log.info("JWT secret file %s already exists; kept", path)
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secrets.token_urlsafe(48) + "\n")
    log.info("created JWT secret file %s", path)
    return True


def _auth_config(path: str | None) -> AuthConfig:
    return load_config(path, ServeConfig).auth if path else AuthConfig()


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="serve YAML (ServeConfig) whose `auth` section applies")
    parser = argparse.ArgumentParser(
        prog="python -m serve.api.tokens", description="Signal API credentials (tokens, clients)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    mint = sub.add_parser("mint", parents=[common], help="print a signed JWT")
    mint.add_argument("--sub", required=True, help="the token's subject (client id)")
    mint.add_argument(
        "--scope",
        action="extend",
        nargs="+",
        help=f"scope(s) to grant, repeatable (default: {SCOPE_READ})",
    )
    mint.add_argument(
        "--ttl",
        type=int,
        help="lifetime in seconds (default: jwt.token_ttl_s; at most jwt.max_ttl_s)",
    )

    add = sub.add_parser("add-client", parents=[common], help="register an API client")
    add.add_argument("--id", required=True, dest="client_id", help="the client id")
    add.add_argument(
        "--scope",
        action="extend",
        nargs="+",
        help=f"scope(s) the client may obtain, repeatable (default: {SCOPE_READ})",
    )

    for name, text in (
        ("remove-client", "delete a client: its secret and tokens stop working"),
        ("disable-client", "refuse a client's tokens and token requests"),
        ("enable-client", "accept a disabled client again"),
    ):
        command = sub.add_parser(name, parents=[common], help=text)
        command.add_argument("--id", required=True, dest="client_id", help="the client id")

    revoke = sub.add_parser("revoke", parents=[common], help="refuse one token")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--jti",
        help="the token's jti claim (kept for jwt.max_ttl_s); one that begins with '-' (not "
        "minted here) as --jti=JTI",
    )
    which.add_argument(
        "--token",
        help="the token itself, or - to read it from stdin (keeps it out of shell history); "
        "its jti and exp are read from it",
    )

    sub.add_parser("init-dev", parents=[common], help="create the dev JWT secret and client")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Logs go to stderr so stdout carries only the token/secret/JSON, ready for scripts.
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    auth = _auth_config(args.config)

    if args.command == "mint":
        scopes = args.scope or [SCOPE_READ]
        _warn_unknown_scopes(scopes)
        try:
            service = TokenService.from_config(auth.jwt)
            _require_enabled_client(auth, args.sub)
            token, _ = service.mint(args.sub, scopes, ttl_s=args.ttl)
        except (KeyConfigError, ValueError) as exc:
            log.error("cannot mint: %s", exc)
            return 2
        print(token, flush=True)
        return 0

    if args.command == "add-client":
        scopes = args.scope or [SCOPE_READ]
        _warn_unknown_scopes(scopes)
        store = ClientStore.load(auth.clients_file)
        try:
            secret = store.add(args.client_id, scopes)
        except ValueError as exc:
            log.error("cannot add client: %s", exc)
            return 2
        print(secret, flush=True)
        return 0

    if args.command in ("remove-client", "disable-client", "enable-client"):
        try:
            store = ClientStore.load(auth.clients_file)
            if args.command == "remove-client":
                store.remove(args.client_id)
            else:
                store.set_disabled(args.client_id, args.command == "disable-client")
        except ValueError as exc:
            log.error("cannot %s: %s", args.command.replace("-client", ""), exc)
            return 2
        return 0

    if args.command == "revoke":
        try:
            _revoke(auth, args.jti, args.token)
        except ValueError as exc:
            log.error("cannot revoke: %s", exc)
            return 2
        return 0

    # init-dev
    print(json.dumps(ensure_dev_secrets(auth), sort_keys=True), flush=True)
    return 0


def _require_enabled_client(auth: AuthConfig, client_id: str) -> None:
    """ValueError unless `client_id` is a registered, enabled client: the API refuses the
    tokens of any other subject, so minting one would only hand out a useless token."""
    entry = ClientStore.load(auth.clients_file).get(client_id)
    if entry is None:
        raise ValueError(
            f"{client_id!r} is not a client in {auth.clients_file} (register it with add-client)"
        )
    if entry.disabled:
        raise ValueError(f"client {client_id!r} is disabled (enable-client to accept it again)")


def _revoke(auth: AuthConfig, jti: str | None, token: str | None) -> None:
    """Add one token to the clients file's revoked list: by `jti`, kept as long as any token
    could still be accepted (the lifetime cap plus the leeway), or by the token itself, kept
    until its `exp`."""
    now = int(time.time())
    if token is not None:
        text = sys.stdin.read() if token == "-" else token
        identity = read_token_identity(text)
        if identity.token_id is None:
            raise ValueError(
                "the token has no jti claim; disable-client or remove-client its subject instead"
            )
        jti = identity.token_id
        # A token without exp fails verification anyway; keep its entry like a bare jti's.
        default_until = now + auth.jwt.leeway_s + auth.jwt.max_ttl_s
        expires_at = identity.expires_at if identity.expires_at is not None else default_until
        if expires_at + auth.jwt.leeway_s < now:
            log.info("token %s expired at %d and is refused anyway", jti, expires_at)
    else:
        assert jti is not None  # argparse: one of --jti and --token is required
        # Any token accepted from now on was issued at most leeway_s ahead and lives at most
        # max_ttl_s, so it expires before this.
        expires_at = now + auth.jwt.leeway_s + auth.jwt.max_ttl_s
    ClientStore.load(auth.clients_file).revoke(jti, expires_at)


def _warn_unknown_scopes(scopes: list[str]) -> None:
    unknown = sorted(set(scopes) - set(ALL_SCOPES))
    if unknown:
        log.warning("scopes %s are not used by the API (known: %s)", unknown, list(ALL_SCOPES))


if __name__ == "__main__":
    sys.exit(main())
