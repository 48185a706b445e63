"""The operators' monitoring assets under `cluster/monitoring/` and the metric names they use.

    cluster/monitoring/
        prometheus/prometheus.yml      scrape config (signal API, Ray), rule_files, 15 s interval
        prometheus/alerts.yml          alert rules
        prometheus/alerts_test.yml     `promtool test rules` unit tests of the alert rules
        grafana/provisioning/...       datasource (uid `quant-ai-prometheus`), dashboard provider
        grafana/dashboards/*.json      the dashboards

`dashboard_metric_names()` and `rule_metric_names()` read every PromQL expression of the
dashboards and the alert rules and return the metric names they reference, so tests can hold
them against what the signal API (`serve.api.metrics.METRIC_NAMES`) and Ray actually export.
`metric_names(expr)` is the small PromQL scanner behind both: it skips label matchers, grouping
clauses, ranges and durations, strings, numbers, Grafana variables, functions, aggregations and
keywords; a name given as `{__name__="..."}` counts, a `__name__=~` regex cannot and is ignored.
Nothing runs at import time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

DATASOURCE_UID = "quant-ai-prometheus"

_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_DURATION = re.compile(r"(?:\d+(?:ms|[smhdwy]))+")
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_GRAFANA_VARIABLE = re.compile(r"\$(?:\{[^}]*\}|[a-zA-Z0-9_]+)")
_NAME_MATCHER = re.compile(r"""__name__\s*=\s*(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)')""")
_OPERATORS = set("+-*/%^=!<>,()@")

# Words that are PromQL syntax, not metric names (case-sensitive as PromQL is, except inf/nan).
# Anything directly followed by "(" is a function or aggregation anyway; this set covers the
# words that may stand without one (`sum by (...) (...)`, `and`, `offset 5m`, `group_left`...).
KEYWORDS = frozenset(
    {
        # binary set operators and modifiers
        "and",
        "or",
        "unless",
        "atan2",
        "bool",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "by",
        "without",
        "offset",
        "start",
        "end",
        # aggregation operators
        "sum",
        "avg",
        "min",
        "max",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "limitk",
        "limit_ratio",
        # functions used in these assets (a name followed by "(" is skipped regardless)
        "rate",
        "irate",
        "increase",
        "delta",
        "idelta",
        "deriv",
        "changes",
        "resets",
        "histogram_quantile",
        "clamp",
        "clamp_min",
        "clamp_max",
        "label_replace",
        "label_join",
        "time",
        "vector",
        "scalar",
        "absent",
        "absent_over_time",
        "avg_over_time",
        "max_over_time",
        "min_over_time",
        "sum_over_time",
        "count_over_time",
        "last_over_time",
        "abs",
        "round",
        "ceil",
        "floor",
        "sort",
        "sort_desc",
    }
)
# Words that introduce a parenthesised list of label names.
_LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_CLOSING = {"{": "}", "[": "]", "(": ")"}


def monitoring_dir() -> Path:
    """`cluster/monitoring/`: the Prometheus and Grafana assets."""
    return Path(__file__).resolve().parent / "monitoring"


def prometheus_dir() -> Path:
    """`cluster/monitoring/prometheus/`: scrape config, alert rules and their promtool tests."""
    return monitoring_dir() / "prometheus"


def dashboard_paths() -> list[Path]:
    """Every Grafana dashboard JSON file under `cluster/monitoring/grafana/dashboards/`."""
    return sorted((monitoring_dir() / "grafana" / "dashboards").glob("*.json"))


def rule_paths() -> list[Path]:
    """The alert rule files named by the scrape config's `rule_files` (relative to it)."""
    config_path = prometheus_dir() / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    paths: list[Path] = []
    for pattern in config.get("rule_files") or []:
        paths.extend(sorted(config_path.parent.glob(str(pattern))))
    return paths


def iter_panels(node: Any) -> Iterator[dict[str, Any]]:
    """Every panel of a dashboard, depth first, through rows (`panels` of collapsed rows and
    the legacy `rows[].panels` layout included)."""
    if isinstance(node, list):
        for item in node:
            yield from iter_panels(item)
        return
    if not isinstance(node, dict):
        return
    if "type" in node or "targets" in node:  # a panel; the dashboard itself has neither
        yield node
    yield from iter_panels(node.get("panels") or [])
    yield from iter_panels(node.get("rows") or [])


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    """The PromQL of every query target (`targets[].expr`) of every panel of `dashboard`."""
    expressions = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets") or []:
            expr = target.get("expr") if isinstance(target, dict) else None
            if isinstance(expr, str) and expr.strip():
                expressions.append(expr)
    return expressions


