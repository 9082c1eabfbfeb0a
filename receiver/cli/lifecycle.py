"""`receiver prune | forget | export` and `verify --due`: data over years on the command line.

Part of the CLI (the composition root): registered on `receiver.cli.base.app` when
`receiver.cli` imports this module. The work itself is in
`receiver.audit.lifecycle`, `receiver.audit.fixity` and `receiver.audit.export`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from receiver.cli.base import (
    EnvFile,
    app,
    fail,
    filters,
    load_settings,
    require_ledger,
    run_parts,
    split_job,
)
from receiver.errors import ConfigurationError
from receiver.ledger import JobRecord
from receiver.settings import Settings

if TYPE_CHECKING:
    from receiver.app import Parts


@app.command()
def prune(
    vacuum: Annotated[
        bool, typer.Option(help="SQLite: rewrite the file afterwards to give the space back")
    ] = True,
    env_file: EnvFile = None,
) -> None:
    """Apply the retention settings now: drop old payloads (and long-ended jobs, if set)."""
    run_prune(vacuum, env_file)


@app.command()
def forget(
    job: Annotated[str, typer.Argument(help="PROVIDER/JOB_ID")],
    reason: Annotated[str, typer.Option(help="why, and on whose request (kept)")] = "",
    yes: Annotated[bool, typer.Option("--yes", help="act; without it, a dry run")] = False,
    env_file: EnvFile = None,
) -> None:
    """Erase a job: its archived objects (every version), manifest and ledger record.

    Leaves a tombstone (when, and --reason) so a redelivery does not archive it again.
    """
    run_forget(job, reason, yes, env_file)


@app.command()
def export(
    job: Annotated[
        str | None, typer.Argument(help="PROVIDER/JOB_ID (or a range: --since/--until)")
    ] = None,
    bagit: Annotated[
        Path, typer.Option(help="new folder to write the BagIt bag (RFC 8493) into")
    ] = Path("bag"),
    provider: Annotated[str | None, typer.Option(help="with a range: this provider")] = None,
    since: Annotated[str | None, typer.Option(help="first seen at or after (ISO 8601)")] = None,
    until: Annotated[str | None, typer.Option(help="first seen before (ISO 8601)")] = None,
    env_file: EnvFile = None,
) -> None:
    """Write archived jobs as a BagIt bag: assets, manifest-sha256.txt, job manifests."""
    run_export(job, bagit, provider, since, until, env_file)


def verify_due(
    limit: int, report_file: Path | None, as_json: bool, env_file: list[Path] | None
) -> None:
    """`receiver verify --due`: the due fixity checks; exit 1 if any failed."""
    from receiver.audit.fixity import FixityReport
    from receiver.audit.fixity import verify_due as run_checks

    settings = load_settings(env_file, log_level="warning")
    require_ledger(settings)

    async def work(parts: Parts) -> FixityReport:
        return await run_checks(
            parts.ledger,
            parts.store,
            now=parts.clock,
            fixity_days=settings.fixity_days,
            limit=limit,
        )

    report: FixityReport = run_parts(settings, work)
    body = json.dumps(report.as_json(), indent=2)
    if report_file is not None:
        report_file.write_text(body + "\n")
    if as_json:
        typer.echo(body)
    else:
        typer.echo(
            f"due checks {len(report.checks)} (not verified since {report.checked_before}), "
            f"failed {len(report.failed)}"
        )
        for c in report.failed:
            typer.echo(f"{c.provider}/{c.job_id} asset {c.n}: {c.result} ({c.uri})")
    if report.failed:
        raise typer.Exit(code=1)


def _file_size(settings: Settings) -> int:
    path = settings.sqlite_path
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def run_prune(vacuum: bool, env_file: list[Path] | None) -> None:
    from receiver.audit.lifecycle import PruneReport, RetentionPolicy, prune
    from receiver.backends.sqlite import Database

    settings = load_settings(env_file, log_level="warning")
    require_ledger(settings)
    policy = RetentionPolicy.from_days(
        settings.payload_retention_days, settings.job_retention_days, settings.retention_batch
    )
    before = 0 if settings.distributed else _file_size(settings)

    async def work(parts: Parts) -> PruneReport:
        return await prune(parts.ledger, policy, parts.clock())

    report: PruneReport = run_parts(settings, work)
    jobs = (
        f"jobs removed {len(report.jobs_removed)} (ended over {settings.job_retention_days} days)"
        if settings.job_retention_days is not None
        else "job retention off"
    )
    typer.echo(
        f"payloads removed {report.payloads_removed} (received over "
        f"{settings.payload_retention_days} days ago), {jobs}"
    )
    if vacuum and not settings.distributed:
        # After the parts stopped: VACUUM wants no writer beside it.
        Database(settings.sqlite_path).vacuum()
        typer.echo(f"{settings.sqlite_path}: {before} -> {_file_size(settings)} bytes")


def run_forget(job: str, reason: str, yes: bool, env_file: list[Path] | None) -> None:
    from receiver.audit.lifecycle import ForgetReport, forget

    provider, job_id = split_job(job)
    if yes and not reason.strip():
        raise fail("--reason is required with --yes (the tombstone keeps it)")
    settings = load_settings(env_file, log_level="warning")
    require_ledger(settings)

    async def work(parts: Parts) -> ForgetReport:
        return await forget(
            parts.ledger,
            parts.store,
            parts.tracked,
            provider,
            job_id,
            reason=reason,
            now=parts.clock(),
            act=yes,
        )

    report: ForgetReport = run_parts(settings, work)
    record = "its ledger record" if report.in_ledger else "no ledger record"
    if report.tracked:
        record += " and its poll schedule entry"
    if not report.acted:
        typer.echo(f"dry run: would erase {job}: {record}, {len(report.keys)} object key(s):")
        for key in report.keys:
            typer.echo(f"  {key}")
        typer.echo("nothing changed; run again with --yes --reason TEXT to erase")
        return
    typer.echo(f"erased {job} ({record}); tombstone at {report.tombstone_at}")
    for erased in report.erased:
        typer.echo(f"  {erased.key}: {erased.removed} version(s) removed")
    for problem in report.not_removed:
        typer.secho(f"  NOT removed: {problem}", err=True, fg=typer.colors.YELLOW)
    if report.in_flight:
        typer.secho(
            "  copies were still pending: one running now may write its object before it stops; "
            "run this again after RECEIVER_LEASE_SECONDS to remove what it left",
            err=True,
            fg=typer.colors.YELLOW,
        )
    if report.not_removed:
        raise typer.Exit(code=1)


def run_export(
    job: str | None,
    bag: Path,
    provider: str | None,
    since: str | None,
    until: str | None,
    env_file: list[Path] | None,
) -> None:
    from receiver.audit.export import ExportReport, export_bagit, jobs_in_range, report_json

    if job is None and since is None and until is None:
        raise fail("give PROVIDER/JOB_ID or a range (--since and/or --until)")
    ref = split_job(job) if job is not None else None
    where = filters(provider=provider, state=None, job_type=None, since=since, until=until)
    settings = load_settings(env_file, log_level="warning")
    require_ledger(settings)

    async def work(parts: Parts) -> ExportReport:
        async def one(provider: str, job_id: str) -> AsyncIterator[JobRecord]:
            record = await parts.ledger.job(provider, job_id)
            if record is None:
                raise ConfigurationError(f"no job {provider}/{job_id} in the ledger")
            yield record

        jobs = one(*ref) if ref is not None else jobs_in_range(parts.ledger, where)
        return await export_bagit(parts.store, jobs, bag, now=parts.clock())

    try:
        report: ExportReport = run_parts(settings, work)
    except FileExistsError as exc:
        raise fail(str(exc)) from None
    typer.echo(report_json(report))
    if report.problems or not report.jobs:
        raise typer.Exit(code=1)
