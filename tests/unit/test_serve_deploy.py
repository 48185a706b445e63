"""serve.deploy without Ray: the configuration a deployment runs with (overrides, the Gold store
rule, absolute paths, the pipeline's feed) and the readiness wait against a real HTTP server.
Deploying on Ray Serve is in tests/integration/test_serve_app.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cluster.ray_runtime import free_port
from configs.schema import (
    DEFAULT_GOLD_URL,
    DEFAULT_SERVE_CONFIG,
    EngineShardsConfig,
    FeedConfig,
    GoldConfig,
    IngestConfig,
    PredictConfig,
    ServeConfig,
    load_config,
)
from market.lake import Lake
from serve.deploy import feed_for, gold_for_lake, resolve_config, universe_feed, wait_until_ok
from tests.conftest import REPO

POSTGRES = "postgresql+psycopg://gold:secret@db.internal:5432/gold"


def test_the_default_gold_store_moves_into_the_lake(tmp_path: Path) -> None:
    lake = str(tmp_path / "lake")
    moved = gold_for_lake(GoldConfig(), lake)
    assert moved.url == Lake.at(lake).gold_sqlite_url
    assert moved.url == f"sqlite:///{tmp_path / 'lake' / 'gold' / 'signals.sqlite'}"


@pytest.mark.parametrize("url", [POSTGRES, "sqlite:////srv/gold/mine.sqlite", "sqlite:///g.db"])
def test_a_gold_store_of_its_own_is_never_replaced(url: str, tmp_path: Path) -> None:
    gold = GoldConfig(url=url)
    assert gold_for_lake(gold, str(tmp_path / "lake")) is gold
    config = resolve_config(ServeConfig(gold=gold), lake=str(tmp_path / "lake"))
    assert config.gold.url.endswith(url.removeprefix("sqlite:///"))
    assert "lake" not in config.gold.url


def test_without_a_lake_the_default_gold_store_stays() -> None:
    assert gold_for_lake(GoldConfig(), None).url == DEFAULT_GOLD_URL


def test_an_object_store_lake_keeps_the_default_gold_store(tmp_path: Path) -> None:
    """A SQLite file cannot live on an object store, nor under a local directory named like one."""
    assert gold_for_lake(GoldConfig(), "s3://bucket/lake").url == DEFAULT_GOLD_URL
    file_lake = f"file://{tmp_path}/lake"
    assert gold_for_lake(GoldConfig(), file_lake).url == Lake.at(file_lake).gold_sqlite_url


def test_the_shipped_serve_config_uses_the_default_gold_store(tmp_path: Path) -> None:
    """`make run` and `jobs.deploy --lake` put Gold into the lake only because of this."""
    config = load_config(REPO / DEFAULT_SERVE_CONFIG, ServeConfig)
    assert config.gold.url == DEFAULT_GOLD_URL
    resolved = resolve_config(config, lake=str(tmp_path / "lake"))
    assert resolved.gold.url == Lake.at(tmp_path / "lake").gold_sqlite_url


def test_overrides_apply_and_paths_become_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    feed = FeedConfig(source="dump", symbols=["BTCUSDT"], dump_path="data/btc.csv")
    config = resolve_config(
        ServeConfig(), registry="reg", port=8123, host="0.0.0.0", feed=feed, lake=None
    )
    assert (config.registry, config.port, config.host) == (str(tmp_path / "reg"), 8123, "0.0.0.0")
    assert config.feed.dump_path == str(tmp_path / "data" / "btc.csv")
    assert config.gold.url == f"sqlite:///{tmp_path / 'var' / 'gold.sqlite'}"
    assert config.auth.clients_file == str(tmp_path / ".secrets" / "clients.yaml")
    assert config.auth.jwt.secret_file == str(tmp_path / ".secrets" / "jwt_secret")
    kept = resolve_config(ServeConfig(registry="s3://bucket/registry", port=9000))
    assert (kept.registry, kept.port, kept.host) == ("s3://bucket/registry", 9000, "127.0.0.1")


def test_the_feed_follows_what_the_pipeline_ingested() -> None:
    serve_feed = FeedConfig(symbols=["SIMBTC"], replay_bars_per_s=3.0)
    dump = feed_for(IngestConfig(source="dump", symbols=["BTCUSDT"], path="d.csv"), serve_feed)
    assert (dump.source, dump.symbols, dump.dump_path) == ("dump", ["BTCUSDT"], "d.csv")
    assert dump.replay_bars_per_s == 3.0
    sim = feed_for(IngestConfig(source="sim", symbols=["SIMA", "SIMB"]), serve_feed)
    assert (sim.source, sim.symbols, sim.dump_path, sim.sim) == (
        "sim",
        ["SIMA", "SIMB"],
        None,
        serve_feed.sim,
    )


@pytest.fixture
def flaky_server() -> Iterator[tuple[str, list[str]]]:
    """Answers 503 to the first two GETs, then 200; records the Authorization headers."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            self.send_response(200 if len(seen) > 2 else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/readyz", seen
    finally:
        server.shutdown()
        server.server_close()


