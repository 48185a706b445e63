"""Typed configuration: pydantic models loaded from YAML, unknown keys rejected."""

from __future__ import annotations

import ipaddress
import math
from datetime import date
from pathlib import Path
from typing import Annotated, Final, Literal, TypeVar, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializationInfo,
    StringConstraints,
    field_serializer,
    field_validator,
    model_validator,
)

# Only pydantic and PyYAML at module level: the Airflow DAG imports this module (through
# cluster.ray_jobs) in an environment that may lack Ray, torch and polars.

DEFAULT_PIPELINE_CONFIG: Final = "configs/pipeline/local.yaml"
"""The pipeline YAML that `make run` uses, relative to the repository root."""

DEFAULT_TUNE_CONFIG: Final = "configs/tune/smoke.yaml"
"""The sweep YAML of the pipeline's tune stage, relative to the repository root."""

DEFAULT_SERVE_CONFIG: Final = "configs/serve/local.yaml"
"""The serve YAML of the pipeline's deploy stage, relative to the repository root."""

KlineSource = Literal["binance", "dump", "sim"]
SOURCES: Final[tuple[str, ...]] = get_args(KlineSource)
"""Where klines come from: Binance REST, Binance dump files, the market simulator."""

SYMBOL_PATTERN: Final = r"^[A-Z0-9]{2,20}$"
"""A market symbol as ingested, served and asked for: upper-case letters and digits."""

Symbol = Annotated[str, StringConstraints(pattern=SYMBOL_PATTERN)]

