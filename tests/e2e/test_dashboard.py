"""The Streamlit dashboard end to end: a real signal API, a real Streamlit server, headless
Chromium.

Session set-up: a simulated Silver lake, a registry with a production model, a tune run
directory made by the real code paths (`models.evaluation.evaluate` on simulated Silver with
synthetic predictions, `models.runs.TrialDir.save` for trials and the buy-and-hold reference,
`models.report.write_leaderboard` and `write_html_report`), the signal API
(`serve.local.make_local_api` on uvicorn, a subprocess on a free loopback port) replaying the
same simulated bars, and `streamlit run serve/dashboard/app.py` (a subprocess, credentials in
its environment). Chromium (Debian's `chromium`, installed with apt when missing) then takes a
screenshot and dumps the rendered DOM. Everything listens on 127.0.0.1 only; every subprocess
is killed at teardown; every wait is bounded.

The screenshot is kept at tests/artifacts/dashboard.png (the DOM at dashboard.html).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.sync.client import connect

from configs.schema import (
    AuthConfig,
    BacktestConfig,
    FeedConfig,
    FoldConfig,
    GoldConfig,
    JwtConfig,
    ServeConfig,
    SimConfig,
)
from serve.api.clients import ClientStore
from tests.conftest import REPO
from tests.serve_support import register_model

pytestmark = pytest.mark.e2e

SYMBOL = "SIMDASH"
SIM = SimConfig(seed=11, anchor_date=date(2024, 5, 6))
SIM_DAYS = 2
ARTIFACTS = REPO / "tests" / "artifacts"
SCREENSHOT = ARTIFACTS / "dashboard.png"
DOM_DUMP = ARTIFACTS / "dashboard.html"
CLIENT_ID = "dashboard-e2e"
BIN = Path(sys.executable).parent
# Replay speed of the API's simulated feed (bars per second) and the filled signals to wait for.
REPLAY_BARS_PER_S = 2.0
FILLED_SIGNALS = 40
STARTUP_TIMEOUT_S = 120.0
# Plotly's candlestick colours as the dashboard draws them (solid bodies).
CANDLE_UP = (0x3D, 0x99, 0x70)
CANDLE_DOWN = (0xFF, 0x41, 0x36)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def chromium_binary() -> str:
    """Debian's chromium, installed with apt-get when it is missing (we run as root)."""
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and cannot be installed (needs root and apt)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
    ):
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=900, check=False
        )
        if result.returncode != 0:
            pytest.skip(f"installing chromium failed: {result.stderr[-500:]}")
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("apt installed chromium but no `chromium` is on PATH")
    return found


# --------------------------------------------------------------------------------------------
# Set-up: lake, registry, run directory


