"""Readiness of the signal API, judged once and told at two levels of detail.

The public `/readyz` (API port) says ready or not and, when not, one coarse reason from a fixed
set: nothing about the model, the symbols served or the figures behind them reaches a client.
The operator `/readyz` (operator port) gives the whole assessment: the model version, the load
error, the snapshot's age and each symbol's staleness.
"""

from __future__ import annotations

from pydantic import BaseModel

from serve.engine.snapshot import EngineSnapshot

NOT_REPORTED = "the signal engine has not reported yet"
NO_MODEL = "no production model loaded"
STALE_FEATURES = "features are stale"
# Every reason the public /readyz may give; the order is the order they are checked in.
PUBLIC_REASONS = (NOT_REPORTED, NO_MODEL, STALE_FEATURES)


class SymbolReadiness(BaseModel):
    """One served symbol: seconds since its newest bar (the snapshot's age included) and
    whether that exceeds the feed's `stale_after_s`."""

    symbol: str
    staleness_s: float
    stale: bool


class ReadyDetail(BaseModel):
    """The operator's readiness: `reason` is what the public /readyz says (null when ready);
    `problems` are the specifics; `snapshot_age_s` is seconds since the engine took the
    snapshot this replica holds (null before the first)."""

    ready: bool
    reason: str | None
    problems: list[str]
    model_version: str | None
    load_error: str | None
    snapshot_age_s: float | None
    symbols: list[SymbolReadiness]


def assess(snap: EngineSnapshot | None, now: float) -> ReadyDetail:
    """Readiness from the snapshot the replica holds at `now` (epoch seconds): ready when a
    production model is loaded and no symbol's features are stale."""
    if snap is None:
        return ReadyDetail(
            ready=False,
            reason=NOT_REPORTED,
            problems=[NOT_REPORTED],
            model_version=None,
            load_error=None,
            snapshot_age_s=None,
            symbols=[],
        )
    reasons: list[str] = []
    problems: list[str] = []
    if snap.model is None:
        reasons.append(NO_MODEL)
        problems.append("the production model could not be loaded" if snap.load_error else NO_MODEL)
    symbols = []
    for name in snap.symbol_names:
        staleness, stale = snap.staleness(name, now)
        symbols.append(SymbolReadiness(symbol=name, staleness_s=staleness, stale=stale))
        if stale:
            problems.append(f"{name}: stale features ({staleness:.0f} s)")
    if any(s.stale for s in symbols):
        reasons.append(STALE_FEATURES)
    return ReadyDetail(
        ready=not problems,
        reason=reasons[0] if reasons else None,
        problems=problems,
        model_version=snap.model.version if snap.model else None,
        load_error=snap.load_error,
        snapshot_age_s=max(0.0, now - snap.taken_at),
        symbols=symbols,
    )
