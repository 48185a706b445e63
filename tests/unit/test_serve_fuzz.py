"""Property-based fuzzing of the signal API from its own OpenAPI document.

Every operation the document lists is called with requests schemathesis derives from the
document, ones that satisfy it and ones that break it, under each kind of caller: no token, a
garbage token, a valid token with every scope and, for each scope, a valid token lacking it. The
app runs in-process (no Ray) over an engine serving a registered model and over a backend that
never reports. POST /predict also gets bars no schema can describe (consecutive 1-minute bars,
as many as the model reads, with extreme values) so that the model itself runs on fuzzed input.

Whatever the request, every response must:
- not be a server error (status < 500), except the documented 503 of a service not ready;
- carry a status the operation documents, or one of FRAMEWORK_STATUSES, each with its reason;
- match the documented content type and schema; an error is JSON of exactly the ErrorBody keys;
- hold, in its body or headers, no stack trace, no server path and no secret: not the JWT key,
  the client secret or its hash, nor the bearer token the caller sent.

Everything is read from the document at run time, so routes added or removed are fuzzed without
editing this file. Generation is derandomised and bounded (BASE_SETTINGS, the *_EXAMPLES
counts): the same examples on every run, and no example database written.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, example, given, note, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis import GenerationMode
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from configs.schema import ALL_SCOPES, ServeConfig
from market.klines import ONE_MINUTE_MS
from serve.api import clients as clients_module
from serve.api.auth import TokenService
from serve.api.clients import ClientEntry, ClientStore
from serve.api.routes import make_api
from serve.api.schemas import ErrorBody
from serve.engine.engine import SignalEngine
from serve.engine.online_features import min_history_bars
from serve.local import LocalBackend
from tests.serve_support import NoEngine, register_model
from tests.unit.test_serve_engine import SECRET, FakeClock, config_for

REPO = Path(__file__).resolve().parents[2]

# Statuses an operation may answer without documenting them, and why. Routing answers a known
# path asked with another method before any handler runs; FastAPI documents neither.
FRAMEWORK_STATUSES = {
    405: "a documented path asked with a method the document does not list for it (routing)",
}
NOT_READY = 503
# Answered by routing to a path the document does not list at all.
UNKNOWN_PATH_STATUS = 404

BASE_SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
    suppress_health_check=(
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.function_scoped_fixture,
    ),
)


def fuzz_settings(max_examples: int) -> settings:
    return settings(BASE_SETTINGS, max_examples=max_examples)


EXAMPLES_PER_OPERATION = 6
"""Cases per operation and strategy (valid, invalid, served symbol); each case is sent to both
backends under every caller."""
PREDICT_EXAMPLES = 48
TOKEN_EXAMPLES = 40

CLIENT_ID = "fuzz-desk"
CLIENT_SECRET = "fuzz-client-secret-" + "q" * 30
GARBAGE_TOKEN = "garbage-bearer-" + "g" * 40

# scrypt's cost is read from each stored hash: a cheap one keeps POST /token fast to fuzz, and
# the handling around the check is what is under test. Unknown ids are checked against the
# module's dummy hash, which the fixture swaps for one as cheap.
CHEAP_SCRYPT = (16, 1, 1)


def cheap_hash(secret: str, salt: bytes = b"fuzz-salt-16byte") -> str:
    n, r, p = CHEAP_SCRYPT
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    encoded = (base64.b64encode(salt).decode(), base64.b64encode(digest).decode())
    return "$".join(("scrypt", str(n), str(r), str(p), *encoded))


CLIENT_HASH = cheap_hash(CLIENT_SECRET)


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who calls: `authorization` is the header sent (None: no header)."""

    name: str
    authorization: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.authorization is None else {"Authorization": self.authorization}


