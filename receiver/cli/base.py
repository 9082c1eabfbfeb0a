"""What every `receiver` command shares: the Typer app, settings loading (--env-file), the
one-line error exit, the ledger guard, --debug and --version, and readable help."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from receiver import settings as settings_module
from receiver.cli.explain import rejected
from receiver.errors import ConfigurationError, RequestRejected
from receiver.ledger import JobFilter
from receiver.settings import Settings

if TYPE_CHECKING:
    from receiver.app import Parts

T = TypeVar("T")

app = typer.Typer(
    help="Webhook receiver and asset archiver for AI media generation APIs.",
    # One readable line per error (`main`), the traceback only with --debug.
    pretty_exceptions_enable=False,
    # No `<bool>` and friends after every option in --help.
    rich_markup_mode=None,
    add_completion=False,
)

EnvFile = Annotated[
    list[Path] | None,
    typer.Option(
        "--env-file",
        metavar="FILE",
        help="also read settings from this file (KEY=value), on top of ./.env; "
        "repeat for several, a later file wins",
        show_default=False,
    ),
]


def load_settings(env_file: list[Path] | None, **overrides: Any) -> Settings:
    try:
        return settings_module.load(env_file or (), **overrides)
    except ConfigurationError as exc:
        raise fail(str(exc)) from None


def fail(message: str) -> typer.Exit:
    typer.secho(f"receiver: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


DEBUG = {"on": False}  # set by --debug: errors end in their traceback instead of one line


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"receiver {version('receiver')}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[
        bool, typer.Option("--debug", help="show the traceback of an error, not only its line")
    ] = False,
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version"),
    ] = False,
) -> None:
    """Webhook receiver and asset archiver for AI media generation APIs."""
    DEBUG["on"] = debug


def require_ledger(settings: Settings) -> None:
    """Commands that read the ledger never create one (an empty ledger would look healthy)."""
    from receiver.cli.doctor import missing_ledger

    if not settings.distributed and not settings.sqlite_path.exists():
        raise fail(missing_ledger(settings.sqlite_path))


AsJson = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def log_listening(settings: Settings, host: str, port: int) -> None:
    import structlog

    base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    webhooks = []
    for name in settings.enabled_webhook_providers:
        config = settings.provider(name)
        if config.webhook_secrets or not config.webhook_token:
            webhooks.append(f"{base}/webhooks/{name}")
        if config.webhook_token:  # the token itself is never logged
            webhooks.append(f"{base}/webhooks/{name}/<RECEIVER_{name.upper()}_WEBHOOK_TOKEN>")
    structlog.get_logger("receiver.cli").info(
        "listening", url=base, webhooks=webhooks, jobs=f"{base}/jobs", health=f"{base}/healthz"
    )


def simulator_settings(sim: Any, keys: dict[str, str], secrets_: dict[str, str]) -> list[str]:
    """What a receiver needs to talk to `sim` and nothing else: every provider's base URL (so
    no status call reaches a real provider), its API key and webhook secret, and downloads
    over http from 127.0.0.1."""
    lines = []
    for name in keys:
        upper = name.upper()
        lines.append(f"RECEIVER_{upper}_BASE_URL={sim.base_url(name)}")
        lines.append(f"RECEIVER_{upper}_API_KEY={keys[name]}")
        lines.append(f"RECEIVER_{upper}_DOWNLOAD_HOSTS=127.0.0.1")
        if name in secrets_:
            lines.append(f"RECEIVER_{upper}_WEBHOOK_SECRETS={secrets_[name]}")
    lines += ["RECEIVER_FETCH_ALLOW_HTTP=true", "RECEIVER_FETCH_ALLOW_NETWORKS=127.0.0.0/8"]
    return lines


def write_private(path: Path, lines: list[str]) -> None:
    """Write a settings file readable by its owner only (it holds secrets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")


def whsec() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def command() -> Any:
    """The click command behind `receiver`, with readable metavars (`--host HOST`, not
    `--host <str>`); commands added later get them too."""
    cli = typer.main.get_command(app)

    def tidy(cmd: Any) -> None:
        for param in cmd.params:
            if param.param_type_name == "argument":
                # Typer prints "JOB <str>"; the argument's own help says what it takes.
                param.display_type_rich = lambda ctx: None
            elif not param.is_flag and param.metavar is None:
                param.metavar = (param.name or "value").upper()
        for sub in getattr(cmd, "commands", {}).values():
            if sub.short_help is None and sub.help:
                # The whole first line, not click's cut at 45 characters ("...").
                sub.short_help = sub.help.strip().splitlines()[0]
            tidy(sub)

    tidy(cli)
    return cli


# --- what the commands that read the ledger share ---------------------------------------------

Provider = Annotated[str | None, typer.Option(help="apex, fliki, flora or vividflow")]
State = Annotated[str | None, typer.Option(help="queued, archived, failed, expired, dead...")]
JobType = Annotated[str | None, typer.Option("--type", help="provider job type, e.g. video")]
Since = Annotated[str | None, typer.Option(help="first seen at or after (ISO 8601)")]
Until = Annotated[str | None, typer.Option(help="first seen before (ISO 8601)")]


def run_parts(settings: Settings, work: Callable[[Parts], Awaitable[T]]) -> T:
    """Run `work` against this process's parts (no workers), then shut them down."""
    from receiver.app import build_parts

    async def go() -> T:
        parts = build_parts(settings)
        parts.start(workers=0)
        try:
            return await work(parts)
        finally:
            await parts.stop()

    try:
        return asyncio.run(go())
    except RequestRejected as exc:
        raise fail(rejected(exc.message, exc.details)) from None
    except ConfigurationError as exc:
        raise fail(str(exc)) from None


def split_job(ref: str) -> tuple[str, str]:
    provider, sep, job_id = ref.partition("/")
    if not sep or not job_id:
        raise fail(f"expected PROVIDER/JOB_ID, got {ref!r}")
    return provider, job_id


def filters(**values: str | None) -> JobFilter:
    from receiver.audit.api import job_filter

    try:
        return job_filter(**values)
    except RequestRejected as exc:
        raise fail(rejected(exc.message, exc.details)) from None
