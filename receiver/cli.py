"""The `receiver` command line."""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path
from typing import Annotated, Any

import typer

from receiver import logs
from receiver.errors import ConfigurationError
from receiver.settings import Settings

app = typer.Typer(help="Webhook receiver and asset archiver for AI media generation APIs.")

EnvFile = Annotated[
    Path | None, typer.Option("--env-file", help="read settings from this file too (KEY=value)")
]


def load_settings(env_file: Path | None, **overrides: Any) -> Settings:
    try:
        if env_file is not None:
            return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
        return Settings(**overrides)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def fail(message: str) -> typer.Exit:
    typer.secho(f"receiver: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    no_workers: Annotated[
        bool, typer.Option("--no-workers", help="receive only; run `receiver worker` elsewhere")
    ] = False,
    insecure_dev: Annotated[
        bool,
        typer.Option("--insecure-dev", help="development only: accept unauthenticated webhooks"),
    ] = False,
    env_file: EnvFile = None,
) -> None:
    """Receive webhooks (and, by default, run archive workers in the same process)."""
    import uvicorn

    from receiver.app import build_parts, create_app

    overrides: dict[str, Any] = {"insecure_dev": True} if insecure_dev else {}
    settings = load_settings(env_file, **overrides)
    logs.configure(settings.log_format, settings.log_level)
    try:
        parts = build_parts(settings)
        application = create_app(parts, workers=0 if no_workers else settings.workers)
    except (ConfigurationError, ValueError) as exc:
        raise fail(str(exc)) from None
    # access_log off: webhook paths may carry a provider's secret token.
    uvicorn.run(application, host=host, port=port, access_log=False, log_level="warning")


@app.command()
def worker(env_file: EnvFile = None) -> None:
    """Run archive workers only (RECEIVER_WORKERS parallel copies), until interrupted."""
    import asyncio
    import signal

    from receiver.app import build_parts

    settings = load_settings(env_file)
    logs.configure(settings.log_format, settings.log_level)
    try:
        parts = build_parts(settings)
    except (ConfigurationError, ValueError) as exc:
        raise fail(str(exc)) from None
    if settings.workers < 1:
        raise fail("RECEIVER_WORKERS must be at least 1 for `receiver worker`")

    async def run() -> None:
        parts.start(workers=settings.workers)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        await parts.stop()

    asyncio.run(run())


@app.command("dev-env")
def dev_env(path: Annotated[Path, typer.Argument(help="file to create")]) -> None:
    """Create a development settings file with fresh random secrets (kept if it exists)."""
    if path.exists():
        typer.echo(f"using development settings in {path}")
        return
    path.parent.mkdir(parents=True, exist_ok=True)

    def whsec() -> str:
        return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()

    lines = [
        "# Development settings made by `receiver dev-env`; secrets are random, keep them local.",
        f"RECEIVER_APEX_WEBHOOK_SECRETS={whsec()}",
        f"RECEIVER_APEX_WEBHOOK_TOKEN={secrets.token_urlsafe(24)}",
        f"RECEIVER_FLIKI_WEBHOOK_SECRETS={whsec()}",
        f"RECEIVER_FLIKI_WEBHOOK_TOKEN={secrets.token_urlsafe(24)}",
        f"RECEIVER_API_TOKEN={secrets.token_urlsafe(24)}",
    ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    typer.echo(f"created development settings with random secrets in {path}")


def main() -> None:
    app()
