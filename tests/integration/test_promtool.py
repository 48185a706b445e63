"""The Prometheus assets through Prometheus' own `promtool`: the alert rules and the scrape config
check, and the rules' unit tests (cluster/monitoring/prometheus/alerts_test.yml) pass.

`promtool` comes from PATH, else from Debian's `prometheus` package, installed here when we are
root (apt-get). The install must not leave a Prometheus server running: service starts are
refused through policy-rc.d during the install, and any `prometheus` process that appears anyway
is stopped by its pid. The tests skip, saying exactly why, only when no promtool can be had.

`promtool check config` also checks the rule files and every file_sd file it finds: an absent
file is only a warning (Prometheus started before Ray), but a dangling symlink or a malformed
file fails (promtool 2.42). /tmp/ray/prom_metrics_service_discovery.json is a symlink into the
latest Ray session on this machine, so the full check runs on copies of the config pointing at
an absent file and at one in Ray's format; the shipped file itself gets `--syntax-only`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cluster.monitoring_assets import dashboard_expressions, dashboard_paths, prometheus_dir
from configs.schema import OperatorConfig
from serve.operator import OperatorEndpoint, write_target_file

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "prometheus"
SERVER_BINARY = Path("/usr/bin/prometheus")
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
INSTALL_TIMEOUT_S = 900
APT_LOCK_TIMEOUT_S = 600  # other sessions may be installing packages at the same time
PROMTOOL_TIMEOUT_S = 120
RAY_SD_FILE = "/tmp/ray/prom_metrics_service_discovery.json"  # written by Ray on the head node


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _server_pids() -> set[int]:
    """Pids of running processes whose executable is the packaged Prometheus server."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if Path(os.readlink(entry / "exe")) == SERVER_BINARY:
                pids.add(int(entry.name))
    return pids


def _stop(pids: set[int]) -> None:
    """SIGTERM each pid, SIGKILL what is still there after 10 s."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10.0
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if Path(f"/proc/{pid}").exists()}
        time.sleep(0.1)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _service_starts_refused() -> Iterator[None]:
    """A policy-rc.d refusing every service start (exit 101) unless one is already in place."""
    if POLICY_RC_D.exists():
        yield
        return
    POLICY_RC_D.write_text("#!/bin/sh\n# quant-ai tests: no service starts\nexit 101\n")
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink(missing_ok=True)


def _install_prometheus() -> str | None:
    """Install Debian's prometheus package; None on success, else why it cannot be done."""
    if os.geteuid() != 0:
        return "promtool is not on PATH and, not being root, the tests cannot apt-get install it"
    if shutil.which("apt-get") is None:
        return "promtool is not on PATH and there is no apt-get to install prometheus with"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = f"DPkg::Lock::Timeout={APT_LOCK_TIMEOUT_S}"
    commands = (
        ["apt-get", "-o", lock, "update"],
        ["apt-get", "-o", lock, "install", "-y", "--no-install-recommends", PACKAGE],
    )
    before = _server_pids()
    try:
        with _service_starts_refused():
            for command in commands:
                try:
                    done = subprocess.run(
                        command,
                        env=env,
                        capture_output=True,
                        text=True,
                        timeout=INSTALL_TIMEOUT_S,
                        check=False,
                    )
                except subprocess.TimeoutExpired:
                    return f"`{' '.join(command)}` did not finish in {INSTALL_TIMEOUT_S} s"
                if done.returncode != 0:
                    return (
                        f"`{' '.join(command)}` failed with exit code {done.returncode}:\n"
                        f"{_tail(done.stderr or done.stdout)}"
                    )
    finally:
        # The package must not leave a server behind, whatever its maintainer scripts did.
        _stop(_server_pids() - before)
    return None


@dataclass(frozen=True)
class PromtoolSetup:
    """Where promtool is, and the Prometheus servers that ran before the fixture (not ours)."""

    path: str
    servers_before: frozenset[int]


