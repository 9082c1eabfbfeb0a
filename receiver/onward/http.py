"""An HTTP(S) destination: each try is one POST of the event's bytes, signed with Standard
Webhooks headers by the official `standardwebhooks` package, so the application verifies it
with that package too (README "Telling your application").

The URL is an operator setting, so private addresses are allowed (an application beside
receiver); redirects are never followed (a 3xx ends the series: the setting is wrong), and
the URL's credentials and query never reach an attempt's error, a log or the audit.
"""

from __future__ import annotations

import asyncio
import email.utils
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import httpx
from standardwebhooks.webhooks import Webhook

from receiver.domain import scrub_secrets
from receiver.ledger.events import PendingSend
from receiver.onward import Answer

#: How much of an answer is kept (characters, after scrubbing), and read to scrub it whole.
ANSWER_KEPT = 1024
ANSWER_READ = 4 * ANSWER_KEPT


def shown_url(url: str) -> str:
    """An endpoint's URL as the audit may show it: no credentials, no query, no fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def signature(secrets: tuple[str, ...], event_id: str, at: datetime, body: bytes) -> str:
    """`webhook-signature`: one `v1,...` per secret, space-separated (rotation: an application
    that knows either secret verifies)."""
    return " ".join(Webhook(secret).sign(event_id, at, body) for secret in secrets)


def retry_after(value: str | None, now: datetime) -> float | None:
    """Retry-After as seconds: a number of seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


class HttpDestination:
    def __init__(
        self,
        name: str,
        url: str,
        secrets: tuple[str, ...],
        *,
        timeout: float,
        concurrency: int,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.url = url
        self.secrets = secrets
        self.wall_clock = wall_clock
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            transport=transport,
        )
        self.deadline = timeout

    async def send(self, send: PendingSend) -> Answer:
        # The signature's timestamp is the try's (the receiver checks its freshness); the id
        # and the bytes are the event's, the same on every try and replay.
        at = self.wall_clock()
        headers = {
            "content-type": "application/json",
            "user-agent": "receiver-onward/1",
            "webhook-id": send.event_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": signature(self.secrets, send.event_id, at, send.body),
        }
        try:
            # One bound for the whole try: httpx's read timeout is the gap between chunks.
            async with (
                asyncio.timeout(self.deadline),
                self.client.stream(
                    "POST", self.url, content=send.body, headers=headers
                ) as response,
            ):
                kept = b""
                async for chunk in response.aiter_bytes():
                    kept += chunk
                    if len(kept) >= ANSWER_READ:
                        break
        except TimeoutError:
            return Answer(None, error=f"no answer within {self.deadline:g} s")
        except httpx.HTTPError as exc:
            return Answer(None, error=self._describe(exc))
        # Scrubbed whole, then cut: a secret straddling the cut is still found by its name.
        text = scrub_secrets(kept[:ANSWER_READ].decode("utf-8", "replace"))[:ANSWER_KEPT]
        status = response.status_code
        if 300 <= status < 400:
            return Answer(
                status, text, f"HTTP {status}: redirects are not followed (fix the URL)", None
            )
        error = None if 200 <= status < 300 else f"HTTP {status}"
        return Answer(status, text, error, retry_after(response.headers.get("retry-after"), at))

    def _describe(self, exc: httpx.HTTPError) -> str:
        text = f"{type(exc).__name__}: {exc}".rstrip(": ")
        # The URL may carry credentials or a query: name the endpoint instead.
        return scrub_secrets(text.replace(self.url, f"<{self.name}>"))

    async def aclose(self) -> None:
        await self.client.aclose()