def test_wait_until_ok_polls_until_200(flaky_server: tuple[str, list[str]]) -> None:
    url, seen = flaky_server
    wait_until_ok(url, timeout_s=10, headers={"Authorization": "Bearer t"}, poll_s=0.01)
    assert seen == ["Bearer t"] * 3


def test_wait_until_ok_times_out_while_nothing_answers() -> None:
    url = f"http://127.0.0.1:{free_port()}/healthz"
    with pytest.raises(TimeoutError, match="did not answer 200"):
        wait_until_ok(url, timeout_s=0.2, poll_s=0.05)


def test_a_universe_adds_simulated_symbols_that_the_engine_serves(tmp_path: Path) -> None:
    from serve.engine.engine import SignalEngine
    from tests.serve_support import register_model
    from tests.unit.test_serve_engine import FakeClock, config_for

    trained = feed_for(IngestConfig(source="sim", symbols=["SIMA", "SIMB"]), FeedConfig())
    feed = universe_feed(trained, 50)
    assert feed.source == "sim"
    assert feed.symbols[:3] == ["SIMA", "SIMB", "SIM0001"] and feed.symbols[-1] == "SIM0050"
    assert len(feed.symbols) == 52
    # From a dump or Binance, the live feed becomes the simulator of the universe alone.
    dump = feed_for(IngestConfig(source="dump", symbols=["BTCUSDT"], path="d.csv"), FeedConfig())
    assert universe_feed(dump, 3).symbols == ["SIM0001", "SIM0002", "SIM0003"]
    with pytest.raises(ValueError, match="at least one"):
        universe_feed(trained, 0)

    # A model registered for the trained symbols serves a symbol it never saw.
    register_model(tmp_path / "registry", seed=1)
    config = config_for(tmp_path, symbols=universe_feed(trained, 50).symbols)
    clock = FakeClock()
    engine = SignalEngine(config, clock=clock)
    assert engine.refresh_model()
    engine.tick()
    clock.now += 1.0
    assert engine.tick()["SIM0042"] == 1
    signal = engine.signal("SIM0042")
    assert signal.signal in ("BUY", "SELL", "NEUTRAL") and signal.p_up is not None
    assert signal.bar_open_time_ms == engine.feed.last_bar_open_ms("SIM0042")


def test_every_deployment_reserves_the_cpus_its_config_names() -> None:
    """On a cluster whose head has no CPUs, a CPU share keeps a replica on the workers."""
    from serve.app import build_app

    config = ServeConfig(
        ingress_cpus=0.1,
        predict=PredictConfig(cpus_per_replica=0.2),
        engine=EngineShardsConfig(shards=2, cpus_per_shard=0.3),
        feed=FeedConfig(symbols=["SIMA", "SIMB"]),
    )
    # The bound application: the ingress deployment, bound with the engine shards' and the
    # predictor's applications.
    ingress = build_app(config)._bound_deployment
    engines, predictor, _ = ingress.init_args
    assert ingress.ray_actor_options == {"num_cpus": 0.1}
    assert [engine._bound_deployment.ray_actor_options for engine in engines] == [
        {"num_cpus": 0.3},
        {"num_cpus": 0.3},
    ]
    assert predictor._bound_deployment.ray_actor_options["num_cpus"] == 0.2
    # Nothing reserved by default: a single machine's local Ray places them anywhere.
    defaults = build_app(ServeConfig())._bound_deployment
    assert defaults.ray_actor_options == {"num_cpus": 0.0}
    assert ServeConfig().proxy_location == "EveryNode"
