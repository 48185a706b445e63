"""Which engine shard owns which symbol.

The feed's symbols are split across `EngineShardsConfig.count(...)` shards. The split is a pure
function of the symbol names and the shard count, the same in every process (the ingress routes
with it, each shard deployment is bound with its share), whatever the order the symbols are
listed in: symbols are ranked by a unkeyed BLAKE2b digest of their name (Python's `hash` is
salted per process and would not do) and dealt round-robin, so shard sizes differ by at most one
and no shard is empty while there are at least as many symbols as shards. Within a shard the
symbols keep the feed's order.

Changing the shard count or the symbol list moves symbols between shards; that is a redeploy
(each shard rebuilds its state from its feed), never a silent split-brain, because a symbol's
owner is always derived from the deployed configuration.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from configs.schema import REVEAL_SECRETS, ServeConfig


def _rank_key(symbol: str) -> bytes:
    return hashlib.blake2b(symbol.encode("utf-8"), digest_size=8).digest()


def partition(symbols: Sequence[str], shards: int) -> tuple[tuple[str, ...], ...]:
    """`symbols` (duplicates dropped) split into `shards` groups, each in the input's order.

    Raises ValueError when `shards` < 1 or there are fewer symbols than shards."""
    unique = list(dict.fromkeys(symbols))
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if len(unique) < shards:
        raise ValueError(f"{shards} shards need at least {shards} symbols, got {len(unique)}")
    owner = {
        symbol: rank % shards
        for rank, symbol in enumerate(sorted(unique, key=lambda s: (_rank_key(s), s)))
    }
    return tuple(tuple(s for s in unique if owner[s] == shard) for shard in range(shards))


@dataclass(frozen=True)
class ShardPlan:
    """The deployed split: `symbols[i]` are shard i's symbols."""

    symbols: tuple[tuple[str, ...], ...]
    _owners: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        owners = {symbol: shard for shard, owned in enumerate(self.symbols) for symbol in owned}
        object.__setattr__(self, "_owners", owners)

    @classmethod
    def of(cls, config: ServeConfig) -> ShardPlan:
        symbols = config.feed.symbols
        return cls(partition(symbols, config.engine.count(len(dict.fromkeys(symbols)))))

    @property
    def count(self) -> int:
        return len(self.symbols)

    def owner(self, symbol: str) -> int | None:
        """The shard that owns `symbol`; None for a symbol no shard serves."""
        return self._owners.get(symbol)

    def shard_config(self, config: ServeConfig, shard: int) -> ServeConfig:
        """`config` as shard `shard` runs it: its feed serves the shard's symbols only, and it is
        itself one shard (validated, as the shard's deployment will read it; the object store's
        secret kept)."""
        data = config.model_dump(mode="json", context={REVEAL_SECRETS: True})
        data["feed"]["symbols"] = list(self.symbols[shard])
        data["engine"] = {**data["engine"], "shards": None, "symbols_per_shard": None}
        return ServeConfig.model_validate(data)
