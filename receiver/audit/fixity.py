"""Fixity on a schedule: re-verify archived assets not checked within `RECEIVER_FIXITY_DAYS`.

`receiver verify --due` runs a bounded number of checks, oldest first, and can write the report as
JSON for an auditor; workers can run the same checks in the background at a rate limit
(`RECEIVER_FIXITY_PER_HOUR`). Each check re-reads the whole object (`full-read`) through
`receiver.audit.operations.check_asset` and records its outcome on the asset in the ledger.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog

from receiver.audit.operations import check_asset
from receiver.domain import Clock
from receiver.ledger import FULL_READ, Ledger
from receiver.store import Store, StoreError

log = structlog.get_logger(__name__)


@dataclass
class FixityCheck:
    """One asset's check, as an auditor reads it."""

    provider: str
    job_id: str
    n: int
    uri: str | None
    sha256: str | None  # what the ledger holds
    previously_checked_at: str | None  # ISO 8601; the archiving time if never checked
    checked_at: str
    method: str
    result: str  # "ok" or the problem ("missing", "sha256 mismatch", "size mismatch", ...)
    expected: str | None = None
    actual: str | None = None


@dataclass
class FixityReport:
    checked_before: str  # assets last checked before this were due
    started_at: str
    limit: int
    checks: list[FixityCheck] = field(default_factory=list)

    @property
    def failed(self) -> list[FixityCheck]:
        return [c for c in self.checks if c.result != "ok"]

    def as_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "checked": len(self.checks),
            "ok": len(self.checks) - len(self.failed),
            "failed": len(self.failed),
        }


def due_cutoff(now: datetime, fixity_days: int) -> datetime:
    """Assets last checked before this are due; 0 days means every asset (checked before now)."""
    return now - timedelta(days=fixity_days) if fixity_days else now + timedelta(microseconds=1)


async def verify_due(
    ledger: Ledger,
    store: Store,
    *,
    now: Clock,
    fixity_days: int,
    limit: int,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
    on_checked: Callable[[FixityCheck], None] = lambda check: None,
) -> FixityReport:
    """Check at most `limit` due assets, oldest check first, and record every outcome."""
    start = now()
    cutoff = due_cutoff(start, fixity_days)
    due = await ledger.due_for_fixity(cutoff, limit)
    report = FixityReport(cutoff.isoformat(), start.isoformat(), limit)
    for i, item in enumerate(due, 1):
        asset = item.asset
        try:
            findings = await check_asset(store, item.provider, item.job_id, asset)
            problem = "; ".join(f.problem for f in findings) or None
            expected = findings[0].expected if findings else None
            actual = findings[0].actual if findings else None
        except StoreError as exc:
            # The store failing is not the object failing: record nothing, report it.
            log.warning("fixity_check_unavailable", provider=item.provider, error=str(exc))
            problem, expected, actual = "store unavailable", None, type(exc).__name__
        at = now()
        unavailable = problem == "store unavailable"
        if not unavailable:
            await ledger.mark_verified(
                item.provider, item.job_id, asset.n, at=at, by=FULL_READ, error=problem
            )
        check = FixityCheck(
            provider=item.provider,
            job_id=item.job_id,
            n=asset.n,
            uri=asset.uri,
            sha256=asset.sha256,
            previously_checked_at=(
                item.last_checked.isoformat() if item.last_checked is not None else None
            ),
            checked_at=at.isoformat(),
            method=FULL_READ,
            result=problem or "ok",
            expected=expected,
            actual=actual,
        )
        if problem is not None and not unavailable:
            log.error(
                "fixity_check_failed",
                provider=item.provider,
                job_id=item.job_id,
                n=asset.n,
                problem=problem,
            )
        report.checks.append(check)
        on_checked(check)
        on_progress(i, len(due))
    return report


class FixityLoop:
    """Background fixity in `serve`/`worker`: one due asset at a time, `per_hour` at most."""

    def __init__(
        self,
        ledger: Ledger,
        store: Store,
        *,
        clock: Clock,
        fixity_days: int,
        per_hour: float,
        on_checked: Callable[[FixityCheck], None] = lambda check: None,
    ) -> None:
        self.ledger = ledger
        self.store = store
        self.clock = clock
        self.fixity_days = fixity_days
        self.pause = 3600.0 / per_hour
        self.on_checked = on_checked

    async def once(self) -> FixityReport:
        return await verify_due(
            self.ledger,
            self.store,
            now=self.clock,
            fixity_days=self.fixity_days,
            limit=1,
            on_checked=self.on_checked,
        )

    async def run(self) -> None:
        while True:
            try:
                await self.once()
            except Exception as exc:  # keep the process's other work going
                log.error("fixity_loop_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self.pause)