@dataclasses.dataclass
class World:
    config: ServeConfig
    tmp: Path
    tokens: TokenService
    engine: SignalEngine
    apps: dict[str, Any]  # backend name -> the FastAPI app
    clients: dict[str, Any]  # backend name -> an in-process HTTP client of its app
    document: dict[str, Any]  # the OpenAPI document (the same for both apps)

    def caller(self, name: str) -> Caller:
        if name == "none":
            return Caller(name, None)
        if name == "garbage":
            return Caller(name, f"Bearer {GARBAGE_TOKEN}")
        scopes = (
            ALL_SCOPES if name == "all-scopes" else [s for s in ALL_SCOPES if f"lacks-{s}" != name]
        )
        token, _ = self.tokens.mint(CLIENT_ID, scopes)
        return Caller(name, f"Bearer {token}")

    def schema(self) -> Any:
        """The document as schemathesis reads it. Cases are sent through `clients`, which pick
        the backend; the bound app only selects schemathesis's in-process transport."""
        loaded = schemathesis.openapi.from_dict(json.loads(json.dumps(self.document)))
        loaded.app = self.apps[BACKENDS[0]]
        return loaded

    def forbidden(self) -> list[str]:
        """Strings no response may hold, whoever asked: key material and credentials."""
        salt, digest = CLIENT_HASH.split("$")[4:]
        return [SECRET, CLIENT_SECRET, CLIENT_HASH, salt, digest]


CALLERS = ("none", "garbage", "all-scopes", *(f"lacks-{scope}" for scope in ALL_SCOPES))
BACKENDS = ("engine", "no-engine")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("fuzz")
    # Hypothesis caches what it learns under its home directory (./.hypothesis by default):
    # not in the repository.
    set_hypothesis_home_dir(str(tmp / "hypothesis"))
    register_model(tmp / "registry", seed=1)
    base = config_for(tmp)
    # Limits no fuzz run reaches: a 429 would stand in for the validation behind it.
    auth = base.auth.model_copy(
        update={
            "rate_limit_per_minute": 1e9,
            "rate_limit_burst": 10**9,
            "token_rate_limit_per_minute_per_address": 1e9,
            "token_rate_limit_burst_per_address": 10**9,
        }
    )
    config = base.model_copy(update={"auth": auth})
    tokens = TokenService.from_config(config.auth.jwt)
    store = ClientStore(
        [ClientEntry(client_id=CLIENT_ID, secret_hash=CLIENT_HASH, scopes=list(ALL_SCOPES))]
    )
    engine = SignalEngine(config, clock=FakeClock())
    backend = LocalBackend(engine)
    backend.step()
    apps = {
        "engine": make_api(backend, config, tokens, store),
        "no-engine": make_api(NoEngine(), config, tokens, store),
    }
    document = apps["engine"].openapi()
    assert document == apps["no-engine"].openapi()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(clients_module, "_DUMMY_HASH", cheap_hash("dummy", bytes(16)))
        # Clients not entered as context managers: the app's lifespan would start the engine
        # thread, and the engine is stepped by hand above instead.
        clients = {backend: asgi.get_client(app) for backend, app in apps.items()}
        yield World(config, tmp, tokens, engine, apps, clients, document)
    engine.close()


# -- the properties ------------------------------------------------------------------------

ABSOLUTE_PATH = re.compile(
    r"(?<![\w.~-])/(?:work|tmp|home|root|usr|srv|opt|var|etc|proc|private)(?=/|\b)"
)
STACK_TRACE = re.compile(r'Traceback|File "|site-packages|\.py", line')


def request_text(response: Any) -> str:
    """What the caller sent (URL, headers, body), percent-decoded: a server echoing the caller's
    own input back is not leaking anything of its own."""
    request = response.request
    body = request.body or b""
    body_text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    sent = " ".join([str(request.url), *map(str, request.headers.values()), body_text])
    return sent + " " + urllib.parse.unquote_plus(sent)


def assert_no_leak(world: World, caller: Caller, response: Any) -> None:
    headers = "\n".join(f"{name}: {value}" for name, value in response.headers.items())
    text = response.content.decode("utf-8", "replace") + "\n" + headers
    secrets = world.forbidden()
    if caller.authorization is not None:
        secrets.append(caller.authorization.split()[-1])
    for secret in secrets:
        assert secret not in text, f"a secret in the answer: {text[:500]}"
    sent = request_text(response)
    for pattern in (STACK_TRACE, ABSOLUTE_PATH):
        for found in pattern.finditer(text):
            assert found.group() in sent, f"{found.group()!r} in the answer: {text[:500]}"
    for local in (str(REPO), str(world.tmp)):
        assert local not in text or local in sent, f"{local} in the answer: {text[:500]}"


