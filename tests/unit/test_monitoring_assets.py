"""The monitoring assets (cluster/monitoring/) parse, hang together, and reference only metrics
that exist: `quant_ai_*` names the signal API exports (serve.api.metrics.METRIC_NAMES, by metric
type) and `ray_*` names Ray 2.60 defines. Also the PromQL scanner behind the name checks.

`promtool` checks of the rules and config: tests/integration/test_promtool.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cluster.monitoring_assets import (
    DATASOURCE_UID,
    dashboard_expressions,
    dashboard_metric_names,
    dashboard_paths,
    iter_panels,
    metric_names,
    monitoring_dir,
    prometheus_dir,
    rule_expressions,
    rule_metric_names,
    rule_paths,
)
from configs.schema import BacktestConfig, OperatorConfig
from serve.api.auth import AUTH_ERROR_CODES
from serve.api.metrics import METRIC_NAMES, ApiMetrics
from serve.engine.snapshot import (
    ConfidenceHistogram,
    EngineSnapshot,
    ModelInfo,
    OutcomeSummary,
    SignalCount,
    SymbolState,
)

GRAFANA = monitoring_dir() / "grafana"
SEVERITIES = {"critical", "warning"}

# The type of every metric the API exports, as the collectors in serve/api/metrics.py declare it.
# A Prometheus metric of each type is scraped under these sample names:
#   counter: NAME (already ending in _total) | gauge: NAME | info: NAME (already ending in _info)
#   histogram: NAME_bucket, NAME_sum, NAME_count
METRIC_TYPES = {
    "quant_ai_http_requests_total": "counter",
    "quant_ai_http_request_duration_seconds": "histogram",
    "quant_ai_auth_failures_total": "counter",
    "quant_ai_signals_total": "counter",
    "quant_ai_signal_confidence_ratio": "histogram",
    "quant_ai_model_info": "info",
    "quant_ai_model_loaded": "gauge",
    "quant_ai_feature_staleness_seconds": "gauge",
    "quant_ai_realised_hit_ratio": "gauge",
    "quant_ai_realised_signals_total": "counter",
    "quant_ai_realised_pnl_ratio": "gauge",
    "quant_ai_registry_reloads_total": "counter",
    "quant_ai_snapshot_age_seconds": "gauge",
}
SAMPLE_SUFFIXES = {
    "counter": ("",),
    "gauge": ("",),
    "info": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}
REQUIRED_ALERTS = {
    "QuantAIApiDown",
    "QuantAIApiHighErrorRate",
    "QuantAISignalLatencyHigh",
    "QuantAIFeaturesStale",
    "QuantAIHitRateLow",
    "QuantAINoModelLoaded",
    "QuantAIAuthFailureSpike",
}


def sample_names(name: str, kind: str) -> set[str]:
    """The sample names under which a metric of `kind` named `name` is scraped."""
    return {name + suffix for suffix in SAMPLE_SUFFIXES[kind]}


def exported_sample_names() -> set[str]:
    """Every sample name the signal API exports, derived from METRIC_NAMES and METRIC_TYPES."""
    return {s for name in METRIC_NAMES for s in sample_names(name, METRIC_TYPES[name])}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def dashboards() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in dashboard_paths():
        yield path, json.loads(path.read_text(encoding="utf-8"))


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in rule_paths()
        for group in load_yaml(path)["groups"]
        for rule in group["rules"]
    ]


def ray_package_dir() -> Path:
    """The installed `ray` package's folder, found without importing ray."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the ray package is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