def rule_expressions(rules_document: dict[str, Any]) -> list[str]:
    """The PromQL `expr` of every alerting and recording rule of a Prometheus rules file."""
    expressions = []
    for group in rules_document.get("groups") or []:
        for rule in group.get("rules") or []:
            expr = rule.get("expr")
            if expr is not None and str(expr).strip():
                expressions.append(str(expr))
    return expressions


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects.

    A scanner, not a full parser: label matchers `{...}`, label lists after `by`, `without`,
    `on`, `ignoring`, `group_left` and `group_right`, ranges and subqueries `[...]`, strings,
    numbers, durations, comments and Grafana variables (`$__rate_interval`, `${x}`) are
    skipped; an identifier directly followed by `(` is a function or aggregation, and PromQL
    keywords are not names. Raises ValueError on a character PromQL does not use, an
    unterminated string, or unbalanced brackets.
    """
    names: set[str] = set()
    i, n, depth = 0, len(expr), 0
    while i < n:
        char = expr[i]
        if char.isspace():
            i += 1
        elif char == "#":
            end = expr.find("\n", i)
            i = n if end < 0 else end + 1
        elif char in "\"'`":
            i = _skip_string(expr, i)
        elif char == "$":
            match = _GRAFANA_VARIABLE.match(expr, i)
            if match is None:
                raise ValueError(f"unexpected '$' at {i} in {expr!r}")
            i = match.end()
        elif char == "{":
            end = _skip_bracketed(expr, i)
            names.update(_names_from_matchers(expr[i + 1 : end - 1]))
            i = end
        elif char == "[":
            i = _skip_bracketed(expr, i)
        elif char.isdigit() or (char == "." and i + 1 < n and expr[i + 1].isdigit()):
            match = _DURATION.match(expr, i) or _NUMBER.match(expr, i)
            if match is None:  # pragma: no cover - _NUMBER matches any digit
                raise ValueError(f"unreadable number at {i} in {expr!r}")
            i = match.end()
        elif char == "_" or char == ":" or char.isalpha():
            match = _IDENT.match(expr, i)
            if match is None:  # a non-ASCII letter: not a PromQL identifier
                raise ValueError(f"unexpected {char!r} at {i} in {expr!r}")
            word, i = match.group(), match.end()
            following = _next_non_space(expr, i)
            if word in _LABEL_LIST_KEYWORDS and following < n and expr[following] == "(":
                i = _skip_bracketed(expr, following)  # by (a, b): label names, not metrics
            elif following < n and expr[following] == "(":
                continue  # a function or an aggregation
            elif word in KEYWORDS or word.lower() in ("inf", "nan"):
                continue
            else:
                names.add(word)
        elif char in _OPERATORS:
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth < 0:
                raise ValueError(f"unbalanced ')' at {i} in {expr!r}")
            i += 1
        else:
            raise ValueError(f"unexpected {char!r} at {i} in {expr!r}")
    if depth:
        raise ValueError(f"unclosed '(' in {expr!r}")
    return names


def names_in(expressions: Iterable[str]) -> set[str]:
    """The union of `metric_names` over `expressions`."""
    names: set[str] = set()
    for expr in expressions:
        names |= metric_names(expr)
    return names


def dashboard_metric_names(paths: Iterable[Path] | None = None) -> set[str]:
    """Metric names referenced by the dashboards (default: every `grafana/dashboards/*.json`)."""
    expressions: list[str] = []
    for path in dashboard_paths() if paths is None else paths:
        expressions.extend(dashboard_expressions(json.loads(path.read_text(encoding="utf-8"))))
    return names_in(expressions)


def rule_metric_names(paths: Iterable[Path] | None = None) -> set[str]:
    """Metric names referenced by the alert rules (default: the `rule_files` of the config)."""
    expressions: list[str] = []
    for path in rule_paths() if paths is None else paths:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        expressions.extend(rule_expressions(document))
    return names_in(expressions)


def _next_non_space(expr: str, i: int) -> int:
    """Index of the first non-whitespace character at or after `i` (len(expr) if none)."""
    while i < len(expr) and expr[i].isspace():
        i += 1
    return i


def _skip_string(expr: str, i: int) -> int:
    """Index just past the string literal opening at `i` (backslash escapes; raw `...`)."""
    quote, j = expr[i], i + 1
    while j < len(expr):
        if expr[j] == "\\" and quote != "`":
            j += 2
        elif expr[j] == quote:
            return j + 1
        else:
            j += 1
    raise ValueError(f"unterminated string at {i} in {expr!r}")


def _skip_bracketed(expr: str, i: int) -> int:
    """Index just past the bracket opening at `i` and its match, strings and nesting aware."""
    stack = [_CLOSING[expr[i]]]
    j = i + 1
    while j < len(expr):
        char = expr[j]
        if char in "\"'`":
            j = _skip_string(expr, j)
            continue
        if char in _CLOSING:
            stack.append(_CLOSING[char])
        elif char in ")]}":
            if char != stack.pop():
                raise ValueError(f"mismatched {char!r} at {j} in {expr!r}")
            if not stack:
                return j + 1
        j += 1
    raise ValueError(f"unterminated {expr[i]!r} at {i} in {expr!r}")


def _names_from_matchers(matchers: str) -> set[str]:
    """Metric names given by equality `__name__` matchers inside `{...}`."""
    return {a or b for a, b in _NAME_MATCHER.findall(matchers) if (a or b)}
