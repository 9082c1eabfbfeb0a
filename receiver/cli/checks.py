"""`receiver doctor` and `receiver send-test`: is this receiver set up right, and does its
webhook endpoint answer a provider's callback?"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer

from receiver import settings as settings_module
from receiver.cli.base import AsJson, EnvFile, app, fail, load_settings
from receiver.errors import ConfigurationError
from receiver.settings import Settings


@app.command()
def doctor(as_json: AsJson = False, env_file: EnvFile = None) -> None:
    """Show the effective settings and where each came from, then check every configured part.

    Checks: the ledger opens (never created), the queue answers, the store takes and deletes a
    probe object under _doctor/, each provider's webhooks are authenticated and its status API
    accepts the key, polling providers have their base URL. Exit 1 if any check fails.
    """
    from receiver.app import open_store
    from receiver.cli import doctor as doc

    try:
        settings = settings_module.load(env_file or ())
    except ConfigurationError as exc:
        failed = [doc.Check("settings", False, str(exc))]
        _print_doctor([], failed, as_json)
        raise typer.Exit(code=1) from None
    rows = doc.effective_settings(settings, settings_module.sources(env_file or ()))

    def store_for(s: Settings) -> Any:
        return open_store(s.archive_url, part_size=s.part_size, parts_in_flight=s.parts_in_flight)

    checks = asyncio.run(doc.run_checks(settings, open_store=store_for))
    _print_doctor(rows, checks, as_json)
    if any(c.ok is False for c in checks):
        raise typer.Exit(code=1)


def _print_doctor(rows: list[Any], checks: list[Any], as_json: bool) -> None:
    from receiver.cli.doctor import report_json

    if as_json:
        typer.echo(json.dumps(report_json(rows, checks), indent=2))
        return
    if rows:
        typer.echo("settings (value, then where it came from):")
        width = max(len(r.variable) for r in rows)
        for r in rows:
            typer.echo(f"  {r.variable:<{width}} = {r.value or '(empty)'}  [{r.source}]")
    typer.echo("checks:")
    for c in checks:
        typer.echo(f"  {c.mark:<4} {c.name}: {c.detail}")
    failed = sum(c.ok is False for c in checks)
    typer.echo(f"{failed} check(s) failed" if failed else "all checks passed")


@app.command("send-test")
def send_test(
    provider: Annotated[
        str | None, typer.Argument(help="apex or fliki (not with --endpoint)")
    ] = None,
    url: Annotated[
        str, typer.Option(help="the receiver's base URL (its /webhooks/... are appended)")
    ] = "http://127.0.0.1:8000",
    token: Annotated[
        bool, typer.Option("--token", help="authenticate with the path token even if signing")
    ] = False,
    endpoint: Annotated[
        str | None,
        typer.Option(
            help="instead, send a signed sample onward event to this endpoint of "
            "RECEIVER_ONWARD_ENDPOINTS (your application's side)"
        ),
    ] = None,
    event_type: Annotated[
        str, typer.Option("--event", help="the sample's type, with --endpoint")
    ] = "job.archived",
    env_file: EnvFile = None,
) -> None:
    """Post a correctly authenticated sample callback (the provider's documented "job failed"
    payload, fresh job id) to a receiver and print its answer; exit 1 unless it is a 2xx.
    With --endpoint: post a signed sample onward event to your application instead."""
    import httpx

    from receiver.cli.send_test import post, prepare, send_sample_event

    settings = load_settings(env_file)
    if endpoint is not None:
        answer = send_sample_event(settings, endpoint, event_type)
        typer.echo(answer.line)
        if not answer.ok:
            raise typer.Exit(code=1)
        return
    if provider is None:
        raise fail("name a provider (apex or fliki), or an onward endpoint with --endpoint")
    try:
        prepared = prepare(provider, settings.provider(provider), url, use_token=token)
    except ConfigurationError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"POST {prepared.shown_url} ({prepared.auth}), job {provider}/{prepared.job_id}")
    try:
        response = post(prepared)
    except httpx.HTTPError as exc:
        typer.secho(
            f"receiver: cannot reach {url} ({type(exc).__name__}: {exc}): is `receiver serve` "
            "running there? (--url)",
            err=True,
            fg=typer.colors.RED,
        )
        raise typer.Exit(code=1) from None
    typer.echo(f"HTTP {response.status_code}: {response.text.strip()}")
    if not response.is_success:
        raise typer.Exit(code=1)
    typer.echo(f"recorded: `receiver jobs show {provider}/{prepared.job_id}` shows it")
