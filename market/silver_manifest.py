"""Silver's commit on an object store: data files under unique names, then one manifest PUT.

An object store has no rename, so Spark's write-then-rename commit cannot be had there. The ETL
writes Silver and quarantine to an object-store lake in three steps instead:

1. every partition's rows go to a new object named after the build,
   `silver/symbol=X/month=M/part-<build>.parquet` (`quarantine/symbol=X/part-<build>.parquet`),
   so no object a reader may be reading is ever overwritten;
2. `silver/_state.json` is written in one PUT (the commit point): per symbol the Bronze parts
   that built it and the spec hash, as on a local lake, plus `files`, the lake-relative keys of
   every committed data file. The previous commit's files are kept as `retained`;
3. objects under `silver/` and `quarantine/` that neither list names are deleted: the files the
   commit replaced two generations ago and the leftovers of builds that died before their commit.

Readers read the files `files` lists (`committed_files`), never a directory listing, so a build
that dies anywhere before step 2 leaves readers on the previous commit, and its rerun (which finds
the previous state, so plans the same work) commits once: nothing is read twice. A reader that
loaded a manifest just before a commit still finds its files, which stay one more generation.

Two builds of the same lake at once: an object store has no lock and pyarrow no conditional PUT,
so the state carries a generation (and the id of the build that committed it) instead. A build
remembers the state it planned from; just before its PUT it reads the state again, and when
another build has committed meanwhile it raises `SilverCommitConflictError` without writing:
the caller discards its files and plans again from the new state (`market.silver`). Garbage
collection deletes only files of builds that started before the committing one, so a build that
started later never loses files it is about to commit. What remains is the milliseconds between
that second read and the PUT: two commits inside it are last-writer-wins (the last state stays
whole, since a collection first checks that its own commit is still the stored one; the other
build's work is redone by the next build).

A Silver without `files` in its state (every local lake, whose Spark commit renames) is read as
the directory it is.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from market.lake import QUARANTINE, SILVER, SILVER_STATE_FILE

DATA_ZONES: Final = (SILVER, QUARANTINE)
"""The zones whose data files a manifest lists (lake-relative keys start with one of them)."""


@dataclass(frozen=True)
class SilverState:
    """`silver/_state.json`: which Bronze parts built each symbol under which spec hash and, on an
    object store, the committed data files (lake-relative keys; None: no manifest, read the
    directory) and the previous commit's (`retained`)."""

    spec_hash: str | None = None
    symbols: dict[str, list[str]] = field(default_factory=dict)
    files: tuple[str, ...] | None = None
    retained: tuple[str, ...] = ()
    generation: int = 0
    """Commits so far (0: never committed through the manifest)."""
    build: str | None = None
    """The id of the build that committed this state."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SilverState:
        files = data.get("files")
        return cls(
            spec_hash=data.get("spec_hash"),
            symbols={k: list(v) for k, v in data.get("symbols", {}).items()},
            files=None if files is None else tuple(files),
            retained=tuple(data.get("retained", ())),
            generation=int(data.get("generation", 0)),
            build=data.get("build"),
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"spec_hash": self.spec_hash, "symbols": self.symbols}
        if self.files is not None:
            data["files"] = list(self.files)
            data["retained"] = list(self.retained)
            data["generation"] = self.generation
            data["build"] = self.build
        return data

    @property
    def version(self) -> tuple[int, str | None]:
        """What tells two commits apart: the generation and the committing build."""
        return self.generation, self.build


class SilverCommitConflictError(RuntimeError):
    """Another build committed Silver after this one planned from the previous state."""


def build_of(key: str) -> str | None:
    """The build id in a data file's name (`.../part-<build>.parquet`); None for another name."""
    name = key.rsplit("/", 1)[-1]
    if name.startswith("part-") and name.endswith(".parquet"):
        return name[len("part-") : -len(".parquet")]
    return None


def partition_values(key: str) -> dict[str, str]:
    """The hive partition values of a key: `silver/symbol=X/month=M/f` -> {symbol: X, month: M}."""
    return dict(part.split("=", 1) for part in key.split("/")[:-1] if "=" in part)