def documented_statuses(world: World, method: str, path: str) -> set[int]:
    return {int(status) for status in world.document["paths"][path][method.lower()]["responses"]}


def assert_error_body(response: Any) -> None:
    body = response.json()
    assert isinstance(body, dict) and list(body) == list(ErrorBody.model_fields), response.text
    assert all(isinstance(value, str) for value in body.values()), response.text


def assert_answer(world: World, caller: Caller, case: Any, response: Any) -> None:
    """Every property of the module docstring, for the answer to one generated case."""
    status = response.status_code
    documented = documented_statuses(world, case.method, case.path)
    # 503 is the API's documented "not ready" (no model, no engine report, stale features).
    not_ready = status == NOT_READY and status in documented
    assert status < 500 or not_ready, f"{case.method} {case.path}: {status} {response.text[:500]}"
    allowed = documented | set(FRAMEWORK_STATUSES)
    assert status in allowed, f"{case.method} {case.path}: undocumented {status}"
    if status >= 400:
        assert_error_body(response)
    assert_no_leak(world, caller, response)
    # The document's own checks: status, content type, headers and body against the schema.
    case.validate_response(
        response,
        checks=[
            status_code_conformance,
            content_type_conformance,
            response_headers_conformance,
            response_schema_conformance,
        ],
    )


# -- fuzzing every operation of the document -----------------------------------------------


def served_symbol_strategies(world: World, operation: Any) -> list[Any]:
    """Cases of `operation` with its `symbol` query set to a served symbol: random symbols are
    almost never served, and the handlers behind that check deserve fuzzing too."""
    names = {
        p["name"] for p in operation.definition.raw.get("parameters", []) if p["in"] == "query"
    }
    if "symbol" not in names:
        return []
    return [
        operation.as_strategy(GenerationMode.POSITIVE, query={"symbol": symbol})
        for symbol in world.config.feed.symbols
    ]


def test_every_operation_answers_as_documented(world: World) -> None:
    """Each case generated for an operation goes to both backends under every caller: the
    generation, the slow part, is paid once per case."""
    schema = world.schema()
    callers = [world.caller(name) for name in CALLERS]
    labels = []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
        if operation.definition.raw.get("parameters") or "requestBody" in operation.definition.raw:
            strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))
        strategies += served_symbol_strategies(world, operation)

        @fuzz_settings(EXAMPLES_PER_OPERATION * len(strategies))
        @given(case=st.one_of(strategies))
        def fuzz(case: Any) -> None:
            for backend in BACKENDS:
                for caller in callers:
                    note(f"backend {backend}, caller {caller.name}")
                    response = case.call(session=world.clients[backend], headers=caller.headers)
                    assert_answer(world, caller, case, response)

        fuzz()
    documented = [
        f"{method.upper()} {path}"
        for path, methods in world.document["paths"].items()
        for method in methods
    ]
    assert sorted(labels) == sorted(documented)


# -- POST /token: credentials that exist ---------------------------------------------------


def token_forms(world: World) -> Any:
    """Forms of the documented shape, with the real client's id and secret mixed in so that the
    grant (200) and scope refusals (403) are reached, and extra fields and odd scopes."""
    form = world.document["paths"]["/token"]["post"]["requestBody"]["content"]
    (media_type,) = form
    grant = form[media_type]["schema"]["properties"]["grant_type"]["const"]
    words = st.sampled_from([*ALL_SCOPES, "admin", "", " ", "signals:read\tsignals:predict"])
    return st.fixed_dictionaries(
        {
            "grant_type": st.just(grant) | st.sampled_from([grant.upper(), "password", ""]),
            "client_id": st.sampled_from([CLIENT_ID, CLIENT_ID.upper(), "", "x" * 200]) | st.text(),
            "client_secret": st.sampled_from([CLIENT_SECRET, CLIENT_SECRET + " ", ""]) | st.text(),
        },
        optional={
            "scope": st.lists(words, max_size=4).map(" ".join) | st.text(),
            "client_secret ": st.text(max_size=5),
        },
    ).map(lambda fields: (media_type, fields))


