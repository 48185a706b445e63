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

A lake on an object store (`s3://`, `gs://`) runs the same Spark code between other ends, since
Spark has no connector to the store here (no `s3a` jars beyond PyPI's): pyarrow reads Bronze's
parts on the driver and Spark takes them as an Arrow-backed DataFrame; the results come back to
the driver as Arrow batches and pyarrow writes them as new objects, committed by one PUT of
`_state.json` (`market.silver_manifest`), which readers go through. Why the driver and not Ray
Data: BENCHMARKS.md, "Silver on an object store".
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pa_ds
import pyarrow.fs as pafs
import pyarrow.json as pa_json

from configs.schema import ObjectStoreConfig
from market.bronze import BronzeStore, ObjectBronzeStore, PartInfo
from market.features import spec
from market.features.spark_engine import (
    BAR_TYPES,
    add_segments_and_targets,
    compute_features_spark,
)
from market.files import exclusive_lock, write_durably
from market.klines import ONE_MINUTE_MS
from market.lake import BRONZE, QUARANTINE, SILVER, SILVER_BUILD_LOCK, Lake
from market.silver_manifest import (
    ManifestLake,
    SilverCommitConflictError,
    SilverState,
    new_build_id,
    partition_values,
)
from market.storage import Location, resolve
from market.validation.spark_rules import parse_and_validate

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession
    from pyspark.sql.types import StructType

log = logging.getLogger(__name__)

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
    commit_conflicts: int = 0
    """Other builds of the same object-store lake that committed while this one ran; each made
    this one discard its files and plan again from their commit."""
    seconds: float = 0.0


def _state(path: Path) -> SilverState:
    return SilverState.from_json(json.loads(path.read_text())) if path.exists() else SilverState()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, json.dumps(data, indent=1, sort_keys=True))


def _part_key(bronze_root: str, part: PartInfo) -> str:
    """A part's key in `_state.json`: its path below `bronze/` (`source=S/symbol=X/...`), the
    same on local disk and on an object store."""
    return str(part.path.relative_to(bronze_root))


def plan_changes(
    parts: Sequence[PartInfo], bronze_root: str, state: SilverState
) -> tuple[dict[str, str | None], list[str], dict[str, list[str]]]:
    """Which symbols to recompute and from which month (None: every month), given Bronze's
    `parts` (under `bronze_root`, a filesystem path) and the committed `state`.

    Returns (symbol -> first month to rewrite, unchanged symbols, symbol -> its part keys).
    """
    same_spec = state.spec_hash == spec.spec_hash()
    done: dict[str, list[str]] = state.symbols if same_spec else {}
    by_symbol: dict[str, list[PartInfo]] = {}
    for part in parts:
        by_symbol.setdefault(part.symbol, []).append(part)
    plan: dict[str, str | None] = {}
    unchanged: list[str] = []
    keys: dict[str, list[str]] = {}
    for symbol, symbol_parts in sorted(by_symbol.items()):
        keys[symbol] = sorted(_part_key(bronze_root, p) for p in symbol_parts)
        previous = set(done.get(symbol, []))
        new = [p for p in symbol_parts if _part_key(bronze_root, p) not in previous]
        if not previous:
            plan[symbol] = None
        elif new:
            first_new_ms = min(p.first_ms for p in new)
            plan[symbol] = _month_of_ms(first_new_ms - spec.MAX_HORIZON_BARS * ONE_MINUTE_MS)
        else:
            unchanged.append(symbol)
    return plan, unchanged, keys


def _month_of_ms(ms: int) -> str:
    return time.strftime("%Y-%m", time.gmtime(ms / 1000))


def _bronze_schema() -> StructType:
    from pyspark.sql.types import LongType, StringType, StructField, StructType

    return StructType(
        [
            StructField("fetched_at", StringType()),
            StructField("request", StringType()),
            StructField("batch", StringType()),
            StructField("seq", LongType()),
            StructField("raw", StringType()),
        ]
    )


def _read_bronze(spark: SparkSession, bronze: Path, symbols: list[str]) -> DataFrame:
    from pyspark.sql import functions as F

    paths = [str(bronze / "source=*" / f"symbol={s}" / "date=*" / "part-*.jsonl") for s in symbols]
    return (
        spark.read.schema(_bronze_schema())
        .option("basePath", str(bronze))
        .option("mode", "PERMISSIVE")
        .json(paths)
        .withColumn("file", F.input_file_name())
    )


_BRONZE_ARROW_SCHEMA = pa.schema(
    [
        ("fetched_at", pa.string()),
        ("request", pa.string()),
        ("batch", pa.string()),
        ("seq", pa.int64()),
        ("raw", pa.string()),
    ]
)
_BRONZE_READ_THREADS = 8