def new_build_id() -> str:
    """A name no other build of the lake uses: the UTC time to the microsecond, so that ids
    sort by when their builds started (garbage collection relies on it), and a random suffix."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}{int(now % 1 * 1_000_000):06d}Z-{uuid.uuid4().hex[:8]}"


class ManifestLake:
    """Silver's and quarantine's files in a lake on any pyarrow filesystem (`root`: the lake's
    path in it), committed through the manifest in `silver/_state.json`."""

    def __init__(self, filesystem: pafs.FileSystem, root: str) -> None:
        self.filesystem = filesystem
        self.root = root.rstrip("/")
        # Object stores have no directories: creating one would only PUT an empty marker object.
        self._has_directories = filesystem.type_name not in ("s3", "gcs")

    def path(self, key: str) -> str:
        """The filesystem path of a lake-relative key."""
        return f"{self.root}/{key}"

    @property
    def state_key(self) -> str:
        return f"{SILVER}/{SILVER_STATE_FILE}"

    def read_state(self) -> SilverState:
        """The committed state; an empty one when Silver was never built."""
        data = self.read_json(self.state_key)
        return SilverState() if data is None else SilverState.from_json(data)

    def read_json(self, key: str) -> dict[str, Any] | None:
        path = self.path(key)
        if self.filesystem.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.filesystem.open_input_stream(path) as stream:
            data = json.loads(stream.read().decode("utf-8"))
        return data if isinstance(data, dict) else None

    def put_json(self, key: str, data: dict[str, Any]) -> None:
        """Write one JSON object in a single PUT (atomic on an object store)."""
        payload = json.dumps(data, indent=1, sort_keys=True).encode("utf-8")
        self._make_dir(self.path(key).rsplit("/", 1)[0])
        with self.filesystem.open_output_stream(self.path(key)) as stream:
            stream.write(payload)

    def write_part(self, directory: str, build_id: str, table: pa.Table) -> str:
        """Write `table` as `<directory>/part-<build_id>.parquet` (a lake-relative directory);
        returns its key. Not visible to readers until a commit lists it."""
        key = f"{directory}/part-{build_id}.parquet"
        self._make_dir(self.path(directory))
        pq.write_table(table, self.path(key), filesystem=self.filesystem)
        return key

    def _make_dir(self, path: str) -> None:
        if self._has_directories:
            self.filesystem.create_dir(path, recursive=True)

    def commit(
        self,
        previous: SilverState,
        *,
        spec_hash: str,
        symbols: dict[str, list[str]],
        replaced: Callable[[str], bool],
        written: Iterable[str],
        build_id: str,
    ) -> SilverState:
        """Commit build `build_id` in one PUT of the state: `previous`'s files minus those
        `replaced` says the build supersedes, plus those it `written`. Returns the committed
        state; SilverCommitConflictError, writing nothing, when the stored state is no longer
        `previous` (another build committed since this one read it)."""
        current = self.read_state()
        if current.version != previous.version:
            raise SilverCommitConflictError(
                f"Silver at {self.root} was committed by build {current.build} (generation "
                f"{current.generation}) after build {build_id} planned from generation "
                f"{previous.generation}"
            )
        kept = [key for key in previous.files or () if not replaced(key)]
        state = SilverState(
            spec_hash=spec_hash,
            symbols=symbols,
            files=tuple(sorted({*kept, *written})),
            retained=tuple(previous.files or ()),
            generation=previous.generation + 1,
            build=build_id,
        )
        self.put_json(self.state_key, state.to_json())
        return state

    def discard(self, written: Iterable[str]) -> None:
        """Delete a build's own uncommitted files (lake-relative keys) after a conflict; those
        the winner's garbage collection deleted already are skipped."""
        for key in written:
            with contextlib.suppress(FileNotFoundError):
                self.filesystem.delete_file(self.path(key))

    def collect_garbage(self, state: SilverState) -> int:
        """Delete every Parquet file of the data zones that `state` lists neither as committed
        nor as retained and that no build younger than `state.build` wrote (such a build may
        be about to commit it); returns how many. Run it only after `commit`. Nothing is
        deleted when the stored state is no longer `state` (a later commit's collection will)."""
        if self.read_state().version != state.version:
            return 0
        listed = {*(state.files or ()), *state.retained}
        removed = 0
        for zone in DATA_ZONES:
            selector = pafs.FileSelector(self.path(zone), recursive=True, allow_not_found=True)
            for info in self.filesystem.get_file_info(selector):
                key = info.path[len(self.root) + 1 :]
                is_data = info.type == pafs.FileType.File and key.endswith(".parquet")
                if not is_data or key in listed:
                    continue
                writer = build_of(key)
                if writer is not None and state.build is not None and writer > state.build:
                    continue
                self.filesystem.delete_file(info.path)
                removed += 1
        return removed

    def committed_files(self, zone: str = SILVER) -> list[str] | None:
        """Filesystem paths of the committed files of `zone`, or None when Silver has no manifest
        (read the directory then)."""
        state = self.read_state()
        if state.files is None:
            return None
        return [self.path(key) for key in state.files if key.startswith(f"{zone}/")]