def test_token_form_answers_as_documented(world: World) -> None:
    operation = world.schema()["/token"]["POST"]
    client = world.clients["no-engine"]
    caller = world.caller("none")
    statuses: set[int] = set()

    form = "application/x-www-form-urlencoded"
    grant = {"grant_type": "client_credentials", "client_id": CLIENT_ID}

    @fuzz_settings(TOKEN_EXAMPLES)
    @given(form=token_forms(world))
    @example(form=(form, {**grant, "client_secret": CLIENT_SECRET, "scope": ALL_SCOPES[0]}))
    @example(form=(form, {**grant, "client_secret": CLIENT_SECRET, "scope": "admin"}))
    @example(form=(form, {**grant, "client_secret": CLIENT_SECRET[:-1]}))
    def fuzz(form: tuple[str, dict[str, str]]) -> None:
        media_type, fields = form
        case = operation.Case(body=urllib.parse.urlencode(fields), media_type=media_type)
        response = case.call(session=client)
        assert_answer(world, caller, case, response)
        statuses.add(response.status_code)
        if response.status_code == 200:
            granted = response.json()
            assert CLIENT_SECRET not in granted["access_token"]
            world.tokens.verify(f"Bearer {granted['access_token']}", granted["scope"].split()[0])

    fuzz()
    assert {200, 401, 403, 422} <= statuses, statuses


# -- POST /predict: bars the model reads ---------------------------------------------------

OVERFLOW = "__overflowing_literal__"
"""Written into the body as 1e999, a literal that overflows a double."""
INVALID = [-1, -0.5, float("nan"), float("inf"), float("-inf"), OVERFLOW, True, "1", None, []]
"""Values no bar field may hold (or that only a lax parser takes)."""


def valid_extremes(field: dict[str, Any]) -> list[Any]:
    """Values at the edges of what the document's schema of one field allows."""
    if field["type"] == "integer":
        low = int(field.get("minimum", field.get("exclusiveMinimum", -1) + 1))
        if "exclusiveMaximum" in field:
            high = int(field["exclusiveMaximum"]) - 1
            return [low, low + 1, high - 1, high]
        return [low, low + 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30]
    edge = [field["minimum"]] if "minimum" in field else [5e-324]
    return [*edge, 1e-300, 1e-8, 1e12, 1e300, 1.7976931348623157e308]