# ----- the PromQL scanner --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("up", {"up"}),
        ('up{job="quant-ai-api"} == 0', {"up"}),
        (
            'sum by (le, route) (rate(a_bucket{route="/signal", le=~"0.0.*"}[5m]))',
            {"a_bucket"},
        ),
        ("histogram_quantile(0.99, sum(rate(a_bucket[5m])) by (le))", {"a_bucket"}),
        ("sum by(le)(rate(a_bucket[$__rate_interval]))", {"a_bucket"}),
        ("sum (a)", {"a"}),
        ("sum without (instance, job) (a)", {"a"}),
        ("a / on(job) group_left(version, family) b", {"a", "b"}),
        ("a * on() group_left b", {"a", "b"}),
        ("a and on (symbol) increase(b[6h]) > 50", {"a", "b"}),
        ("a unless b or c", {"a", "b", "c"}),
        ("a > bool 0.5", {"a"}),
        ("rate(a[5m] offset 1h30m)", {"a"}),
        ("a offset -5m", {"a"}),
        ("a @ start()", {"a"}),
        ("a @ 1609746000", {"a"}),
        ("max_over_time(a[1h:5m])", {"a"}),
        ('count_values("version", a)', {"a"}),
        ('label_replace(a, "dst", "$1", "src", "(.*)")', {"a"}),
        ("topk(5, a) or vector(0)", {"a"}),
        ("time() - a", {"a"}),
        ('{__name__="a", job="x"}', {"a"}),
        ("{__name__='a'} + b", {"a", "b"}),
        ('{__name__=~"ray_.*"}', set()),
        ('a{x="}{"} + b{y="[5m]"}', {"a", "b"}),
        (r"a{x='it\'s'} * 1e-3 + 0x1F - Inf + .5 - NaN", {"a"}),
        ("a{x=`raw\\`} / b", {"a", "b"}),
        ("abs(a) - -1.5e+3", {"a"}),
        ("ns:recorded:rate5m > 0", {"ns:recorded:rate5m"}),
        ("a # b is only mentioned in a comment\n+ c", {"a", "c"}),
        ('clamp_min(sum by (State) (ray_tasks{State!~"FINISHED|FAILED"}), 0)', {"ray_tasks"}),
        (
            'sum(rate(q_total{status=~"5.."}[5m])) / sum(rate(q_total[5m])) > 0.01',
            {"q_total"},
        ),
        ("sum(increase(r_total[$__range])) * ${factor}", {"r_total"}),
        ("1 + 2", set()),
    ],
)
def test_metric_names_of_tricky_expressions(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


@pytest.mark.parametrize(
    "expr",
    ['a{x="b"', "rate(a[5m)", "a ; b", "a}", "sum(a", 'a{x="unterminated}', "a $ b", "a) + (b"],
)
def test_metric_names_rejects_malformed_expressions(expr: str) -> None:
    with pytest.raises(ValueError):
        metric_names(expr)


def test_expressions_are_found_through_rows_and_legacy_layouts() -> None:
    dashboard = {
        "panels": [
            {"type": "timeseries", "targets": [{"expr": "a"}, {"expr": ""}, {"refId": "B"}]},
            {
                "type": "row",
                "collapsed": True,
                "panels": [{"type": "stat", "targets": [{"expr": "sum(b)"}]}],
            },
        ],
        "rows": [{"panels": [{"type": "graph", "targets": [{"expr": "rate(c[5m])"}]}]}],
    }
    assert dashboard_expressions(dashboard) == ["a", "sum(b)", "rate(c[5m])"]
    assert [p["type"] for p in iter_panels(dashboard)] == ["timeseries", "row", "stat", "graph"]
    rules = {"groups": [{"rules": [{"alert": "A", "expr": "x > 1"}, {"record": "r", "expr": 1}]}]}
    assert rule_expressions(rules) == ["x > 1", "1"]


def test_name_collectors_read_the_shipped_assets(tmp_path: Path) -> None:
    assert rule_paths() == [prometheus_dir() / "alerts.yml"]
    assert {p.name for p in dashboard_paths()} == {"quant-ai-api.json", "ray-cluster.json"}
    assert {"up", "quant_ai_model_loaded", "quant_ai_feature_staleness_seconds"} <= (
        rule_metric_names()
    )
    assert {"quant_ai_model_info", "ray_resources"} <= dashboard_metric_names()
    board = tmp_path / "board.json"
    board.write_text(json.dumps({"panels": [{"type": "stat", "targets": [{"expr": "max(z)"}]}]}))
    assert dashboard_metric_names([board]) == {"z"}
    rules = tmp_path / "rules.yml"
    rules.write_text("groups:\n- name: g\n  rules:\n  - alert: A\n    expr: y == 0\n")
    assert rule_metric_names([rules]) == {"y"}


# ----- Prometheus -----------------------------------------------------------------------------


def test_scrape_config() -> None:
    config = load_yaml(prometheus_dir() / "prometheus.yml")
    assert config["global"]["scrape_interval"] == "15s"
    assert config["global"]["evaluation_interval"] == "15s"
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"quant-ai-api", "ray"}
    api = jobs["quant-ai-api"]
    assert api.get("metrics_path", "/metrics") == "/metrics"
    # The operator endpoints of the ingress replicas, from the target files they write.
    assert "static_configs" not in api
    (targets,) = api["file_sd_configs"]
    assert targets["files"] == [f"{OperatorConfig().targets_dir}/*.json"]
    (sd,) = jobs["ray"]["file_sd_configs"]
    assert sd["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


def test_ray_service_discovery_file_is_the_one_ray_writes() -> None:
    """Ray writes PROMETHEUS_SERVICE_DISCOVERY_FILE into its temp dir, /tmp/ray by default."""
    constants = (ray_package_dir() / "_private" / "ray_constants.py").read_text()
    match = re.search(r'^PROMETHEUS_SERVICE_DISCOVERY_FILE\s*=\s*"([^"]+)"', constants, re.M)
    assert match is not None
    config = load_yaml(prometheus_dir() / "prometheus.yml")
    (ray_job,) = [job for job in config["scrape_configs"] if job["job_name"] == "ray"]
    assert ray_job["file_sd_configs"][0]["files"] == [f"/tmp/ray/{match.group(1)}"]


def test_every_alert_has_for_severity_and_annotations() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    assert set(names) >= REQUIRED_ALERTS
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no `for`"
        assert rule["labels"]["severity"] in SEVERITIES, name
        for key in ("summary", "description", "runbook"):
            assert str(rule["annotations"].get(key, "")).strip(), f"{name}: no {key}"


def test_alert_thresholds_are_the_agreed_ones() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    flat = {name: " ".join(str(rule["expr"]).split()) for name, rule in rules.items()}
    assert 'up{job="quant-ai-api"} == 0' in flat["QuantAIApiDown"]
    assert 'status=~"5.."' in flat["QuantAIApiHighErrorRate"]
    assert flat["QuantAIApiHighErrorRate"].endswith("> 0.01")
    assert flat["QuantAISignalLatencyHigh"].startswith("histogram_quantile(0.99,")
    assert (
        'quant_ai_http_request_duration_seconds_bucket{route="/signal"}[5m]'
        in (flat["QuantAISignalLatencyHigh"])
    )
    assert flat["QuantAISignalLatencyHigh"].endswith("> 0.05")
    assert flat["QuantAIFeaturesStale"].endswith("> 180")
    assert rules["QuantAIFeaturesStale"]["for"] == "2m"
    assert "< 0.5" in flat["QuantAIHitRateLow"]
    assert "increase(quant_ai_realised_signals_total[6h])) > 50" in flat["QuantAIHitRateLow"]
    assert flat["QuantAINoModelLoaded"].endswith("(quant_ai_model_loaded) == 0")
    assert rules["QuantAINoModelLoaded"]["for"] == "2m"
    assert "rate(quant_ai_auth_failures_total[5m])" in flat["QuantAIAuthFailureSpike"]


def test_rule_unit_tests_make_every_alert_fire() -> None:
    """alerts_test.yml (run by promtool in the integration tests) expects each alert to fire,
    the stale-features and no-model alerts included."""
    tests = load_yaml(prometheus_dir() / "alerts_test.yml")
    assert tests["rule_files"] == ["alerts.yml"]
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert fired == {rule["alert"] for rule in alert_rules()}
    assert {"QuantAIFeaturesStale", "QuantAINoModelLoaded"} <= fired


# ----- Grafana --------------------------------------------------------------------------------


def test_datasource_provisioning() -> None:
    document = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    assert document["apiVersion"] == 1
    (datasource,) = document["datasources"]
    assert datasource["uid"] == DATASOURCE_UID
    assert datasource["type"] == "prometheus"
    assert datasource["url"].startswith("http")
    assert datasource["jsonData"]["timeInterval"] == "15s"


def test_dashboard_provisioning() -> None:
    document = load_yaml(GRAFANA / "provisioning" / "dashboards" / "quant-ai.yml")
    assert document["apiVersion"] == 1
    (provider,) = document["providers"]
    assert provider["type"] == "file"
    assert Path(provider["options"]["path"]).is_absolute()


def test_dashboards_are_valid_grafana_json() -> None:
    uids: set[str] = set()
    for path, board in dashboards():
        assert board["uid"] and board["uid"] not in uids, path
        uids.add(board["uid"])
        assert board["title"]
        assert 36 <= board["schemaVersion"] <= 41, path
        assert board["panels"], path
        ids: set[int] = set()
        cells: set[tuple[int, int]] = set()
        for panel in iter_panels(board):
            where = f"{path.name}: {panel.get('title')!r}"
            assert panel["id"] not in ids, where
            ids.add(panel["id"])
            grid = panel["gridPos"]
            assert all(isinstance(grid[k], int) for k in "hwxy"), where
            assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, where
            area = {
                (x, y)
                for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])
            }
            assert not area & cells, f"{where} overlaps another panel"
            cells |= area
            assert panel["title"], where
            if panel["type"] != "row":
                assert panel.get("targets"), f"{where} has no query"