COMMIT_ATTEMPTS: Final = 3
"""Builds of an object-store lake one build may lose to (another committed first, so it plans
again from that commit) before it gives up with SilverCommitConflictError."""
"""Parts fetched at once from an object store: each read is one GET, latency-bound."""


def _part_table(store: ObjectBronzeStore, part: PartInfo, uri_scheme: str) -> pa.Table:
    """One Bronze part as the columns Spark's JSON reader gives a local part (partition values
    and `file` included). A line that is not JSON becomes a row of nulls, as Spark's PERMISSIVE
    mode makes it, and is quarantined downstream."""
    with store.filesystem.open_input_stream(str(part.path)) as stream:
        data = stream.read()
    try:
        table = pa_json.read_json(
            io.BytesIO(data),
            parse_options=pa_json.ParseOptions(
                explicit_schema=_BRONZE_ARROW_SCHEMA, unexpected_field_behavior="ignore"
            ),
        )
    except pa.ArrowInvalid:
        records = []
        for line in data.decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = {}
            records.append(record if isinstance(record, dict) else {})
        table = pa.Table.from_pylist(records, schema=_BRONZE_ARROW_SCHEMA)
    constants = {
        "source": part.source,
        "symbol": part.symbol,
        "date": part.day,
        "file": f"{uri_scheme}://{part.path}",
    }
    for name, value in constants.items():
        table = table.append_column(name, pa.array([value] * table.num_rows, pa.string()))
    return table


def _read_object_bronze(
    spark: SparkSession, store: ObjectBronzeStore, parts: Sequence[PartInfo], uri_scheme: str
) -> DataFrame:
    """Bronze parts of an object store as a Spark DataFrame, without Spark touching the store.

    Spark here has no connector to the store (the `s3a` jars are not on PyPI), so pyarrow reads
    the parts (a GET each, several at once) into one Arrow table on the driver, which Spark takes
    over through its Arrow-enabled `createDataFrame`. The driver holds Bronze's raw lines of the
    symbols being rebuilt once, which bounds this path to what one node holds in memory."""
    from pyspark.sql.types import StringType, StructField, StructType

    with ThreadPoolExecutor(_BRONZE_READ_THREADS) as pool:
        tables = list(pool.map(lambda p: _part_table(store, p, uri_scheme), parts))
    table = pa.concat_tables(tables)
    schema = StructType(
        [
            *_bronze_schema().fields,
            *[StructField(c, StringType()) for c in ("source", "symbol", "date", "file")],
        ]
    )
    # Strings as plain object columns: pandas 3 backs its `str` columns with Arrow chunked
    # arrays, which Spark 3.5's Arrow path cannot take (it would fall back to a row-by-row copy).
    frame = pd.DataFrame(
        {
            name: pd.Series(
                column.to_numpy(zero_copy_only=False),
                dtype=object if pa.types.is_string(column.type) else None,
            )
            for name, column in zip(table.column_names, table.columns, strict=True)
        }
    )
    return spark.createDataFrame(frame, schema=schema)


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


@dataclass
class _Transformed:
    """The ETL's Spark plan: `checked` and `segmented` are persisted (unpersist when written)."""

    checked: DataFrame
    segmented: DataFrame
    rejected: DataFrame
    output: DataFrame