@pytest.fixture(scope="session")
def promtool_setup() -> PromtoolSetup:
    """A working `promtool`, installing Debian's prometheus package if needed."""
    servers_before = frozenset(_server_pids())
    found = shutil.which("promtool")
    if found is None:
        started = time.monotonic()
        problem = _install_prometheus()
        if problem is not None:
            pytest.skip(f"no promtool: {problem}")
        print(f"installed Debian's {PACKAGE} package in {time.monotonic() - started:.1f} s")
        found = shutil.which("promtool")
        if found is None:
            pytest.fail(f"`apt-get install {PACKAGE}` succeeded but promtool is not on PATH")
    version = subprocess.run(
        [found, "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert version.returncode == 0, version.stderr
    return PromtoolSetup(found, servers_before)


@pytest.fixture(scope="session")
def promtool(promtool_setup: PromtoolSetup) -> str:
    """The path of promtool."""
    return promtool_setup.path


def _promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_S,
        check=False,
    )


def _output(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"


def test_no_prometheus_server_left_running(promtool_setup: PromtoolSetup) -> None:
    """Getting promtool (maybe installing the package) started no Prometheus server."""
    assert not _server_pids() - promtool_setup.servers_before


def test_alert_rules_check(promtool: str) -> None:
    done = _promtool(promtool, "check", "rules", prometheus_dir() / "alerts.yml")
    assert done.returncode == 0, _output(done)
    assert "SUCCESS" in done.stdout + done.stderr, _output(done)


def _config_copy(tmp_path: Path, sd_file: Path, targets_dir: Path) -> Path:
    """prometheus.yml and its rule file copied into tmp_path, with Ray's SD file and the folder
    of the ingress replicas' operator target files replaced."""
    text = (prometheus_dir() / "prometheus.yml").read_text()
    targets = f"{OperatorConfig().targets_dir}/*.json"
    for path in (RAY_SD_FILE, targets):
        assert text.count(path) == 1, f"{path} must appear once in prometheus.yml"
    config = tmp_path / "prometheus.yml"
    text = text.replace(RAY_SD_FILE, str(sd_file)).replace(targets, f"{targets_dir}/*.json")
    config.write_text(text)
    shutil.copy(prometheus_dir() / "alerts.yml", tmp_path / "alerts.yml")
    return config


def test_scrape_config_syntax(promtool: str) -> None:
    """The config as shipped (syntax only: the real /tmp/ray SD file is this machine's state)."""
    done = _promtool(
        promtool, "check", "config", "--syntax-only", prometheus_dir() / "prometheus.yml"
    )
    assert done.returncode == 0, _output(done)


def test_scrape_config_check_before_ray_starts(promtool: str, tmp_path: Path) -> None:
    """Full check with no Ray SD file yet: only a warning; the rule files are checked too."""
    absent = tmp_path / "absent"
    config = _config_copy(tmp_path, absent / "prom_metrics_service_discovery.json", absent)
    done = _promtool(promtool, "check", "config", config)
    assert done.returncode == 0, _output(done)
    output = done.stdout + done.stderr
    assert "WARNING" in output and "does not exist" in output, _output(done)
    assert "SUCCESS: 1 rule files found" in output, _output(done)
    assert "SUCCESS: 8 rules found" in output, _output(done)


def test_scrape_config_check_with_ray_sd_file(promtool: str, tmp_path: Path) -> None:
    """Full check against a service discovery file in the format Ray writes on the head node
    and the target files the ingress replicas write (`serve.operator.write_target_file`)."""
    sd_file = tmp_path / "prom_metrics_service_discovery.json"
    sd_file.write_text(
        json.dumps([{"labels": {"job": "ray"}, "targets": ["10.0.0.12:44217", "10.0.0.13:44217"]}])
    )
    targets = tmp_path / "targets"
    for host, port in (("10.0.0.12", 9470), ("10.0.0.12", 9471), ("fd00::13", 9470)):
        labels = {"service": "quant-ai", "replica": f"r{port}"}
        write_target_file(targets, OperatorEndpoint("0.0.0.0", port, host), labels)
    done = _promtool(promtool, "check", "config", _config_copy(tmp_path, sd_file, targets))
    assert done.returncode == 0, _output(done)
    assert "WARNING" not in done.stdout + done.stderr, _output(done)


def test_alert_rule_unit_tests_pass(promtool: str) -> None:
    done = _promtool(promtool, "test", "rules", prometheus_dir() / "alerts_test.yml")
    assert done.returncode == 0, _output(done)
    assert "SUCCESS" in done.stdout + done.stderr, _output(done)


def test_promtool_catches_a_broken_rule_and_a_wrong_expectation(
    promtool: str, tmp_path: Path
) -> None:
    """The harness is not vacuous: a syntax error and an alert that cannot fire both fail."""
    broken = tmp_path / "broken.yml"
    expr = "sum(rate(quant_ai_http_requests_total[5m]) > 1"  # unclosed parenthesis
    broken.write_text(
        yaml.safe_dump({"groups": [{"name": "g", "rules": [{"alert": "Broken", "expr": expr}]}]})
    )
    done = _promtool(promtool, "check", "rules", broken)
    assert done.returncode != 0, _output(done)
    assert "parse error" in done.stdout + done.stderr, _output(done)

    # A model loaded throughout, yet the test expects QuantAINoModelLoaded to fire.
    shutil.copy(prometheus_dir() / "alerts.yml", tmp_path / "alerts.yml")
    wrong = tmp_path / "wrong_test.yml"
    case = {
        "interval": "15s",
        "input_series": [{"series": 'quant_ai_model_loaded{job="quant-ai-api"}', "values": "1x40"}],
        "alert_rule_test": [
            {
                "eval_time": "5m",
                "alertname": "QuantAINoModelLoaded",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "critical",
                            "service": "quant-ai",
                            "job": "quant-ai-api",
                        }
                    }
                ],
            }
        ],
    }
    wrong.write_text(
        yaml.safe_dump(
            {"rule_files": ["alerts.yml"], "evaluation_interval": "15s", "tests": [case]}
        )
    )
    done = _promtool(promtool, "test", "rules", wrong)
    assert done.returncode != 0, _output(done)
    assert "got:[]" in done.stdout + done.stderr, _output(done)


GRAFANA_INTERVALS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "6h"}


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Every dashboard query parses as PromQL: each becomes a recording rule for promtool,
    with Grafana's interval variables replaced by durations."""
    rules: list[dict[str, str]] = []
    for path in dashboard_paths():
        board = json.loads(path.read_text(encoding="utf-8"))
        for expr in dashboard_expressions(board):
            for variable, duration in GRAFANA_INTERVALS.items():
                expr = expr.replace(variable, duration)
            assert "$" not in expr, f"{path.name}: unknown Grafana variable in {expr!r}"
            rules.append({"record": f"dashboard:query_{len(rules)}", "expr": expr})
    assert len(rules) > 40
    rule_file = tmp_path / "dashboard_queries.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    done = _promtool(promtool, "check", "rules", rule_file)
    assert done.returncode == 0, _output(done)
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout + done.stderr, _output(done)
