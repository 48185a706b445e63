"""`read_predict_body`: the /predict body as bar columns, accepting and refusing exactly what the
pydantic models (`PredictIn`) accept and refuse, with their values and their messages."""

from __future__ import annotations

import functools
import json
import random
from datetime import date
from typing import Any

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from configs.schema import SimConfig
from market.bar_columns import BAR_FIELDS, BarColumns
from market.klines import MICROSECOND_THRESHOLD
from market.sim_silver import simulated_bars
from serve.api.predict_input import PredictIn, read_predict_body


@functools.cache
def simulated_day() -> pl.DataFrame:
    return simulated_bars(SimConfig(seed=5, anchor_date=date(2024, 5, 1)), ["SIMAAA"], 1)


def client_bars(n: int) -> list[dict[str, Any]]:
    """The first `n` bars of a simulated day as a client sends them (new dicts each call)."""
    return [
        {k: v for k, v in row.items() if k != "symbol"}
        for row in simulated_day().head(n).iter_rows(named=True)
    ]


def body_of(bars: list[dict[str, Any]], symbol: str = "SIMAAA") -> bytes:
    return json.dumps({"symbol": symbol, "bars": bars}).encode()


def by_models(body: bytes) -> tuple[str, dict[str, list[Any]]] | list[Any]:
    """What PredictIn makes of `body`: (symbol, values by field) or its errors."""
    try:
        payload = PredictIn.model_validate_json(body)
    except ValidationError as error:
        return error.errors(include_url=False, include_context=False, include_input=False)
    return payload.symbol, {name: [getattr(b, name) for b in payload.bars] for name in BAR_FIELDS}


def by_reader(body: bytes) -> tuple[str, dict[str, list[Any]]] | list[Any]:
    try:
        symbol, bars = read_predict_body(body)
    except ValidationError as error:
        return error.errors(include_url=False, include_context=False, include_input=False)
    assert isinstance(bars, BarColumns)
    return symbol, {name: getattr(bars, name).tolist() for name in BAR_FIELDS}


def test_a_plain_body_is_read_without_the_models(monkeypatch: pytest.MonkeyPatch) -> None:
    bars = client_bars(400)
    bars[7] = dict(reversed(bars[7].items()))  # key order is free
    body = body_of(bars)
    expected = by_models(body)

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("a plain body must not go through the models")

    monkeypatch.setattr(PredictIn, "model_validate_json", refuse)
    assert by_reader(body) == expected
    _, columns = read_predict_body(body)
    assert columns.open_time.dtype == np.int64 and columns.trades.dtype == np.int64
    assert columns.close.dtype == np.float64 and columns.one_segment()


BAR = 2  # the bar the cases below edit


def edited(field: str, literal: str) -> bytes:
    """A 4-bar body with bar BAR's `field` written as the JSON `literal`."""
    bars = client_bars(4)
    bars[BAR][field] = "__EDIT__"
    return body_of(bars).replace(b'"__EDIT__"', literal.encode())


EDITS = [
    *(
        (field, literal)
        for field in ("open", "high", "volume", "taker_buy_quote")
        for literal in ("Infinity", "NaN", "1e999", '"1.5"', "true", "null", "0", "-0.0", "-1")
    ),
    ("volume", "12"),  # an integer for a float
    ("volume", str(2**53 + 1)),
    ("volume", str(10**30)),
    ("volume", "1" + "0" * 400),
    ("open_time", "1.714521720e12"),
    ("open_time", '"1714521720000"'),
    ("open_time", str(MICROSECOND_THRESHOLD)),
    ("open_time", "-60000"),
    ("trades", "5.0"),
    ("trades", str(2**63 - 1)),
    ("trades", str(2**63)),
    ("trades", "-1"),
    ("trades", "false"),
    ("low", "100000.0"),  # above high: OHLC inconsistent
    ("high", "0.001"),
    ("taker_buy_base", "1e9"),  # above volume
]


@pytest.mark.parametrize(("field", "literal"), EDITS)
def test_an_edited_bar_is_judged_as_the_models_judge_it(field: str, literal: str) -> None:
    body = edited(field, literal)
    assert by_reader(body) == by_models(body)


def shapes() -> list[bytes]:
    bars = client_bars(4)
    gap = [dict(b) for b in bars]
    gap[3]["open_time"] += 60_000
    missing = [dict(b) for b in bars]
    del missing[1]["trades"]
    extra = [dict(b) for b in bars]
    extra[1]["note"] = 1
    swapped = [dict(b) for b in bars]
    del swapped[1]["trades"]
    swapped[1]["note"] = 1
    plain = body_of(bars)
    return [
        body_of(gap),
        body_of(bars[::-1]),
        body_of([bars[0], bars[0]]),
        body_of(missing),
        body_of(extra),
        body_of(swapped),
        body_of([]),
        body_of(bars, "simaaa"),
        body_of(bars, "SIMAAA\n"),
        body_of(bars, "S" * 21),
        json.dumps({"symbol": "SIMAAA", "bars": bars, "x": 1}).encode(),
        json.dumps({"symbol": "SIMAAA"}).encode(),
        json.dumps({"symbol": 5, "bars": bars}).encode(),
        json.dumps({"symbol": "SIMAAA", "bars": bars[0]}).encode(),
        json.dumps({"symbol": "SIMAAA", "bars": [bars[0], [1, 2]]}).encode(),
        json.dumps([bars]).encode(),
        plain.replace(b'"open": ', b'"open": 1.0, "open": ', 1),  # a repeated key: the last wins
        plain[:-1],
        b"",
        b"\xff",
    ]


@pytest.mark.parametrize("body", shapes())
def test_a_malformed_body_is_judged_as_the_models_judge_it(body: bytes) -> None:
    assert by_reader(body) == by_models(body)


def test_random_edits_are_judged_as_the_models_judge_them() -> None:
    rng = random.Random(11)
    literals = [literal for _, literal in EDITS] + ["0.5", "3", "1e-300", "4e3"]
    for _ in range(150):
        bars = client_bars(3)
        for _ in range(rng.randint(1, 3)):
            bars[rng.randrange(3)][rng.choice(BAR_FIELDS)] = f"__{rng.randrange(len(literals))}__"
        text = json.dumps({"symbol": "SIMAAA", "bars": bars})
        for k, literal in enumerate(literals):
            text = text.replace(f'"__{k}__"', literal)
        body = text.encode()
        assert by_reader(body) == by_models(body), text