def _transform(raw: DataFrame, plan: dict[str, str | None], summary: SilverSummary) -> _Transformed:
    """Validate, quarantine, segment, compute features and targets; fills the summary's counts.
    The same Spark code for every lake, whatever it is stored on."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    checked = parse_and_validate(raw).persist()
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
    summary.rows_out = summary.rows_in - sum(summary.quarantined.values())

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
    return _Transformed(checked, segmented, rejected, output)


def build_silver(
    spark: SparkSession, lake: str | Path, object_store: ObjectStoreConfig | None = None
) -> SilverSummary:
    """Run the ETL over whatever Bronze changed since the last run (everything the first time).

    `lake` is a local path or a URI (`market.storage`; an object store's settings from
    `object_store` and the environment). A local lake is read and written by Spark itself; an
    object-store lake goes through pyarrow on the driver and commits through the manifest of
    `market.silver_manifest`. StorageError when the lake cannot be used."""
    started = time.perf_counter()
    root = resolve(lake, object_store)
    if root.is_local:
        summary = _build_local(spark, root.local_path())
    else:
        summary = _build_on_object_store(spark, root)
    summary.seconds = time.perf_counter() - started
    return summary


def _build_local(spark: SparkSession, lake: Path) -> SilverSummary:
    """The ETL over a local lake, holding the lake's build lock: a second build of the same
    lake (on this machine, or on a shared filesystem that honours `flock`) waits for this one
    and then finds its work done."""
    lake.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(lake / SILVER_BUILD_LOCK):
        return _build_local_locked(spark, lake)


def _build_local_locked(spark: SparkSession, lake: Path) -> SilverSummary:
    zones = Lake.at(lake)
    bronze, silver, quarantine = zones.bronze, zones.silver, zones.quarantine
    summary = SilverSummary(
        silver=str(silver), quarantine=str(quarantine), spec_hash=spec.spec_hash()
    )
    previous = _state(zones.silver_state_file)
    plan, summary.symbols_unchanged, keys = plan_changes(
        BronzeStore(lake).parts(), str(bronze), previous
    )
    if not plan:
        return summary
    symbols = sorted(plan)
    summary.symbols_processed = symbols
    etl = _transform(_read_bronze(spark, bronze, symbols), plan, summary)
    etl.rejected.write.mode("overwrite").partitionBy("symbol").parquet(str(quarantine))
    etl.output.write.mode("overwrite").partitionBy("symbol", "month").parquet(str(silver))
    etl.checked.unpersist()
    etl.segmented.unpersist()

    written = spark.read.parquet(str(silver)).where(_rewrite_filter(plan))
    month_rows = written.groupBy("symbol", "month").count().collect()
    summary.rows_written = sum(int(r["count"]) for r in month_rows)
    for row in sorted(month_rows, key=lambda r: (r["symbol"], r["month"])):
        summary.months_written.setdefault(row["symbol"], []).append(row["month"])

    _write_json_atomic(silver / SPEC_FILE, {**_spec_identity(), "spec": spec.spec_document()})
    done = dict(previous.symbols) if previous.spec_hash == spec.spec_hash() else {}
    done.update({s: keys[s] for s in symbols})
    _write_json_atomic(zones.silver_state_file, {"spec_hash": spec.spec_hash(), "symbols": done})
    return summary


def _collect_arrow(frame: DataFrame) -> pa.Table:
    """A DataFrame's rows as one Arrow table, moved from the JVM as Arrow batches (what
    `toPandas` does with Arrow enabled, without the pandas conversion, which would turn an
    integer column with nulls into floats). Timestamps become UTC milliseconds, as Spark writes
    them to Parquet here (`spark.sql.parquet.outputTimestampType`)."""
    from pyspark.sql.pandas.types import to_arrow_schema

    schema = to_arrow_schema(frame.schema)
    batches = frame._collect_as_arrow()
    table = pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()
    fields = [
        field.with_type(pa.timestamp("ms", tz="UTC"))
        if pa.types.is_timestamp(field.type)
        else field
        for field in table.schema
    ]
    return table.cast(pa.schema(fields))


def _silver_file_schema(table: pa.Table) -> pa.Schema:
    """Silver's file schema (partition columns left to the path), the spec's identity on
    `open_time` as Spark records it locally and in the file's metadata."""
    identity = json.dumps(_spec_identity(), sort_keys=True)
    fields = [
        field.with_metadata({SPEC_METADATA_KEY: identity}) if field.name == "open_time" else field
        for field in table.schema
        if field.name not in ("symbol", "month")
    ]
    return pa.schema(fields, metadata={SPEC_METADATA_KEY: identity})


def _partitions(table: pa.Table, columns: Sequence[str]) -> list[tuple[tuple[str, ...], pa.Table]]:
    """(values of `columns`, rows with those values, those columns dropped), in value order."""
    keys = table.select(list(columns)).group_by(list(columns)).aggregate([]).to_pylist()
    out = []
    for key in sorted(keys, key=lambda k: tuple(k[c] for c in columns)):
        mask = (
            pc.and_(*[pc.equal(table[c], key[c]) for c in columns])
            if len(columns) > 1
            else (pc.equal(table[columns[0]], key[columns[0]]))
        )
        out.append((tuple(key[c] for c in columns), table.filter(mask).drop_columns(list(columns))))
    return out


def _build_on_object_store(spark: SparkSession, root: Location) -> SilverSummary:
    """`_build_once`, planned again from the new state each time another build of the lake
    commits first (`market.silver_manifest`: concurrent builds); SilverCommitConflictError
    after `COMMIT_ATTEMPTS` such conflicts in a row."""
    lake = ManifestLake(root.filesystem, root.path)
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            summary = _build_once(spark, root, lake)
        except SilverCommitConflictError as conflict:
            if attempt == COMMIT_ATTEMPTS:
                raise SilverCommitConflictError(
                    f"{conflict}; other builds of {root.uri} committed first {attempt} times "
                    "in a row: run one Silver build per lake at a time, or retry"
                ) from conflict
            log.warning("%s: planning again from that commit", conflict)
            continue
        summary.commit_conflicts = attempt - 1
        return summary
    raise AssertionError("unreachable")