@st.composite
def predict_bodies(draw: Callable[..., Any], bar_schema: dict[str, Any], needed: int) -> bytes:
    """A /predict body: consecutive 1-minute bars at a random price level, half as many as the
    model reads (`needed`, up to 30 more) so that the model runs on them, half fewer. Up to
    four fields, in one bar or in all, are set to values at the edges of the document's schema
    of a bar; in a quarter of the bodies, to values outside it. Bars whose edited prices or
    volumes contradict each other (high below low, taker volume above volume) are put right
    unless the body is meant to be invalid, so that edge values reach the model."""
    properties = bar_schema["properties"]
    bound = int(properties["open_time"]["exclusiveMaximum"])
    # Short bodies are cheap (refused before the features are computed) and still go through
    # the engine's bar frame; each long one costs a feature computation (most of a second here).
    short = draw(st.booleans())
    n = draw(st.integers(1, needed - 1) if short else st.integers(needed, needed + 30))
    last_start = bound - n * ONE_MINUTE_MS
    start = draw(st.integers(0, last_start) | st.sampled_from([0, last_start, last_start + 1]))
    level = draw(st.sampled_from([1.0, 1e-300, 1e-8, 3e4, 1e12, 1e300]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    with np.errstate(over="ignore"):  # an overflow to inf is one more value to send
        close = level * np.exp(np.cumsum(rng.normal(0, draw(st.sampled_from([1e-3, 0, 0.5])), n)))
        open_ = np.concatenate([[close[0]], close[:-1]])
        spread = np.abs(rng.normal(0, 1e-3, n)) * close
        volume = rng.exponential(draw(st.sampled_from([1.0, 0.0, 1e6, 1e300])), n)
        turnover = volume * close
    bars: list[dict[str, Any]] = [
        {
            "open_time": start + k * ONE_MINUTE_MS,
            "open": float(open_[k]),
            "high": float(max(open_[k], close[k]) + spread[k]),
            "low": float(max(min(open_[k], close[k]) - spread[k], min(open_[k], close[k]) / 2)),
            "close": float(close[k]),
            "volume": float(volume[k]),
            "quote_volume": float(turnover[k]),
            "trades": int(rng.integers(0, 10_000)),
            "taker_buy_base": float(volume[k] / 2),
            "taker_buy_quote": float(turnover[k] / 2),
        }
        for k in range(n)
    ]
    invalid = draw(st.integers(0, 3)) == 0
    # A moved time only breaks the sequence: edited in invalid bodies only.
    names = sorted(properties) if invalid else sorted(set(properties) - {"open_time"})
    edits = st.sampled_from(names).flatmap(
        lambda name: st.tuples(
            st.just(name),
            st.sampled_from(valid_extremes(properties[name]) + (INVALID if invalid else [])),
            st.none() | st.integers(0, n - 1),  # None: every bar
        )
    )
    for name, value, where in draw(st.lists(edits, max_size=4)):
        for bar in bars if where is None else [bars[where]]:
            bar[name] = value
    if not invalid:
        for bar in bars:
            bar["high"] = max(bar["high"], bar["open"], bar["close"], bar["low"])
            bar["low"] = min(bar["low"], bar["open"], bar["close"])
            bar["taker_buy_base"] = min(bar["taker_buy_base"], bar["volume"])
    symbol = draw(st.sampled_from(["SIMAAA", "BTCUSDT", "ZZ"]))
    return json.dumps({"symbol": symbol, "bars": bars}).replace(f'"{OVERFLOW}"', "1e999").encode()


def test_predict_with_a_model_answers_as_documented(world: World) -> None:
    operation = world.schema()["/predict"]["POST"]
    body_schema = operation.definition.raw["requestBody"]["content"]["application/json"]["schema"]
    bar_schema = body_schema["properties"]["bars"]["items"]
    serving = world.engine.serving
    assert serving is not None
    needed = min_history_bars(serving.model.spec.window_bars)
    client = world.clients["engine"]
    caller = world.caller("all-scopes")
    statuses: set[int] = set()

    @fuzz_settings(PREDICT_EXAMPLES)
    @given(body=predict_bodies(bar_schema, needed))
    def fuzz(body: bytes) -> None:
        case = operation.Case(body=body, media_type="application/json")
        response = case.call(session=client, headers=caller.headers)
        assert_answer(world, caller, case, response)
        statuses.add(response.status_code)

    fuzz()
    # The model ran (200) and the validation refused (422): both sides of the path were fuzzed.
    assert {200, 422} <= statuses, statuses


# -- what routing answers ------------------------------------------------------------------

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


@pytest.mark.parametrize("backend", BACKENDS)
def test_undocumented_methods_and_paths_are_json_errors(world: World, backend: str) -> None:
    client = world.clients[backend]
    caller = world.caller("all-scopes")
    for path, methods in world.document["paths"].items():
        for method in METHODS:
            if method.lower() in methods:
                continue
            response = client.request(method, path, headers=caller.headers)
            assert response.status_code == 405, (method, path, response.status_code)
            assert_error_body(response)
            assert_no_leak(world, caller, response)
            allow = {m.strip() for m in response.headers.get("Allow", "").split(",")}
            assert {m.upper() for m in methods} <= allow, (method, path, response.headers)

    documented = set(world.document["paths"])

    @fuzz_settings(30)
    @given(
        path=st.from_regex(r"\A/(?:[A-Za-z0-9._~-]+/?){0,4}\Z").filter(
            lambda p: p.rstrip("/") not in documented
        )
    )
    def fuzz(path: str) -> None:
        response = client.request("GET", path, headers=caller.headers)
        assert response.status_code == UNKNOWN_PATH_STATUS, (path, response.status_code)
        assert_error_body(response)
        assert_no_leak(world, caller, response)

    fuzz()
