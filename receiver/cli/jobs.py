"""`receiver jobs list|show`: look jobs up in the ledger."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from receiver.cli import listing
from receiver.cli.base import (
    AsJson,
    EnvFile,
    JobType,
    Provider,
    Since,
    State,
    Until,
    app,
    fail,
    filters,
    load_settings,
    require_ledger,
    run_parts,
    split_job,
)
from receiver.cli.listing import count_line, page_and_count
from receiver.ledger import JobFilter

if TYPE_CHECKING:
    from receiver.app import Parts

jobs_app = typer.Typer(help="Look jobs up in the ledger.")
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("list")
def jobs_list(
    provider: Provider = None,
    state: State = None,
    job_type: JobType = None,
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    as_json: AsJson = False,
    env_file: EnvFile = None,
) -> None:
    """List jobs, newest first."""
    from receiver.audit.api import summary_json

    where = filters(provider=provider, state=state, job_type=job_type, since=since, until=until)
    settings = load_settings(env_file, log_level="warning")
    require_ledger(settings)
    rows, total = run_parts(settings, lambda p: page_and_count(p.ledger, where, limit))
    jobs = [summary_json(j) for j in rows]
    if as_json:
        typer.echo(json.dumps(jobs, indent=2))
        if total != len(jobs):
            typer.echo(count_line(len(jobs), total, limit), err=True)
        return
    if not jobs:
        typer.echo("no jobs match" if where != JobFilter() else "no jobs in the ledger yet")
        return
    table = listing.table("provider", "job id", "state", "type", "received", "archived", "error")
    for j in jobs:
        table.add_row(
            j["provider"],
            j["job_id"],
            j["state"],
            j["type"] or "",
            j["received_at"],
            j["archived_at"] or "",
            j["error"] or "",
        )
    Console().print(table)
    typer.echo(count_line(len(jobs), total, limit))


@jobs_app.command("show")
def jobs_show(
    job: Annotated[str, typer.Argument(help="PROVIDER/JOB_ID")],
    as_json: AsJson = False,
    env_file: EnvFile = None,
) -> None:
    """Everything about one job: deliveries, assets, deadline and outcome."""
    from receiver.audit.api import job_json

    provider, job_id = split_job(job)
    settings = load_settings(env_file, log_level="warning")

    async def lookup(parts: Parts) -> dict[str, Any] | None:
        record = await parts.ledger.job(provider, job_id)
        if record is None:
            return None
        return job_json(
            record,
            await parts.tracked.get(provider, job_id),
            payload_retention_days=settings.payload_retention_days,
        )

    settings = load_settings(env_file, log_level="warning")
    require_ledger(settings)
    body = run_parts(settings, lookup)
    if body is None:
        raise fail(f"no job {job}")
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    console = Console()
    console.print(f"[bold]{provider}/{job_id}[/bold]  state: [bold]{body['state']}[/bold]")
    for label in (
        "type",
        "received_at",
        "completed_at",
        "failed_at",
        "archived_at",
        "deadline",
        "archived_with_slack_seconds",
        "error",
        "credits_refunded",
    ):
        if body[label] is not None:
            console.print(f"  {label}: {body[label]}")
    if body["polling"] is not None:
        polling = body["polling"]
        console.print(
            f"  polling: {polling['state']} after {polling['polls']} poll(s)"
            + (f", next at {polling['next_poll_at']}" if polling["next_poll_at"] else "")
            + (f", stopped: {polling['stop_reason']}" if polling["stop_reason"] else "")
            + (f", last error: {polling['last_error']}" if polling["last_error"] else "")
        )
    deliveries = listing.table(
        "received", "webhook id", "source", "auth", "event", "outcome", title="deliveries"
    )
    for d in body["deliveries"]:
        deliveries.add_row(
            d["received_at"],
            d["webhook_id"] or "",
            d["source"],
            d["authentication"],
            d["event"],
            d["outcome"],
        )
    console.print(deliveries)
    removed = [d for d in body["deliveries"] if d["payload_removed"]]
    if removed:
        console.print(
            f"  {removed[0]['payload_removed']} ({len(removed)} of "
            f"{len(body['deliveries'])} deliveries; their SHA-256 stays)",
            soft_wrap=True,
        )
    assets = listing.table("n", "state", "uri", "size", "sha256", "source", title="assets")
    for a in body["assets"]:
        assets.add_row(
            str(a["n"]),
            a["state"],
            a["uri"] or "",
            str(a["size"] or ""),
            a["sha256"] or "",
            a["source"],
        )
    console.print(assets)
    for a in body["assets"]:
        fixity = a["fixity"]
        if fixity["verified_at"] is not None:
            outcome = "intact" if fixity["ok"] else f"FAILED: {fixity['problem']}"
            console.print(
                f"  asset {a['n']}: last verified {fixity['verified_at']} "
                f"({fixity['verified_by']}): {outcome}",
                soft_wrap=True,
            )