DEFAULT_GOLD_URL: Final = "sqlite:///var/gold.sqlite"
"""The Gold store when nothing names one; a lake given to the deploy replaces it with the lake's
own store (`market.lake.Lake.gold_sqlite_url`)."""


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are an error, not a silent no-op."""

    model_config = ConfigDict(extra="forbid", frozen=True)


REVEAL_SECRETS: Final = "reveal_secrets"
"""Serialization context key: `model_dump(mode="json", context={REVEAL_SECRETS: True})` writes
an `ObjectStoreConfig`'s secret key in clear (for a config handed to Ray Serve replicas, which
get plain mappings); any other dump masks it."""


class ObjectStoreConfig(StrictModel):
    """How `s3://` locations (lake, registry, sweep runs) are reached. Every field left unset is
    read from the standard environment, as every S3 tool reads it: `AWS_ENDPOINT_URL`,
    `AWS_REGION` (or `AWS_DEFAULT_REGION`), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`; keep
    credentials in the environment rather than in a committed YAML. The pipeline, tune and
    serve configs each hold one (`object_store:`)."""

    endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint, e.g. http://127.0.0.1:8333; None: AWS's own",
    )
    region: str | None = Field(default=None, description="None: the environment's, else us-east-1")
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    connect_timeout_s: float = Field(
        default=3.0, gt=0, description="per connection attempt; bounds the reachability probe"
    )
    request_timeout_s: float = Field(default=60.0, gt=0, description="per request")

    @field_validator("endpoint_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint_url {url!r} must start with http:// or https://")
        return url

    def endpoint_environment(self) -> dict[str, str]:
        """The endpoint and region as the standard variables (`AWS_ENDPOINT_URL`, `AWS_REGION`),
        for a process on another machine to reach the same store. Never the credentials: what
        crosses a process boundary this way is shown by Ray's dashboard, so the machines that
        run the jobs hold their own credentials (environment or YAML)."""
        environment = {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_REGION": self.region}
        return {name: value for name, value in environment.items() if value}

    @field_serializer("secret_access_key", when_used="json")
    def _masked_unless_revealed(
        self, secret: SecretStr | None, info: SerializationInfo
    ) -> str | None:
        if secret is None:
            return None
        context = info.context or {}
        return secret.get_secret_value() if context.get(REVEAL_SECRETS) else str(secret)


class RayConfig(StrictModel):
    """Where Ray runs. `address` None starts a local Ray (RAY_ADDRESS still wins)."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    namespace: str = "quant-ai"
    # The dashboard also serves Ray's State API, which Ray Train's placement-group cleaner needs
    # to free the workers of trials that ASHA stops.
    include_dashboard: bool = True
    object_store_memory_mb: int | None = Field(default=None, ge=64)


class SparkConfig(StrictModel):
    """The RayDP Spark session of the feature ETL."""

    app_name: str = "quant-ai-features"
    executors: int = Field(default=1, ge=1)
    executor_cores: int = Field(default=2, ge=1)
    executor_memory: str = "3g"
    driver_memory: str = "2g"
    shuffle_partitions: int = Field(default=4, ge=1)
    extra: dict[str, str] = Field(default_factory=dict)


class SimConfig(StrictModel):
    """The seeded market simulator. Volatilities are per 1-minute bar (not annualised)."""

    seed: int = 42
    anchor_date: date = date(2024, 1, 1)
    minute_vol: float = Field(default=8e-4, gt=0)
    garch_alpha: float = Field(default=0.05, ge=0, lt=1)
    garch_beta: float = Field(default=0.93, ge=0, lt=1)
    student_t_dof: float = Field(default=4.0, gt=2)
    signal_strength: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="share of each bar's return explained by the "
        "planted signal (0 = martingale returns)",
    )
    signal_persistence: float = Field(default=0.9, ge=0, lt=1)
    market_correlation: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="correlation of any two symbols' same-minute return shocks: each shock is "
        "sqrt(rho) x a market-wide shock + sqrt(1 - rho) x the symbol's own (0 = independent)",
    )
    gap_rate: float = Field(
        default=0.0, ge=0, le=0.01, description="per-bar probability that an outage starts"
    )
    max_gap_minutes: int = Field(default=30, ge=1)

    @field_validator("garch_beta")
    @classmethod
    def _stationary(cls, beta: float, info: object) -> float:
        alpha = getattr(info, "data", {}).get("garch_alpha", 0.0)
        if alpha + beta >= 1:
            raise ValueError("garch_alpha + garch_beta must be < 1 (stationary variance)")
        return beta


class BinanceConfig(StrictModel):
    """The Binance REST klines client."""

    base_url: str = "https://api.binance.com"
    timeout_s: float = Field(default=10.0, gt=0)
    max_retries: int = Field(default=8, ge=0)
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    weight_limit_per_minute: int = Field(default=6000, ge=1)
    weight_safety: float = Field(default=0.8, gt=0, le=1)
    klines_weight: int = Field(default=2, ge=1)
    page_limit: int = Field(default=1000, ge=1, le=1000)


BINANCE_STREAM_DOCS: Final = (
    "https://developers.binance.com/docs/binance-spot-api-docs/web-socket-streams"
)
"""Binance's spot WebSocket Streams documentation, the source of the limits below."""

BinanceLive = Literal["websocket", "polling"]
"""How the `binance` feed receives live bars: the WebSocket kline stream (with REST backfill after
a reconnect and REST catch-up while a connection is down) or REST polling alone."""


class BinanceStreamConfig(StrictModel):
    """Binance's WebSocket kline stream (`market.sources.binance_ws`).

    Binance's documented limits (BINANCE_STREAM_DOCS, "WebSocket Limits"): a connection listens
    to at most 1024 streams; it may send at most 5 messages per second, where a PING frame, a
    PONG frame and a JSON control message (SUBSCRIBE, ...) each count, and a connection beyond
    that is disconnected; at most 300 connection attempts per 5 minutes per IP. The server pings
    every 20 s and drops a connection that has not answered with a pong within a minute, and it
    cuts every connection at 24 h.
    """

    url: str = Field(
        default="wss://stream.binance.com:9443", description="base URL; `/stream` is appended"
    )
    max_streams_per_connection: int = Field(
        default=1024, ge=1, le=1024, description="symbols per connection (Binance: at most 1024)"
    )
    streams_per_message: int = Field(
        default=100,
        ge=1,
        description="streams named in the connect URL and in each SUBSCRIBE message",
    )
    max_messages_per_s: int = Field(
        default=5,
        ge=2,
        le=5,
        description="Binance's limit on messages a client sends per second; SUBSCRIBE messages "
        "go out at one fewer per second, leaving room for the pong to a server ping",
    )
    stall_timeout_s: float = Field(
        default=65.0,
        gt=0,
        description="seconds without any message after which a connection is deemed stalled and "
        "replaced; Binance pushes each kline stream every 2 s, and over a minute leaves room for "
        "the closing update every stream sends each minute",
    )
    open_timeout_s: float = Field(default=10.0, gt=0, description="handshake timeout, seconds")
    ack_timeout_s: float = Field(
        default=10.0, gt=0, description="seconds a SUBSCRIBE may wait for its answer"
    )
    backoff_base_s: float = Field(
        default=1.0, gt=0, description="first reconnect wait cap; it doubles per failed attempt"
    )
    backoff_max_s: float = Field(default=60.0, gt=0, description="largest reconnect wait cap")
    backfill_retry_s: float = Field(
        default=10.0, gt=0, description="seconds before a failed REST backfill is tried again"
    )
    max_connection_age_s: float = Field(
        default=23 * 3600.0,
        gt=0,
        lt=24 * 3600.0,
        description="seconds after which a connection is replaced (the replacement subscribed "
        "before the old one closes), ahead of Binance's 24 h cut",
    )


class IngestConfig(StrictModel):
    """What `jobs.ingest` fetches. Dates are UTC; `end` is inclusive to the minute."""

    source: KlineSource = "sim"
    symbols: list[Symbol] = Field(default_factory=lambda: ["BTCUSDT"], min_length=1)
    start: str | None = None
    end: str | None = None
    path: str | None = None
    sim_days: int = Field(default=14, ge=1, description="days simulated when no end is given")
    sim: SimConfig = SimConfig()
    binance: BinanceConfig = BinanceConfig()


class PipelineConfig(StrictModel):
    """`jobs.pipeline`: the stages that `make run` chains."""

    lake: str = "lake"
    registry: str = "registry"
    runs: str = Field(default="runs", description="where each sweep's leaderboard/report go")
    object_store: ObjectStoreConfig = Field(
        default_factory=ObjectStoreConfig,
        description="endpoint, region and credentials of s3:// locations",
    )
    tune: str | None = Field(
        default=DEFAULT_TUNE_CONFIG,
        description="tune YAML of the sweep stage (its `ray` and `object_store` sections are "
        "ignored: the pipeline connects once, to one store); None stops after Silver",
    )
    serve: str | None = Field(
        default=DEFAULT_SERVE_CONFIG,
        description="serve YAML of the deploy stage (its `object_store` section is ignored: "
        "the pipeline's applies); None stops after the gate",
    )
    retrain_interval_minutes: float | None = Field(
        default=None, gt=0, description="re-run ingest -> features -> tune -> gate this often"
    )
    ray: RayConfig = RayConfig()
    spark: SparkConfig = SparkConfig()
    ingest: IngestConfig = IngestConfig()


class BacktestConfig(StrictModel):
    """Vectorised backtest of BUY/SELL/NEUTRAL decisions. Costs are in basis points per side.

    A decision taken at the close of bar t trades at the open of bar t+1. BUY needs
    p_up >= `p_up_threshold` and a predicted return above the round-trip cost plus
    `min_edge_bps`; SELL is the mirror image. Once entered, a position is held for at least
    `hold_bars` bars (None: the prediction horizon) unless an opposite signal arrives.

    `sizing` sets the exposure (signed notional as a fraction of equity) of a position:
    ``all_in`` puts all of equity into every position (-1, 0 or +1); ``probability`` scales it
    with the signal's P(up): ``clip(|p_up - 0.5| / (full_size_p_up - 0.5), 0, 1)``, in [-1, 1]
    for long_short and [0, 1] for long_only (`models.backtest.probability_sizes`), and pays the
    fee and slippage on every change of exposure (turnover), re-sizings included.
    `fee_side` picks the fee of every fill: `taker_fee_bps` or `maker_fee_bps`.
    """

    mode: Literal["long_short", "long_only"] = "long_short"
    sizing: Literal["all_in", "probability"] = "all_in"
    full_size_p_up: float = Field(
        default=0.75,
        gt=0.5,
        le=1.0,
        description="P(up) (and 1 - P(up) for a short) at which probability sizing is all in",
    )
    fee_side: Literal["taker", "maker"] = "taker"
    taker_fee_bps: float = Field(default=10.0, ge=0)
    maker_fee_bps: float = Field(default=2.0, ge=0)
    slippage_bps: float = Field(default=0.0, ge=0)
    p_up_threshold: float = Field(default=0.55, ge=0.5, le=1.0)
    min_edge_bps: float = Field(default=0.0, ge=0)
    hold_bars: int | None = Field(
        default=None,
        ge=1,
        description="bars a position is held; None follows the model's label horizon",
    )
    bars_per_year: float = Field(
        default=525_600.0, gt=0, description="1-minute bars in a 365-day, 24/7 year"
    )

    @property
    def fee_bps(self) -> float:
        """The fee charged per side on every fill, in bps."""
        return self.taker_fee_bps if self.fee_side == "taker" else self.maker_fee_bps


MAX_CPCV_SPLITS: Final = 256
"""The most CPCV splits, C(groups, test_groups), a sweep may ask for: every split trains one
model per trial."""


class FoldConfig(StrictModel):
    """How candidates are trained and scored out of sample, in bars (1 bar = 1 minute).

    `rolling` / `expanding`: walk-forward folds of `train_bars`, `val_bars` and `test_bars`
    (purge >= horizon + longest feature window), at most `max_folds`, most recent last.

    `cpcv`: combinatorial purged cross-validation (`models.cpcv`): the timeline is cut into
    `groups` (N) groups; each of the C(N, k) combinations of `test_groups` (k) groups is a split
    trained on the other bars, less `purge_bars` on both sides of every test group and
    `embargo_bars` after it; the last `val_bars` training bars of each split validate it. The
    split predictions assemble into k / N * C(N, k) backtest paths. `train_bars`, `test_bars`
    and `max_folds` belong to walk-forward and are refused here; `purge_bars` None is the
    horizon + the longest feature window + the longest model window (checked when the folds are
    made, against the data's length).
    """

    scheme: Literal["rolling", "expanding", "cpcv"] = "rolling"
    train_bars: int = Field(default=20_000, ge=100)
    val_bars: int = Field(default=4_000, ge=10)
    test_bars: int = Field(default=4_000, ge=10)
    purge_bars: int | None = Field(
        default=None,
        ge=0,
        description="None = horizon + longest feature window (+ longest model window for cpcv)",
    )
    embargo_bars: int = Field(default=60, ge=0)
    max_folds: int | None = Field(default=None, ge=1)
    groups: int | None = Field(default=None, ge=2, description="cpcv: N, the number of groups")
    test_groups: int | None = Field(
        default=None, ge=1, description="cpcv: k, the test groups of each split (1 <= k < N)"
    )

    @property
    def most_training_units(self) -> int | None:
        """The most folds (walk-forward) or splits (CPCV, C(N, k)) this config cuts; None when
        the data's length decides (walk-forward without `max_folds`)."""
        if self.scheme == "cpcv" and self.groups is not None and self.test_groups is not None:
            return math.comb(self.groups, self.test_groups)
        return self.max_folds

    @model_validator(mode="after")
    def _scheme_fields(self) -> FoldConfig:
        if self.scheme != "cpcv":
            if self.groups is not None or self.test_groups is not None:
                raise ValueError(
                    f"groups and test_groups belong to scheme 'cpcv', not {self.scheme!r}"
                )
            return self
        if self.groups is None or self.test_groups is None:
            raise ValueError("scheme 'cpcv' needs groups (N) and test_groups (k)")
        if self.test_groups >= self.groups:
            raise ValueError(
                f"test_groups ({self.test_groups}) must be smaller than groups ({self.groups}): "
                "every split needs training groups"
            )
        # Compared with the defaults rather than with what was set, so that a dumped config
        # (every field written out) loads again.
        walk_forward = [
            f"{name}={getattr(self, name)}"
            for name in ("train_bars", "test_bars", "max_folds")
            if getattr(self, name) != type(self).model_fields[name].default
        ]
        if walk_forward:
            raise ValueError(
                f"{', '.join(walk_forward)}: walk-forward settings, which scheme 'cpcv' does "
                "not use (it sizes its groups from the data: groups, test_groups)"
            )
        splits = math.comb(self.groups, self.test_groups)
        if splits > MAX_CPCV_SPLITS:
            raise ValueError(
                f"C({self.groups}, {self.test_groups}) = {splits} splits, each a model per "
                f"trial, exceeds {MAX_CPCV_SPLITS}"
            )
        return self


ModelFamily = Literal["lstm", "gru", "tcn"]
MODEL_FAMILIES: tuple[ModelFamily, ...] = ("lstm", "gru", "tcn")


LabelHorizon = Literal[10, 30, 60, 240]
"""A label horizon in 1-minute bars: one of the horizons Silver carries targets for
(`market.features.spec.TARGET_HORIZONS_BARS`; a test holds the two equal)."""

LabelKind = Literal["direction", "triple_barrier", "meta"]
"""What the classification head learns: the sign of the horizon's return (`direction`),
which of two cost-aware price barriers the next bars touch first (`triple_barrier`), or whether
the side a primary rule proposes clears the round-trip cost within the horizon (`meta`, see
MetaLabelConfig)."""


def _default_horizons() -> list[LabelHorizon]:
    return [10]


def _default_labels() -> list[LabelKind]:
    return ["direction"]


class SearchSpaceConfig(StrictModel):
    """What Ray Tune samples. Lists are categorical choices; pairs are (low, high) ranges.

    `horizon_bars` picks the label horizon (bars) of a trial: its targets, its backtest hold
    (unless `backtest.hold_bars` is set) and the model's served horizon. `label` picks the
    classification target (`direction`, `triple_barrier` (see TripleBarrierConfig) or `meta`
    (see MetaLabelConfig)). `cross_asset` picks whether a trial's model also reads every
    swept symbol's same-minute 1-minute log return (one global model over all the symbols, see
    `models.dataset.cross_asset_inputs`).
    """

    horizon_bars: list[LabelHorizon] = Field(default_factory=_default_horizons, min_length=1)
    label: list[LabelKind] = Field(default_factory=_default_labels, min_length=1)
    cross_asset: list[bool] = Field(default_factory=lambda: [False], min_length=1)

    family: list[ModelFamily] = Field(default_factory=lambda: list(MODEL_FAMILIES), min_length=1)
    hidden_size: list[int] = Field(default_factory=lambda: [16, 32], min_length=1)
    num_layers: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)
    dropout: tuple[float, float] = (0.0, 0.2)
    learning_rate: tuple[float, float] = (1e-3, 5e-3)
    window_bars: list[int] = Field(default_factory=lambda: [30, 60], min_length=1)
    batch_size: list[int] = Field(default_factory=lambda: [256, 512], min_length=1)
    tcn_kernel_size: list[int] = Field(default_factory=lambda: [2, 3], min_length=1)
    tcn_dilations: list[list[int]] = Field(
        default_factory=lambda: [[1, 2, 4], [1, 2, 4, 8]], min_length=1
    )


class ScalingSettings(StrictModel):
    """Ray Train `ScalingConfig` of one trial's training run."""

    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    trial_driver_cpus: float = Field(
        default=0.5,
        ge=0,
        description="CPU held by each Tune trial's driver (it evaluates the trained folds)",
    )


class GateConfig(StrictModel):
    """Promotion gate: DSR over all trials and beating buy-and-hold and every baseline; the
    Probability of Backtest Overfitting (CSCV over the completed trials' out-of-sample
    returns) is computed for every sweep and gates only when `max_pbo` is set."""

    min_dsr: float = Field(default=0.95, ge=0, le=1)
    min_trades: int = Field(default=10, ge=0)
    max_pbo: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="refuse promotion when the sweep's PBO exceeds this probability; None "
        "(the default) records PBO without gating on it, until a power study calibrates the "
        "threshold. An undefined PBO (fewer than 2 completed trials) never blocks",
    )
    pbo_partitions: int = Field(
        default=16,
        ge=2,
        le=20,
        description="S, the even number of blocks CSCV cuts the out-of-sample bars into "
        "(C(S, S/2) splits; fewer are used when a block would hold under 2 bars)",
    )

    @field_validator("pbo_partitions")
    @classmethod
    def _even_partitions(cls, partitions: int) -> int:
        if partitions % 2:
            raise ValueError(f"pbo_partitions must be even, got {partitions}")
        return partitions


class TripleBarrierConfig(StrictModel):
    """Barriers of the `triple_barrier` label, measured from the decision bar's close.

    In `bps`, `profit_take` and `stop_loss` are basis points of price; in `vol` they are
    multiples of the decision bar's rv_60 (per-bar std of 1-minute log returns) scaled to the
    horizon by sqrt(horizon_bars). Both barriers are widened by the backtest's round-trip cost
    (2 x (fee + slippage) bps), so +1 (upper barrier first) means a long exiting there nets at
    least `profit_take` after costs, and -1 (lower first) that a short nets `stop_loss` after
    costs (for a long, its stop-loss). 0: neither barrier within the horizon (the time
    barrier), or both inside one bar (their order unknown).
    """

    unit: Literal["bps", "vol"] = "bps"
    profit_take: float = Field(default=10.0, ge=0)
    stop_loss: float = Field(default=10.0, ge=0)


class MetaLabelConfig(StrictModel):
    """The primary rule under the `meta` label, and what the meta label asks of its side.

    At the close of bar t the primary rule proposes a side from one model input known then:
    `momentum` takes the sign of `primary_feature`, `reversal` the opposite sign; a zero or
    missing value proposes nothing (no label, no trade). The meta label is 1 when that side's
    trade, entered at close_t, clears the round-trip cost within the horizon: its profit-take
    barrier is touched first, or no barrier is touched and its log return over the horizon
    exceeds the cost; 0 when its stop-loss comes first, both barriers fall in one bar, or it
    times out short of the cost. The barriers are `triple_barrier`'s, mirrored for a short
    (its profit-take below the close). The backtest trades the proposed side only when the
    model's probability reaches `backtest.p_up_threshold`.
    """

    primary_rule: Literal["momentum", "reversal"] = "momentum"
    primary_feature: str = Field(
        default="ret_10",
        description="the model input whose sign proposes the side (e.g. ret_10, macd_hist)",
    )


class TuneJobConfig(StrictModel):
    """`jobs.tune`: the sweep, its folds, backtest and promotion gate."""

    seed: int = 7
    ray: RayConfig = RayConfig()
    object_store: ObjectStoreConfig = Field(
        default_factory=ObjectStoreConfig,
        description="endpoint, region and credentials of s3:// lake, registry and runs",
    )
    symbols: list[Symbol] | None = Field(default=None, description="None = every Silver symbol")
    num_samples: int = Field(default=4, ge=1)
    max_concurrent_trials: int = Field(default=1, ge=1)
    parallel_folds: int = Field(
        default=1,
        ge=1,
        description="folds (or CPCV splits) of one trial trained at once, each its own Ray "
        "Train run of `scaling` (so a trial holds up to parallel_folds x num_workers workers "
        "besides its driver); 1 trains a trial's folds in turn in one run",
    )
    max_epochs: int = Field(default=3, ge=1, description="epochs per fold")
    asha: bool = True
    asha_grace_period: int = Field(default=1, ge=1)
    asha_reduction_factor: int = Field(default=2, ge=2)
    max_train_windows: int | None = Field(
        default=None, ge=1, description="subsample training windows per fold (seeded)"
    )
    search: SearchSpaceConfig = SearchSpaceConfig()
    scaling: ScalingSettings = ScalingSettings()
    folds: FoldConfig = FoldConfig()
    backtest: BacktestConfig = BacktestConfig()
    triple_barrier: TripleBarrierConfig = TripleBarrierConfig()
    meta_label: MetaLabelConfig = MetaLabelConfig()
    gate: GateConfig = GateConfig()
    model_name: str = "signal"

    @model_validator(mode="after")
    def _parallel_folds_within_folds(self) -> TuneJobConfig:
        most = self.folds.most_training_units
        if most is not None and self.parallel_folds > most:
            raise ValueError(
                f"parallel_folds ({self.parallel_folds}) exceeds the {most} folds (or splits) "
                "a trial trains: the extra runs would never start"
            )
        return self


class PowerStudyConfig(StrictModel):
    """`jobs.power`: the detection-power study. The sweep and gate of `tune` run over
    simulated markets with a planted signal of each of `strengths` (SimConfig.signal_strength)
    for each of `seeds`, and over pure random walks (strength 0) for each of
    `random_walk_seeds`. A run's seed seeds both its market and its sweep; the rest of `sim`
    is shared by every run. Each strength is also measured in user units at
    `accuracy_horizon_bars` (bars): the planted component's directional accuracy and the gross
    annualised Sharpe of its oracle, on the sweep's out-of-sample bars."""

    ray: RayConfig = RayConfig()
    tune: TuneJobConfig
    sim: SimConfig = SimConfig()
    symbols: list[Symbol] = Field(default_factory=lambda: ["SIMAAA", "SIMBBB"], min_length=1)
    days: int = Field(default=14, ge=1, description="simulated days per market")
    strengths: list[float] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1, description="seeds of every planted strength")
    random_walk_seeds: list[int] = Field(default_factory=list)
    accuracy_horizon_bars: LabelHorizon = 10
    detection_rate: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="a strength counts as detected when at least this share of its seeds "
        "is promoted",
    )
    max_concurrent_runs: int = Field(
        default=1,
        ge=1,
        description="runs sweeping at once; each holds its trial drivers' CPUs while its "
        "training waits for a worker's, so keep runs x trial_driver_cpus + one worker's CPUs "
        "within the cluster's",
    )

    @field_validator("strengths")
    @classmethod
    def _planted(cls, strengths: list[float]) -> list[float]:
        for strength in strengths:
            if not 0 < strength < 1:
                raise ValueError(
                    f"a planted strength lies in (0, 1), got {strength}: random walks are "
                    "`random_walk_seeds`"
                )
        if len(set(strengths)) != len(strengths):
            raise ValueError(f"strengths repeat: {strengths}")
        return sorted(strengths)

    @field_validator("seeds", "random_walk_seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat: {seeds}")
        return seeds


# The scopes a signal-API token may carry (clients are granted them in the clients file).
SCOPE_READ: Final = "signals:read"
"""GET /signal, GET /signals/history, GET /models/current."""
SCOPE_PREDICT: Final = "signals:predict"
"""POST /predict."""
ALL_SCOPES: Final = (SCOPE_READ, SCOPE_PREDICT)


MAX_JWT_LEEWAY_S: Final = 300
"""The largest clock-skew allowance `JwtConfig.leeway_s` may take, in seconds: a token stays
acceptable until at most this long after its `exp`."""


class JwtConfig(StrictModel):
    """JWT signing and verification. Lifetimes and leeway are in seconds.

    HS256 reads its secret from the environment variable `secret_env`, else from `secret_file`.
    RS256 verifies with `public_key_file` and signs (POST /token, the mint CLI) with
    `private_key_file`. Only `algorithm` is accepted on verification: `none` and the other
    family are rejected (no algorithm confusion). No token may live longer than `max_ttl_s`
    (`exp - iat`): minting refuses a longer lifetime and verification refuses such a token,
    wherever it was signed.
    """

    algorithm: Literal["HS256", "RS256"] = "HS256"
    secret_env: str = "QUANT_AI_JWT_SECRET"
    secret_file: str | None = ".secrets/jwt_secret"
    public_key_file: str | None = None
    private_key_file: str | None = None
    audience: str = "quant-ai"
    issuer: str = "quant-ai"
    token_ttl_s: int = Field(default=900, ge=1)
    max_ttl_s: int = Field(
        default=86_400,
        ge=1,
        description="the longest token lifetime (exp - iat) minted or accepted, in seconds",
    )
    leeway_s: int = Field(default=10, ge=0, le=MAX_JWT_LEEWAY_S)
    max_token_bytes: int = Field(default=4096, ge=128)

    @model_validator(mode="after")
    def _ttl_within_cap(self) -> JwtConfig:
        if self.token_ttl_s > self.max_ttl_s:
            raise ValueError(
                f"token_ttl_s ({self.token_ttl_s}) exceeds max_ttl_s ({self.max_ttl_s})"
            )
        return self


class AuthConfig(StrictModel):
    """API clients and their limits. `clients_file` is YAML of client ids, scrypt-hashed
    secrets, scopes, disabled flags and revoked token ids (written by
    `python -m serve.api.tokens`); every replica re-reads it when it changes."""

    jwt: JwtConfig = JwtConfig()
    clients_file: str = ".secrets/clients.yaml"
    clients_reload_interval_s: float = Field(
        default=1.0,
        ge=0,
        description="how often, in seconds, each ingress replica checks the clients file for a "
        "change (one stat; re-read only when its mtime, size or inode changed); a removed, "
        "disabled or revoked client or token is refused within this time; 0 checks on every "
        "request",
    )
    rate_limit_per_minute: float = Field(default=1200.0, gt=0, description="per client")
    rate_limit_burst: int = Field(default=100, ge=1, description="requests in one burst")
    token_rate_limit_per_minute_per_address: float = Field(
        default=10.0,
        gt=0,
        description="failed POST /token attempts per minute per caller address, per ingress "
        "replica; successful attempts are not counted",
    )
    token_rate_limit_burst_per_address: int = Field(
        default=10, ge=1, description="failed POST /token attempts per caller address in one burst"
    )
    token_max_concurrent_verifications: int = Field(
        default=4,
        ge=1,
        description="client secrets checked at once per ingress replica (each one scrypt: "
        "16 MiB and ~50 ms of CPU); POST /token beyond this is answered 429 at once",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="IP addresses or CIDR networks of proxies whose X-Forwarded-For names the "
        "caller for per-address limits. Serve's bundled HAProxy does not set the header and "
        "passes a client's own through: list it only behind a proxy that appends the header "
        "and is the only way in",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, proxies: list[str]) -> list[str]:
        for proxy in proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"{proxy!r} is not an IP address or CIDR network") from None
        return proxies


class FeedConfig(StrictModel):
    """Where the live bars come from.

    `binance` takes closed klines from Binance's WebSocket kline stream (`binance_live:
    websocket`, configured by `binance_stream`; after every reconnect the missed minutes are
    fetched from the REST endpoint, which also catches a down connection's symbols up at each
    failed attempt) or polls the REST klines endpoint (`binance_live: polling`); `sim` and
    `dump` replay bars on an accelerated clock of `replay_bars_per_s` bars per second (for demos
    and tests), starting `history_bars` bars in so features are warm at once. `history_bars` is the
    number of latest closed bars kept per symbol: enough that the online features of the
    newest bar equal the offline ones. Bars older than `stale_after_s` make the feed stale.
    """

    source: KlineSource = "sim"
    symbols: list[Symbol] = Field(default_factory=lambda: ["SIMBTC"], min_length=1)
    history_bars: int = Field(default=400, ge=100)
    poll_interval_s: float = Field(default=5.0, gt=0)
    replay_bars_per_s: float = Field(default=1.0, gt=0)
    replay_start_s: float | None = Field(
        default=None,
        description="epoch seconds at which a replay starts releasing bars past its history "
        "(bar history_bars + k closes at replay_start_s + (k + 1) / replay_bars_per_s); None: "
        "when the feed is built. Lets a benchmark know every bar's close in advance",
    )
    stale_after_s: float = Field(default=150.0, gt=0)
    dump_path: str | None = None
    sim: SimConfig = SimConfig()
    sim_days: int = Field(default=3, ge=1)
    binance: BinanceConfig = BinanceConfig()
    binance_live: BinanceLive = "websocket"
    binance_stream: BinanceStreamConfig = BinanceStreamConfig()


class GoldConfig(StrictModel):
    """The Gold store of served signals: a SQLAlchemy URL (SQLite file or PostgreSQL)."""

    url: str = DEFAULT_GOLD_URL


DEFAULT_OPERATOR_TARGETS_DIR: Final = "/tmp/quant-ai/prometheus-targets"
"""Where ingress replicas write their Prometheus `file_sd` target files by default; the scrape
config in cluster/monitoring/prometheus/prometheus.yml reads `*.json` from here."""


class OperatorConfig(StrictModel):
    """The operator port of each ingress replica: Prometheus `/metrics` and the detailed
    `/readyz`, apart from the public API port.

    A node may run several ingress replicas, so each binds the first free port of
    `port` .. `port + ports_per_node - 1` on `bind_address`, logs it, and writes a Prometheus
    `file_sd` target file `<targets_dir>/<host>-<port>.json` (removed when the replica stops).
    """

    bind_address: str = Field(
        default="127.0.0.1",
        description="IP address the operator port listens on; 0.0.0.0 or :: for every "
        "interface (the target file then names the node's IP address)",
    )
    port: int = Field(default=9470, ge=1, le=65535, description="first port of the range")
    ports_per_node: int = Field(
        default=8, ge=1, le=1024, description="ports tried per node: at most this many replicas"
    )
    targets_dir: str | None = Field(
        default=DEFAULT_OPERATOR_TARGETS_DIR,
        description="folder of the Prometheus file_sd target files; None writes none",
    )

    @field_validator("bind_address")
    @classmethod
    def _ip_address(cls, address: str) -> str:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"{address!r} is not an IP address") from None
        return address

    @model_validator(mode="after")
    def _range_fits(self) -> OperatorConfig:
        if self.port + self.ports_per_node - 1 > 65535:
            raise ValueError(
                f"operator ports {self.port}..{self.port + self.ports_per_node - 1} exceed 65535"
            )
        return self


class PredictConfig(StrictModel):
    """The `/predict` deployment: replicas of their own, apart from the engine that builds the
    snapshots `/signal` reads, so that no amount of `/predict` traffic delays a signal.

    Each replica runs at most `max_ongoing_requests` predictions at once; each ingress replica
    queues at most `max_queued_requests` more while every predict replica is busy, and answers
    any request past that at once with 503 `busy` and `Retry-After` rather than queue it.
    """

    replicas: int = Field(default=1, ge=1)
    cpus_per_replica: float = Field(
        default=0.0,
        ge=0,
        description="Ray CPUs reserved per replica (0: placed anywhere, the head included)",
    )
    max_ongoing_requests: int = Field(
        default=2, ge=1, description="predictions one replica runs at once"
    )
    max_queued_requests: int = Field(
        default=8, ge=0, description="requests one ingress replica queues when all are busy"
    )
    threads: int = Field(
        default=1,
        ge=1,
        description="compute threads of a /predict replica (torch intra-op, polars' pool): one "
        "400-bar request is too small to split, and idle pool threads spin on cores that other "
        "requests and the engine need",
    )


class EngineShardsConfig(StrictModel):
    """How the feed's symbols are split across signal-engine shards (Serve deployments).

    Each shard owns its symbols' feed subscription, incremental feature state, model copy and Gold
    writes; the ingress answers `/signal` for a symbol from its owner's snapshot. Size the split
    either by `shards` (a count) or by `symbols_per_shard` (the shard count is then the symbols
    divided by it, rounded up), not both; neither set means one shard. `cpus_per_shard` is the Ray
    CPU reservation of each shard's replica (0: placed anywhere; give it CPUs so that Ray spreads
    shards over the nodes that have them).
    """

    shards: int | None = Field(default=None, ge=1, description="number of engine shards")
    symbols_per_shard: int | None = Field(
        default=None, ge=1, description="symbols one shard owns at most"
    )
    cpus_per_shard: float = Field(default=0.0, ge=0, description="Ray CPUs reserved per shard")
    tick_interval_s: float = Field(
        default=0.1,
        gt=0,
        description="seconds a shard waits between the end of one feed poll and the next: a new "
        "bar waits at most this (plus the tick) before its signal is computed",
    )

    @model_validator(mode="after")
    def _one_sizing(self) -> EngineShardsConfig:
        if self.shards is not None and self.symbols_per_shard is not None:
            raise ValueError("set either engine.shards or engine.symbols_per_shard, not both")
        return self

    def count(self, symbols: int) -> int:
        """The number of shards for `symbols` served symbols (at least 1, at most `symbols`)."""
        if self.symbols_per_shard is not None:
            wanted = -(-symbols // self.symbols_per_shard)
        else:
            wanted = self.shards or 1
        return max(1, min(wanted, symbols))


class ServeConfig(StrictModel):
    """The Ray Serve application of `python -m jobs.deploy` / `serve deploy`."""

    ray: RayConfig = RayConfig()
    registry: str = Field(default="registry", description="a path or URI (s3://, gs://, file://)")
    object_store: ObjectStoreConfig = Field(
        default_factory=ObjectStoreConfig,
        description="endpoint, region and credentials of an s3:// registry",
    )
    model_name: str = "signal"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    ingress_replicas: int = Field(default=1, ge=1)
    ingress_cpus: float = Field(
        default=0.0,
        ge=0,
        description="Ray CPUs reserved per ingress replica (0: placed anywhere, the head "
        "included; on a cluster whose head has no CPUs, any share keeps them on the workers)",
    )
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        default="EveryNode",
        description="where Serve runs its HTTP proxies (or HAProxies): every node that holds a "
        "replica, or the head alone, which then holds the API port whatever worker node is lost; "
        "HeadOnly also when several nodes share one machine and so one address",
    )
    ingress_mode: Literal["haproxy", "proxy"] = Field(
        default="haproxy",
        description="haproxy: Serve's HAProxy ingress routes straight to the ingress replicas "
        "(direct ingress, throughput-optimised); proxy: Serve's Python HTTP proxy",
    )
    max_ongoing_requests: int = Field(default=64, ge=1, description="per ingress replica")
    registry_poll_s: float = Field(default=5.0, gt=0, description="production alias checks")
    snapshot_poll_s: float = Field(
        default=0.25, gt=0, description="how often the ingress refreshes its signal snapshot"
    )
    max_predict_bars: int = Field(default=2000, ge=1)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    predict: PredictConfig = PredictConfig()
    engine: EngineShardsConfig = EngineShardsConfig()
    operator: OperatorConfig = OperatorConfig()
    auth: AuthConfig = AuthConfig()
    feed: FeedConfig = FeedConfig()
    gold: GoldConfig = GoldConfig()
    backtest: BacktestConfig | None = Field(
        default=None,
        description="decision thresholds; None uses those the model was selected with",
    )

    @model_validator(mode="after")
    def _shards_fit(self) -> ServeConfig:
        shards = self.engine.shards
        if shards is not None and shards > len(self.feed.symbols):
            raise ValueError(
                f"engine.shards is {shards} but the feed serves {len(self.feed.symbols)} "
                "symbols: every shard must own at least one"
            )
        return self


ModelT = TypeVar("ModelT", bound=BaseModel)


def load_config(path: str | Path, model: type[ModelT]) -> ModelT:
    """Read YAML at `path` and validate it as `model` (unknown keys raise)."""
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return model.model_validate(data)
