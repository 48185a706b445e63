"""The Silver ETL: Bronze -> validated bars + features + targets, on Spark (through RayDP).

Silver lives at `<lake>/silver`, Parquet partitioned by `symbol` and `month` (YYYY-MM), with the
feature-spec version and hash in each file's metadata and in `_spec.json`. Rejected rows go to
`<lake>/quarantine`, partitioned by symbol, with their raw payload and a reason (the rules of
`market.validation`, in Spark form from `market.validation.spark_rules`).

Incremental runs: `_state.json` records, per symbol, the Bronze parts that built it and the spec
hash. A rerun recomputes only symbols whose Bronze parts changed, and rewrites only the months
from the first new bar on (one month earlier when the new bars can complete the targets at the
end of the month before). Recursive features (EMA, RSI) depend on a whole segment, so a changed
symbol is recomputed over its whole history: the rewritten months equal a full rebuild exactly.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from market.bronze import BronzeStore, PartInfo
from market.features import spec
from market.features.spark_engine import (
    BAR_TYPES,
    add_segments_and_targets,
    compute_features_spark,
)
from market.files import write_durably
from market.klines import ONE_MINUTE_MS
from market.lake import Lake
from market.validation.spark_rules import parse_and_validate

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession


SPEC_FILE = "_spec.json"
SPEC_METADATA_KEY = "quant_ai_feature_spec"


@dataclass
class SilverSummary:
    """The figures `jobs.features` prints as its JSON summary."""

    silver: str
    quarantine: str
    spec_hash: str
    symbols_processed: list[str] = field(default_factory=list)
    symbols_unchanged: list[str] = field(default_factory=list)
    months_written: dict[str, list[str]] = field(default_factory=dict)
    rows_in: int = 0
    rows_out: int = 0
    rows_written: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    gaps: int = 0
    missing_minutes: int = 0
    out_of_order: int = 0
    seconds: float = 0.0


def lake_paths(lake: str | Path) -> tuple[Path, Path, Path]:
    zones = Lake.at(lake)
    return zones.bronze, zones.silver, zones.quarantine


def _state(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, json.dumps(data, indent=1, sort_keys=True))


def _part_key(bronze: Path, part: PartInfo) -> str:
    return str(part.path.relative_to(bronze))


def plan_changes(lake: str | Path) -> tuple[dict[str, str | None], list[str], dict[str, list[str]]]:
    """Which symbols to recompute and from which month (None: every month).

    Returns (symbol -> first month to rewrite, unchanged symbols, symbol -> its part keys).
    """
    bronze, _, _ = lake_paths(lake)
    store = BronzeStore(lake)
    state = _state(Lake.at(lake).silver_state_file)
    same_spec = state.get("spec_hash") == spec.spec_hash()
    done: dict[str, list[str]] = state.get("symbols", {}) if same_spec else {}
    by_symbol: dict[str, list[PartInfo]] = {}
    for part in store.parts():
        by_symbol.setdefault(part.symbol, []).append(part)
    plan: dict[str, str | None] = {}
    unchanged: list[str] = []
    keys: dict[str, list[str]] = {}
    for symbol, parts in sorted(by_symbol.items()):
        keys[symbol] = sorted(_part_key(bronze, p) for p in parts)
        previous = set(done.get(symbol, []))
        new = [p for p in parts if _part_key(bronze, p) not in previous]
        if not previous:
            plan[symbol] = None
        elif new:
            first_new_ms = min(p.first_ms for p in new)
            plan[symbol] = _month_of_ms(first_new_ms - spec.HORIZON_BARS * ONE_MINUTE_MS)
        else:
            unchanged.append(symbol)
    return plan, unchanged, keys


def _month_of_ms(ms: int) -> str:
    return time.strftime("%Y-%m", time.gmtime(ms / 1000))


def _read_bronze(spark: SparkSession, bronze: Path, symbols: list[str]) -> DataFrame:
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType, StringType, StructField, StructType

    schema = StructType(
        [
            StructField("fetched_at", StringType()),
            StructField("request", StringType()),
            StructField("batch", StringType()),
            StructField("seq", LongType()),
            StructField("raw", StringType()),
        ]
    )
    paths = [str(bronze / "source=*" / f"symbol={s}" / "date=*" / "part-*.jsonl") for s in symbols]
    return (
        spark.read.schema(schema)
        .option("basePath", str(bronze))
        .option("mode", "PERMISSIVE")
        .json(paths)
        .withColumn("file", F.input_file_name())
    )


def _spec_identity() -> dict[str, str]:
    return {"version": spec.SPEC_VERSION, "hash": spec.spec_hash()}


def _rewrite_filter(plan: dict[str, str | None]) -> Column:
    from pyspark.sql import functions as F

    condition = F.lit(False)
    for symbol, month in plan.items():
        in_symbol = F.col("symbol") == symbol
        condition = condition | (
            in_symbol if month is None else in_symbol & (F.col("month") >= month)
        )
    return condition


def build_silver(spark: SparkSession, lake: str | Path) -> SilverSummary:
    """Run the ETL over whatever Bronze changed since the last run (everything the first time)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    started = time.perf_counter()
    bronze, silver, quarantine = lake_paths(lake)
    summary = SilverSummary(
        silver=str(silver), quarantine=str(quarantine), spec_hash=spec.spec_hash()
    )
    plan, unchanged, keys = plan_changes(lake)
    summary.symbols_unchanged = unchanged
    if not plan:
        summary.seconds = time.perf_counter() - started
        return summary
    symbols = sorted(plan)
    summary.symbols_processed = symbols

    checked = parse_and_validate(_read_bronze(spark, bronze, symbols)).persist()
    counts = checked.groupBy("reason").count().collect()
    summary.rows_in = sum(int(r["count"]) for r in counts)
    summary.quarantined = {r["reason"]: int(r["count"]) for r in counts if r["reason"] is not None}

    in_file = Window.partitionBy("file").orderBy("seq")
    accepted = checked.where(F.col("reason").isNull())
    summary.out_of_order = int(
        accepted.withColumn("_prev", F.lag("open_time_ms").over(in_file))
        .where(F.col("_prev") > F.col("open_time_ms"))
        .count()
    )

    rejected = checked.where(F.col("reason").isNotNull()).select(
        "symbol",
        "source",
        "date",
        "file",
        "batch",
        "seq",
        "fetched_at",
        "request",
        "raw",
        "reason",
        F.current_timestamp().alias("quarantined_at"),
    )
    rejected.write.mode("overwrite").partitionBy("symbol").parquet(str(quarantine))

    bars = accepted.select("symbol", "open_time_ms", *BAR_TYPES)
    segmented = add_segments_and_targets(bars).persist()
    gap_stats = segmented.agg(
        F.sum("_new_segment").alias("segments"),
        F.countDistinct("symbol").alias("symbols"),
        F.sum("_missing_minutes").alias("missing"),
    ).first()
    assert gap_stats is not None
    summary.gaps = int(gap_stats["segments"] or 0) - int(gap_stats["symbols"] or 0)
    summary.missing_minutes = int(gap_stats["missing"] or 0)

    features = compute_features_spark(segmented)
    output = features.select(
        "symbol",
        F.timestamp_millis("open_time_ms").alias(
            "open_time", metadata={SPEC_METADATA_KEY: _spec_identity()}
        ),
        *[F.col(c) for c in BAR_TYPES],
        *[F.col(c) for c in spec.FEATURE_COLUMNS],
        *[F.col(c) for c in spec.TARGET_COLUMNS],
        F.date_format(F.timestamp_millis("open_time_ms"), "yyyy-MM").alias("month"),
    ).where(_rewrite_filter(plan))
    output = output.repartition("symbol", "month").sortWithinPartitions("symbol", "open_time")
    output.write.mode("overwrite").partitionBy("symbol", "month").parquet(str(silver))
    checked.unpersist()
    segmented.unpersist()

    written = spark.read.parquet(str(silver)).where(_rewrite_filter(plan))
    month_rows = written.groupBy("symbol", "month").count().collect()
    summary.rows_written = sum(int(r["count"]) for r in month_rows)
    summary.rows_out = summary.rows_in - sum(summary.quarantined.values())
    for row in sorted(month_rows, key=lambda r: (r["symbol"], r["month"])):
        summary.months_written.setdefault(row["symbol"], []).append(row["month"])

    _write_json_atomic(silver / SPEC_FILE, {**_spec_identity(), "spec": spec.spec_document()})
    state_file = Lake.at(lake).silver_state_file
    previous = _state(state_file)
    done = (
        dict(previous.get("symbols", {})) if previous.get("spec_hash") == spec.spec_hash() else {}
    )
    done.update({s: keys[s] for s in symbols})
    _write_json_atomic(state_file, {"spec_hash": spec.spec_hash(), "symbols": done})
    summary.seconds = time.perf_counter() - started
    return summary


def summary_dict(summary: SilverSummary) -> dict[str, Any]:
    return asdict(summary)