def _build_once(spark: SparkSession, root: Location, lake: ManifestLake) -> SilverSummary:
    """The ETL over an object-store lake: Bronze in through pyarrow, the same Spark code, the
    results collected as Arrow and written as new files, committed by one PUT of the state.
    SilverCommitConflictError (its files deleted) when another build committed meanwhile."""
    summary = SilverSummary(
        silver=root.child(SILVER).uri,
        quarantine=root.child(QUARANTINE).uri,
        spec_hash=spec.spec_hash(),
    )
    store = ObjectBronzeStore(root.child(BRONZE))
    previous = lake.read_state()
    all_parts = store.parts()
    plan, summary.symbols_unchanged, keys = plan_changes(all_parts, store.root, previous)
    if not plan:
        return summary
    symbols = sorted(plan)
    summary.symbols_processed = symbols
    parts = [p for p in all_parts if p.symbol in plan]
    scheme = root.uri.split("://", 1)[0]
    etl = _transform(_read_object_bronze(spark, store, parts, scheme), plan, summary)
    silver = _collect_arrow(etl.output)
    rejected = _collect_arrow(etl.rejected)
    etl.checked.unpersist()
    etl.segmented.unpersist()

    build_id = new_build_id()
    file_schema = _silver_file_schema(silver)
    jobs: list[tuple[str, pa.Table]] = []
    for (symbol, month), rows in _partitions(silver, ("symbol", "month")):
        jobs.append((f"{SILVER}/symbol={symbol}/month={month}", rows.cast(file_schema)))
        summary.months_written.setdefault(symbol, []).append(month)
    for (symbol,), rows in _partitions(rejected, ("symbol",)):
        jobs.append((f"{QUARANTINE}/symbol={symbol}", rows))
    with ThreadPoolExecutor(_BRONZE_READ_THREADS) as pool:
        written = list(pool.map(lambda job: lake.write_part(job[0], build_id, job[1]), jobs))
    summary.rows_written = silver.num_rows

    def replaced(key: str) -> bool:
        values = partition_values(key)
        symbol = values.get("symbol")
        if symbol not in plan:
            return False
        first_month = plan[symbol]
        return (
            key.startswith(f"{QUARANTINE}/")
            or first_month is None
            or (values.get("month", "") >= first_month)
        )

    lake.put_json(f"{SILVER}/{SPEC_FILE}", {**_spec_identity(), "spec": spec.spec_document()})
    done = dict(previous.symbols) if previous.spec_hash == spec.spec_hash() else {}
    done.update({s: keys[s] for s in symbols})
    try:
        state = lake.commit(
            previous,
            spec_hash=spec.spec_hash(),
            symbols=done,
            replaced=replaced,
            written=written,
            build_id=build_id,
        )
    except SilverCommitConflictError:
        lake.discard(written)
        raise
    lake.collect_garbage(state)
    return summary


@dataclass(frozen=True)
class SilverFiles:
    """Where a reader finds Silver: its filesystem, its root there (`base_dir` of the hive
    partitions symbol=X/month=M) and its committed files (None: every Parquet file below
    `base_dir`, a lake without a manifest)."""

    filesystem: pafs.FileSystem
    base_dir: str
    files: list[str] | None

    @property
    def sources(self) -> list[str] | str:
        """What to hand a Parquet reader: the committed files, else the directory."""
        return self.base_dir if self.files is None else self.files


def silver_files(lake: str | Path, object_store: ObjectStoreConfig | None = None) -> SilverFiles:
    """Silver's committed files in `lake` (a path or URI): on an object store those the manifest
    in `_state.json` lists, so a build in progress or one that died is never read; on a local
    lake the directory. StorageError when the lake cannot be used."""
    root = resolve(lake, object_store)
    files = ManifestLake(root.filesystem, root.path).committed_files(SILVER)
    return SilverFiles(root.filesystem, root.child(SILVER).path, files)


def open_silver(lake: str | Path, object_store: ObjectStoreConfig | None = None) -> pa_ds.Dataset:
    """Silver of `lake` as a pyarrow dataset, `symbol` and `month` (strings) from the partition
    paths. FileNotFoundError when there is no Silver."""
    where = silver_files(lake, object_store)
    partitioning = pa_ds.partitioning(
        pa.schema([("symbol", pa.string()), ("month", pa.string())]), flavor="hive"
    )
    return pa_ds.dataset(
        where.sources,
        filesystem=where.filesystem,
        format="parquet",
        partitioning=partitioning,
        partition_base_dir=where.base_dir,
        exclude_invalid_files=False,
        ignore_prefixes=[".", "_"],
    )


def summary_dict(summary: SilverSummary) -> dict[str, Any]:
    return asdict(summary)