def test_every_panel_and_query_uses_the_provisioned_datasource() -> None:
    provisioned = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    uid = provisioned["datasources"][0]["uid"]
    for path, board in dashboards():
        for panel in iter_panels(board):
            if panel["type"] == "row":
                continue
            where = f"{path.name}: {panel['title']!r}"
            assert panel["datasource"] == {"type": "prometheus", "uid": uid}, where
            for target in panel["targets"]:
                assert target.get("datasource", panel["datasource"])["uid"] == uid, where
                assert target["expr"].strip() and target["refId"], where


def test_api_dashboard_shows_every_exported_metric() -> None:
    """Every metric of METRIC_NAMES is on the API dashboard under one of its sample names."""
    (path,) = [p for p in dashboard_paths() if p.name == "quant-ai-api.json"]
    shown = dashboard_metric_names([path])
    for name in METRIC_NAMES:
        assert sample_names(name, METRIC_TYPES[name]) & shown, f"{name} is not on {path.name}"


# ----- the names referenced exist -----------------------------------------------------------


def test_metric_types_cover_metric_names() -> None:
    assert set(METRIC_TYPES) == set(METRIC_NAMES)


def test_metric_types_match_what_the_api_renders() -> None:
    """The type mapping agrees with an actual exposition of ApiMetrics over a full snapshot."""
    snapshot = EngineSnapshot(
        sequence=7,
        taken_at=100.0,
        stale_after_s=150.0,
        symbols=(SymbolState("BTCUSDT", staleness_s=12.0, signal=None, feed_error=None),),
        model=ModelInfo(
            version="v3",
            family="lstm",
            window_bars=64,
            horizon_minutes=10,
            feature_spec_hash="abc",
            metrics={},
            training_data_range=None,
            evaluated_range=None,
            gate=None,
            thresholds=BacktestConfig(),
            loaded_at_ms=0,
        ),
        load_error=None,
        reloads=1,
        signal_counts=(SignalCount("BTCUSDT", "BUY", 3),),
        confidence=ConfidenceHistogram(buckets=(0.6, 0.8, 1.0), counts=(1, 1, 1), sum=2.1),
        outcomes=(OutcomeSummary("BTCUSDT", 8, 6, 5, 3, hit_rate=0.6, pnl_bps=12.0),),
    )
    metrics = ApiMetrics(lambda: snapshot, lambda: 101.0)
    metrics.observe("/signal", "GET", 200, 0.003)
    metrics.auth_failures.labels("invalid_token").inc()
    rendered = {
        sample.name
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
    }
    assert exported_sample_names() <= rendered
    # what else is rendered is only prometheus_client's `_created` timestamps
    assert {n for n in rendered - exported_sample_names() if not n.endswith("_created")} == set()


