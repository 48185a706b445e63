"""`python -m serve.api.tokens`: operator tools for the signal API's credentials.

    mint --sub NAME [--scope S ...] [--ttl SECONDS]   print a signed JWT (and nothing else)
    add-client --id NAME [--scope S ...]              register a client, print its secret once
    init-dev                                          create the dev JWT secret and dev client

Each takes `--config SERVE_YAML` (its `auth` section applies; default: built-in defaults).
Secrets go to stdout exactly once and never to the log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
from pathlib import Path

from configs.schema import ALL_SCOPES, SCOPE_READ, AuthConfig, ServeConfig, load_config
from serve.api.auth import KeyConfigError, TokenService
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
    mint.add_argument("--ttl", type=int, help="lifetime in seconds (default: jwt.token_ttl_s)")

    add = sub.add_parser("add-client", parents=[common], help="register an API client")
    add.add_argument("--id", required=True, dest="client_id", help="the client id")
    add.add_argument(
        "--scope",
        action="extend",
        nargs="+",
        help=f"scope(s) the client may obtain, repeatable (default: {SCOPE_READ})",
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

    # init-dev
    print(json.dumps(ensure_dev_secrets(auth), sort_keys=True), flush=True)
    return 0


def _warn_unknown_scopes(scopes: list[str]) -> None:
    unknown = sorted(set(scopes) - set(ALL_SCOPES))
    if unknown:
        log.warning("scopes %s are not used by the API (known: %s)", unknown, list(ALL_SCOPES))


if __name__ == "__main__":
    sys.exit(main())
