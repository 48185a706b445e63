"""The lake's layout, in one place: every zone's location is derived here and nowhere else.

```
<lake>/bronze/source=S/symbol=X/date=D/part-*.jsonl     raw payloads (market.bronze)
<lake>/silver/symbol=X/month=M/*.parquet                 validated bars + features + targets
<lake>/silver/_state.json                                which Bronze parts built each symbol
                                                         (on an object store also the committed
                                                         files: market.silver_manifest)
<lake>/quarantine/symbol=X/*.parquet                     rejected rows with their reason
<lake>/gold/signals.sqlite                               served signals (default Gold store)
```

A lake is named by a local path or a URI (`s3://...`, `file://...`). `Lake.location(zone)`
keeps a URI a URI; `Lake.local(zone)` is for the code that still writes through the local
filesystem (a path or `file://` lake) and refuses an object-store URI with a
`market.storage.StorageError` instead of creating a directory named like it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from market.storage import StorageError, is_uri, local_path

BRONZE: Final = "bronze"
SILVER: Final = "silver"
QUARANTINE: Final = "quarantine"
GOLD: Final = "gold"

SILVER_STATE_FILE: Final = "_state.json"
"""Under `silver/`: per symbol, the Bronze parts that built it and the spec hash."""

SILVER_BUILD_LOCK: Final = ".silver-build.lock"
"""Under a local lake's root: the file a Silver build holds an exclusive `flock` on, so that a
second build of the same lake waits (an object-store lake commits by generation instead)."""

GOLD_SQLITE_FILE: Final = "signals.sqlite"
"""Under `gold/`: the default SQLite Gold store of served signals."""


@dataclass(frozen=True)
class Lake:
    """A lake root (path or URI) and the locations of its zones."""

    root: str

    @classmethod
    def at(cls, lake: str | Path) -> Lake:
        root = str(lake)
        if not is_uri(root):
            return cls(root)
        scheme, rest = root.split("://", 1)
        return cls(f"{scheme}://{rest.rstrip('/')}")

    def location(self, zone: str) -> str:
        """`<lake>/<zone>` as a string: a URI stays a URI, a path stays a path."""
        if is_uri(self.root):
            return f"{self.root}/{zone}"
        return str(Path(self.root) / zone)

    def local(self, zone: str) -> Path:
        """`<lake>/<zone>` on the local filesystem (a path or `file://` lake); StorageError for
        an object-store lake."""
        root = local_path(self.root)
        if root is None:
            raise StorageError(
                f"lake {self.root!r} is a URI, but the {zone} zone is written to a local "
                "directory; use a local lake path"
            )
        return root / zone

    @property
    def bronze(self) -> Path:
        return self.local(BRONZE)

    @property
    def silver(self) -> Path:
        return self.local(SILVER)

    @property
    def silver_location(self) -> str:
        """Silver as a path or URI, for readers that accept either (Ray Data, polars)."""
        return self.location(SILVER)

    @property
    def silver_state_file(self) -> Path:
        return self.silver / SILVER_STATE_FILE

    @property
    def quarantine(self) -> Path:
        return self.local(QUARANTINE)

    @property
    def gold_sqlite_url(self) -> str:
        """The SQLAlchemy URL of the lake's default Gold store (absolute path)."""
        return f"sqlite:///{(self.local(GOLD) / GOLD_SQLITE_FILE).resolve()}"