def test_every_auth_failure_reason_is_exported_from_the_start() -> None:
    """A rate() over a series that appears with its first failure misses that failure: every
    reason is a zero before anything fails."""
    metrics = ApiMetrics(lambda: None, lambda: 0.0)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    samples = [s for s in families["quant_ai_auth_failures"].samples if s.name.endswith("_total")]
    assert {s.labels["reason"]: s.value for s in samples} == dict.fromkeys(AUTH_ERROR_CODES, 0.0)


def test_quant_ai_names_referenced_are_exported() -> None:
    """The static check: dashboards and rules use only sample names the API exports."""
    exported = exported_sample_names()
    for source, names in (
        ("dashboards", dashboard_metric_names()),
        ("alert rules", rule_metric_names()),
    ):
        unknown = {n for n in names if n.startswith("quant_ai_")} - exported
        assert not unknown, f"{source} reference metrics the API does not export: {unknown}"


def test_only_api_ray_and_up_metrics_are_referenced() -> None:
    for name in dashboard_metric_names() | rule_metric_names():
        assert name == "up" or name.startswith(("quant_ai_", "ray_")), name


def test_ray_names_referenced_are_defined_by_ray() -> None:
    """Each `ray_*` name is used by Ray's own Grafana dashboards or defined (namespace `ray`)
    by its node reporter or Serve, in the installed Ray."""
    ray_dir = ray_package_dir()
    used = "".join(
        p.read_text() for p in (ray_dir / "dashboard/modules/metrics/dashboards").glob("*.py")
    )
    defining = [
        ray_dir / "dashboard/modules/reporter/reporter_agent.py",
        *sorted((ray_dir / "serve/_private").glob("*.py")),
    ]
    defined = "".join(p.read_text() for p in defining)
    names = {n for n in dashboard_metric_names() if n.startswith("ray_")}
    assert names
    for name in sorted(names):
        base = re.sub(r"_(bucket|sum|count|total)$", "", name)
        assert re.search(rf"\b{name}\b", used) or f'"{base.removeprefix("ray_")}"' in defined, (
            f"{name} is neither in Ray's dashboards nor defined by Ray {ray_dir}"
        )