def write_run_dir(run_dir: Path) -> dict[str, Any]:
    """A tune run directory through the real code paths: three synthetic trials scored by
    `evaluate` on simulated Silver, records and folds saved by `TrialDir.save` (the buy-and-hold
    reference under `RunDir.reference`, as the sweep stores it), leaderboard and report written
    by `models.report`. Returns the best trial's id, its score and buy-and-hold's total return
    as the page shows it (a fraction, from the curve's first bar to its last)."""
    import pandas as pd

    from market.sim_silver import silver_frame, simulated_bars
    from models.dataset import arrays_from_table
    from models.evaluation import OutOfSampleBars, equity_curve, evaluate
    from models.folds import make_folds
    from models.report import curve_summary, write_html_report, write_leaderboard
    from models.runs import BUY_AND_HOLD, COMPLETED, EARLY_STOPPED, RunDir
    from models.selection import leaderboard_frame
    from models.sweep import TrialOutcome

    arrays = arrays_from_table(silver_frame(simulated_bars(SIM, [SYMBOL], SIM_DAYS)).to_arrow())
    folds = make_folds(
        int(arrays.open_time_ms.min()),
        int(arrays.open_time_ms.max()),
        FoldConfig(train_bars=600, val_bars=200, test_bars=600, embargo_bars=10, max_folds=2),
    )
    test = OutOfSampleBars.of(arrays, folds)
    config = BacktestConfig(taker_fee_bps=1.0)
    rng = np.random.default_rng(5)
    target = arrays.target_ret[test.rows].astype(np.float64)
    outcomes, evaluations = [], {}
    # Skill = how much of the realised 10-minute return the synthetic "model" sees.
    for trial_id, skill, family in (
        ("t_0001", 0.4, "gru"),
        ("t_0002", 0.15, "lstm"),
        ("t_0003", 0.0, "tcn"),
    ):
        noise = rng.normal(0.0, np.nanstd(target), len(target))
        predicted = skill * target + (1.0 - skill) * noise
        p_up = 1.0 / (1.0 + np.exp(-predicted / max(np.nanstd(target), 1e-9) * 2.0))
        evaluation = evaluate(trial_id, arrays, folds, test, config, predicted, p_up)
        RunDir(run_dir).trial(trial_id).save(evaluation, folds)
        evaluations[trial_id] = evaluation
        params = {"family": family, "hidden_size": 8, "num_layers": 1, "dropout": 0.0}
        params |= {"learning_rate": 0.003, "window_bars": 16, "batch_size": 256}
        params |= {"tcn_kernel_size": 2, "tcn_dilations": [1, 2, 4]}
        outcomes.append(
            TrialOutcome(trial_id, params, COMPLETED, 6, {**evaluation.metrics, "val_loss": 0.1})
        )
    outcomes.append(TrialOutcome("t_0004", {"family": "tcn"}, EARLY_STOPPED, 3, {"val_loss": 0.3}))
    board = leaderboard_frame(outcomes, {t: 0.5 for t in evaluations})
    write_leaderboard(board, run_dir)
    best = max(evaluations.values(), key=lambda e: e.score)
    hold = evaluate(BUY_AND_HOLD, arrays, folds, test, config, None, None)
    RunDir(run_dir).reference(BUY_AND_HOLD).save(hold, folds)

    write_html_report(
        RunDir(run_dir).report,
        title="dashboard e2e sweep",
        leaderboard=board,
        equity_curves={best.name: equity_curve(best), BUY_AND_HOLD: equity_curve(hold)},
        fold_table=pd.DataFrame(best.fold_metrics),
        regime_table=pd.DataFrame(best.regimes),
        gate={"promoted": False, "reasons": ["synthetic run"]},
    )
    return {
        "best": best.name,
        "score": best.score,
        "hold_return": curve_summary(equity_curve(hold))["total_return"],
    }


@dataclass
class Stack:
    """The running services and what the tests need to know about them."""

    dashboard_url: str
    api_url: str
    token: str
    best_trial: str
    hold_return: float
    latest_version: str
    chromium: str
    tmp: Path
    lake: Path
    runs: Path
    env: dict[str, str]


