"""Tables for the command line: nothing cut off, and a long list says how long it is."""

from __future__ import annotations

from rich.table import Table

from receiver.ledger import JobFilter, JobSummary, Ledger

COUNT_PAGE = 1000
COUNT_CAP = 100_000  # beyond this, "more than 100,000": counting is a scan of the ledger


def table(*columns: str, title: str | None = None) -> Table:
    """A table whose cells wrap instead of ending in "…": a job id or URI is never truncated."""
    made = Table(title=title)
    for name in columns:
        made.add_column(name, overflow="fold")
    return made


async def page_and_count(
    ledger: Ledger, where: JobFilter, limit: int
) -> tuple[list[JobSummary], int | None]:
    """The newest `limit` jobs, and how many match in all (None: more than COUNT_CAP)."""
    rows = await ledger.list_jobs(where, before_seq=None, limit=limit)
    total = len(rows)
    cursor = rows[-1].seq if len(rows) == limit else None
    while cursor is not None and total < COUNT_CAP:
        page = await ledger.list_jobs(where, before_seq=cursor, limit=COUNT_PAGE)
        total += len(page)
        cursor = page[-1].seq if len(page) == COUNT_PAGE else None
    return rows, (None if cursor is not None else total)


def count_line(shown: int, total: int | None, limit: int) -> str:
    """What the table holds, and how to see the rest when it is not everything."""
    if total == shown:
        return f"{shown} job{'s' if shown != 1 else ''}"
    of = f"more than {COUNT_CAP:,}" if total is None else f"{total:,}"
    return (
        f"showing the newest {shown} of {of} jobs; see more with --limit N (up to 10000), "
        "narrow with --since/--until/--state/--provider, or use --json"
    )
