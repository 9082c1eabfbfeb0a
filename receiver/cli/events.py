"""`receiver events list | show | replay`: what receiver told your application, and telling it
again (same event id, same bytes)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from receiver.cli import listing
from receiver.cli.base import (
    AsJson,
    EnvFile,
    Since,
    Until,
    app,
    fail,
    load_settings,
    require_ledger,
    run_parts,
    split_job,
)
from receiver.cli.explain import rejected
from receiver.errors import RequestRejected

if TYPE_CHECKING:
    from receiver.app import Parts
    from receiver.ledger.events import EventFilter

events_app = typer.Typer(help="Onward events: what receiver told your application.")
app.add_typer(events_app, name="events")

Endpoint = Annotated[
    str | None, typer.Option(help="an endpoint's name (RECEIVER_ONWARD_ENDPOINTS)")
]
EventTypeOption = Annotated[
    str | None, typer.Option("--type", help="asset.archived, job.archived, job.failed...")
]


def _filter(**values: Any) -> EventFilter:
    from receiver.audit.events import event_filter

    try:
        return event_filter(**values)
    except RequestRejected as exc:
        raise fail(rejected(exc.message, exc.details)) from None


@events_app.command("list")
def events_list(
    endpoint: Endpoint = None,
    state: Annotated[
        str | None, typer.Option(help="pending, delivered or failed (a send to an endpoint)")
    ] = None,
    since: Since = None,
    until: Until = None,
    event_type: EventTypeOption = None,
    job: Annotated[str | None, typer.Option(help="PROVIDER/JOB_ID")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    as_json: AsJson = False,
    env_file: EnvFile = None,
) -> None:
    """List events, newest first, with each endpoint's send state."""
    from receiver.audit.events import event_json

    where = _filter(
        endpoint=endpoint,
        state=state,
        since=since,
        until=until,
        event_type=event_type,
        job=split_job(job) if job else None,
    )
    settings = load_settings(env_file, log_level="warning")
    require_ledger(settings)
    found = run_parts(settings, lambda p: p.ledger.events(where, limit))
    rows = [event_json(e) for e in found]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no events match")
        return
    table = listing.table("created", "event id", "type", "job", "sends")
    for e in rows:
        sends = ", ".join(f"{s['endpoint']}: {s['state']} ({s['attempts']})" for s in e["sends"])
        table.add_row(
            e["created_at"], e["id"], e["type"], f"{e['provider']}/{e['job_id']}", sends or "-"
        )
    Console().print(table)
    typer.echo(
        f"{len(rows)} event(s)" + (f" (at most {limit}: --limit)" if len(rows) == limit else "")
    )


@events_app.command("show")
def events_show(
    event_id: Annotated[str, typer.Argument(help="the event id (evt_...)")],
    as_json: AsJson = False,
    env_file: EnvFile = None,
) -> None:
    """One event: its body, and every attempt to every endpoint."""
    from receiver.audit.events import event_json

    settings = load_settings(env_file, log_level="warning")
    require_ledger(settings)
    found = run_parts(settings, lambda p: p.ledger.event(event_id))
    if found is None:
        raise fail(f"no event {event_id}")
    body = event_json(found, body=True)
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    console = Console()
    console.print(f"[bold]{body['id']}[/bold]  {body['type']}  {body['provider']}/{body['job_id']}")
    console.print(f"  created_at: {body['created_at']}")
    for send in body["sends"]:
        console.print(
            f"  {send['endpoint']}: {send['state']} after {send['attempts']} attempt(s)"
            + (f", next at {send['next_attempt_at']}" if send["next_attempt_at"] else "")
            + (f", delivered at {send['delivered_at']}" if send["delivered_at"] else ""),
            soft_wrap=True,
        )
        for a in send["history"]:
            console.print(
                f"    {a['at']}  {a['outcome']}  HTTP {a['status'] or '-'}  "
                f"{a['duration_ms']:.0f} ms" + (f"  {a['error']}" if a["error"] else ""),
                soft_wrap=True,
            )
    typer.echo(json.dumps(body["body"], indent=2))


@events_app.command("replay")
def events_replay(
    event_id: Annotated[str | None, typer.Argument(help="one event id (evt_...)")] = None,
    since: Annotated[str | None, typer.Option(help="events created at or after (ISO 8601)")] = None,
    until: Annotated[str | None, typer.Option(help="events created before (ISO 8601)")] = None,
    event_type: EventTypeOption = None,
    endpoint: Annotated[
        str | None,
        typer.Option(help="only this endpoint (default: every endpoint the event's type goes to)"),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 10_000,
    env_file: EnvFile = None,
) -> None:
    """Send events again, with the same id and the same bytes: one (EVT) or a window (--since,
    --until, --type). A running `receiver serve` or `receiver worker` sends them."""
    if event_id is None and since is None:
        raise fail("name an event (EVT) or a window (--since, optionally --until)")
    where = _filter(event_id=event_id, since=since, until=until, event_type=event_type)
    settings = load_settings(env_file, log_level="warning")
    require_ledger(settings)
    known = {e.name for e in settings.onward}
    if endpoint is not None and endpoint not in known:
        raise fail(
            f"no endpoint {endpoint!r} in RECEIVER_ONWARD_ENDPOINTS (known: {sorted(known)})"
        )

    async def replay(parts: Parts) -> list[str]:
        targets = [endpoint] if endpoint is not None else None
        return await parts.ledger.replay(where, targets, datetime.now(UTC), limit)

    ids = run_parts(settings, replay)
    if event_id is not None and not ids:
        raise fail(f"no event {event_id} (or no endpoint takes its type)")
    for found in ids:
        typer.echo(found)
    typer.echo(f"{len(ids)} event(s) queued to send again")