def wait_until(check: Any, timeout_s: float, what: str, proc: subprocess.Popen[bytes]) -> Any:
    """Poll `check()` every 0.5 s until it is truthy; fail when `proc` dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, OSError, ValueError, KeyError) as error:
            last_error = error
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s (last error: {last_error})")


def start(command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown kills children too
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL after 10 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        proc.wait(timeout=10)


def start_dashboard(
    tmp: Path, lake: Path, runs: Path, env: dict[str, str], name: str
) -> tuple[subprocess.Popen[bytes], str]:
    """`streamlit run serve/dashboard/app.py` on a free loopback port; waits for its health."""
    port = free_port()
    proc = start(
        [
            str(BIN / "streamlit"),
            "run",
            "serve/dashboard/app.py",
            "--server.headless=true",
            "--server.address=127.0.0.1",
            f"--server.port={port}",
            "--server.fileWatcherType=none",
            "--browser.gatherUsageStats=false",
            "--",
            "--lake",
            str(lake),
            "--runs",
            str(runs),
            "--hours",
            "2",
        ],
        tmp / f"{name}.log",
        env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=5.0) as http:
            wait_until(
                lambda: http.get(f"{url}/_stcore/health").text.strip() == "ok",
                STARTUP_TIMEOUT_S,
                "Streamlit",
                proc,
            )
    except BaseException:
        stop(proc)
        raise
    return proc, url


API_SERVER = """
import sys, uvicorn
from configs.schema import ServeConfig
from serve.local import make_local_api
config = ServeConfig.model_validate_json(open(sys.argv[1]).read())
uvicorn.run(make_local_api(config), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    chromium = chromium_binary()
    tmp = tmp_path_factory.mktemp("dashboard")
    lake, runs = tmp / "lake", tmp / "runs"
    from market.sim_silver import write_sim_silver

    write_sim_silver(lake, SIM, [SYMBOL], SIM_DAYS)
    run = write_run_dir(runs / "tune-20240508T000000Z")
    version = register_model(tmp / "registry", seed=3)
    secret_file = tmp / "secret"
    secret_file.write_text("dashboard-e2e-secret-" + "q" * 40)
    secret_file.chmod(0o600)
    config = ServeConfig(
        registry=str(tmp / "registry"),
        registry_poll_s=3600.0,
        auth=AuthConfig(
            jwt=JwtConfig(secret_env="QUANT_AI_UNSET_FOR_TESTS", secret_file=str(secret_file)),
            clients_file=str(tmp / "clients.yaml"),
            rate_limit_per_minute=6000,
            rate_limit_burst=600,
        ),
        feed=FeedConfig(
            source="sim",
            symbols=[SYMBOL],
            history_bars=300,
            replay_bars_per_s=REPLAY_BARS_PER_S,
            stale_after_s=3600.0,
            sim_days=SIM_DAYS,
            sim=SIM,
        ),
        gold=GoldConfig(url=f"sqlite:///{tmp / 'gold.sqlite'}"),
    )
    secret = ClientStore.load(config.auth.clients_file).add(CLIENT_ID, ["signals:read"])
    (tmp / "serve.json").write_text(config.model_dump_json())
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUANT_AI_")}
    env |= {"PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1,localhost"}
    api_port = free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        api = start(
            [sys.executable, "-c", API_SERVER, str(tmp / "serve.json"), str(api_port)],
            tmp / "api.log",
            env,
        )
        procs.append(api)
        env |= {"QUANT_AI_API_URL": api_url}
        dashboard, dashboard_url = start_dashboard(
            tmp,
            lake,
            runs,
            env | {"QUANT_AI_CLIENT_ID": CLIENT_ID, "QUANT_AI_CLIENT_SECRET": secret},
            "streamlit",
        )
        procs.append(dashboard)
        with httpx.Client(timeout=5.0) as http:
            wait_until(
                lambda: http.get(f"{api_url}/healthz").status_code == 200,
                STARTUP_TIMEOUT_S,
                "API",
                api,
            )
            form = {"grant_type": "client_credentials", "client_id": CLIENT_ID}
            token = http.post(f"{api_url}/token", data=form | {"client_secret": secret}).json()[
                "access_token"
            ]
            headers = {"Authorization": f"Bearer {token}"}

            def filled() -> bool:
                params: dict[str, Any] = {"symbol": SYMBOL, "limit": 500}
                answer = http.get(f"{api_url}/signals/history", params=params, headers=headers)
                rows = answer.json()["signals"]
                hits = {r["hit"] for r in rows if r["signal"] != "NEUTRAL"}
                filled = sum(r["filled_at_ms"] is not None for r in rows)
                return filled >= FILLED_SIGNALS and {True, False} <= hits

            wait_until(filled, STARTUP_TIMEOUT_S, "filled signals", api)
        yield Stack(
            dashboard_url,
            api_url,
            token,
            run["best"],
            run["hold_return"],
            version,
            chromium,
            tmp,
            lake,
            runs,
            env,
        )
    finally:
        for proc in reversed(procs):
            stop(proc)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for log in tmp.glob("*.log"):
            shutil.copy(log, ARTIFACTS / f"dashboard-{log.name}")


# --------------------------------------------------------------------------------------------
# Headless Chromium, driven over the DevTools protocol


class Browser:
    """Headless Chromium with a DevTools websocket (loopback only).

    Streamlit renders client-side from websocket messages; `--virtual-time-budget` counts only
    network fetches, so a one-shot `chromium --screenshot` fires while the script is still
    running (a blank page with grey placeholders, measured here). Over DevTools the test waits
    for what it needs to see: Streamlit's app element reporting the script run finished
    (`data-test-script-state="notRunning"`) and the Plotly figures drawn.
    """

    def __init__(self, binary: str, profile: Path, width: int, height: int) -> None:
        self.width, self.height = width, height
        self._ids = itertools.count(1)
        shutil.rmtree(profile, ignore_errors=True)
        self.proc = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            port_file = profile / "DevToolsActivePort"
            wait_until(
                lambda: port_file.exists() and port_file.read_text().strip(),
                30.0,
                "Chromium DevTools",
                self.proc,
            )
            port = int(port_file.read_text().split()[0])
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5.0).json()
            page = next(t for t in targets if t["type"] == "page")
            self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        except BaseException:
            stop(self.proc)
            raise

    def call(self, method: str, timeout_s: float = 30.0, **params: Any) -> dict[str, Any]:
        number = next(self._ids)
        self.ws.send(json.dumps({"id": number, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == number:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    def js(self, expression: str) -> Any:
        answer = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return answer["result"].get("value")

    def load(self, url: str, figures: int, timeout_s: float = 90.0) -> dict[str, Any]:
        """Open `url` and wait until the Streamlit script has finished and `figures` Plotly
        figures are drawn (or the timeout passes); returns the last page state seen."""
        self.call("Page.navigate", url=url)
        probe = """JSON.stringify({
            script: document.querySelector('[data-testid="stApp"]')
                ?.getAttribute('data-test-script-state') ?? null,
            figures: document.querySelectorAll('.js-plotly-plot').length,
            height: document.querySelector('[data-testid="stMain"]')?.scrollHeight ?? 0})"""
        state: dict[str, Any] = {}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.js(probe)
            state = json.loads(text) if text else {}
            if state.get("script") == "notRunning" and state.get("figures", 0) >= figures:
                time.sleep(1.0)  # let Plotly finish drawing
                break
            time.sleep(0.5)
        return state

    def screenshot(self, path: Path, content_height: int) -> None:
        """A PNG of the whole dashboard: the viewport grown to the page's content height."""
        height = max(self.height, content_height + 100)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        time.sleep(1.0)  # relayout at the new size
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def dom(self) -> str:
        return str(self.js("document.documentElement.outerHTML"))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        stop(self.proc)


@contextlib.contextmanager
def browser(stack: Stack, name: str) -> Iterator[Browser]:
    profile = stack.tmp / f"chromium-{name}"
    opened = Browser(stack.chromium, profile, 1600, 2400)
    try:
        yield opened
    finally:
        opened.close()
        shutil.rmtree(profile, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The PNG


def png_pixels(path: Path) -> np.ndarray:
    """The PNG as an RGB uint8 array [height, width, 3]."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def colour_share(pixels: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 12) -> float:
    """Share of pixels within `tolerance` (per channel, 0-255) of `rgb`."""
    distance = np.abs(pixels.astype(np.int16) - np.array(rgb, dtype=np.int16)).max(axis=2)
    return float((distance <= tolerance).mean())


def image_stats(pixels: np.ndarray) -> dict[str, float]:
    """Distinct colours (quantised to 32 levels a channel), the share of non-white pixels and
    the shares of the two candlestick colours."""
    flat = pixels.reshape(-1, 3)
    quantised = (flat // 8).astype(np.int32)
    codes = quantised[:, 0] * 1024 + quantised[:, 1] * 32 + quantised[:, 2]
    return {
        "width": float(pixels.shape[1]),
        "height": float(pixels.shape[0]),
        "distinct_colours": float(len(np.unique(codes))),
        "non_white": float((flat.min(axis=1) < 245).mean()),
        "candle_up": colour_share(pixels, CANDLE_UP),
        "candle_down": colour_share(pixels, CANDLE_DOWN),
    }


def rendered(stats: dict[str, float]) -> bool:
    return (
        stats["distinct_colours"] >= 200
        and stats["non_white"] >= 0.05
        and stats["candle_up"] > 2e-4
        and stats["candle_down"] > 2e-4
    )


# --------------------------------------------------------------------------------------------
# Tests


def test_dashboard_renders_charts_signals_backtest_and_leaderboard(stack: Stack) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    stats: dict[str, float] = {}
    dom = ""
    with browser(stack, "main") as page:
        for attempt in range(2):  # retry once if the first screenshot comes out blank
            state = page.load(stack.dashboard_url, figures=2)
            SCREENSHOT.unlink(missing_ok=True)
            page.screenshot(SCREENSHOT, int(state.get("height", 0)))
            stats = image_stats(png_pixels(SCREENSHOT)) | {"attempt": float(attempt)}
            dom = page.dom()
            if rendered(stats):
                break
    DOM_DUMP.write_text(dom)
    (ARTIFACTS / "dashboard-stats.json").write_text(json.dumps(stats, indent=2))
    assert stats["distinct_colours"] >= 200, stats
    assert stats["non_white"] >= 0.05, stats
    assert stats["candle_up"] > 2e-4 and stats["candle_down"] > 2e-4, stats

    text = re.sub(r"<[^>]+>", " ", dom)
    for wanted in (
        "Quant-AI signal dashboard",
        f"Latest signal · {SYMBOL}",
        "Serving model",
        stack.latest_version,
        "Backtest: best trial vs buy-and-hold",
        "Leaderboard",
        stack.best_trial,
        # The stored reference (1 bp fees here), not a re-scoring with default fees.
        "Buy-and-hold return",
        f"{stack.hold_return:+.2%}",
        "Buy-and-hold is the sweep",
    ):
        assert wanted in text, f"{wanted!r} missing from the rendered page"
    # Served signals drawn as markers, coloured by realised outcome (legend entries).
    assert re.search(r"(BUY|SELL) · hit", text) and re.search(r"(BUY|SELL) · miss", text)
    assert "Traceback" not in text and 'data-testid="stException"' not in dom
    assert "Signal API answered" not in text and "unavailable" not in text
    assert dom.count('class="js-plotly-plot"') + dom.count("js-plotly-plot ") >= 2


def test_dashboard_shows_a_readable_error_when_login_is_refused(stack: Stack) -> None:
    """A wrong client secret: the page says why in words, and still draws Silver and the
    backtest (which need no API)."""
    env = stack.env | {"QUANT_AI_CLIENT_ID": CLIENT_ID, "QUANT_AI_CLIENT_SECRET": "wrong"}
    proc, url = start_dashboard(stack.tmp, stack.lake, stack.runs, env, "streamlit-refused")
    try:
        with browser(stack, "refused") as page:
            page.load(url, figures=2)
            dom = page.dom()
    finally:
        stop(proc)
    (ARTIFACTS / "dashboard-refused.html").write_text(dom)
    text = re.sub(r"<[^>]+>", " ", dom)
    assert (
        "Connecting: Signal API answered 401 invalid_client: unknown client id or wrong client "
        "secret — check the client id and secret." in re.sub(r"\s+", " ", text)
    ), text[:3000]
    assert "Traceback" not in text
    assert "Leaderboard" in text and f"{SYMBOL} · 2 h" in text
