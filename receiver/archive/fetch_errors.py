"""How a source's answer becomes a FetchError: gone, unavailable, rejected or refused.

The archiver decides on retries from the class alone; the reason text (an excerpt of the
provider's XML or JSON error, scrubbed of query strings and signing parameters) is for people.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import json
import re
import time
from typing import NoReturn

import httpx

from receiver.domain import scrub_secrets

_GONE_STATUSES = frozenset({403, 404, 410})
# Codes that mean "your signed link expired" even when the status is not 403 (GCS answers 400).
_EXPIRED_CODES = frozenset({"ExpiredToken", "ExpiredRequest"})
_ERROR_BODY_LIMIT = 4096
_ERROR_BODY_SECONDS = 5.0
_EXCERPT_LIMIT = 200
_CODE_LIMIT = 100
# A Retry-After further away than this is treated as this: the archiver has its own deadlines.
_RETRY_AFTER_CAP = 3600.0


class FetchError(Exception):
    """Base class of every fetch failure. ``reason`` never contains a URL query string."""

    retryable: bool = False

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.code = code
        self.retry_after = retry_after


class UrlRefused(FetchError):
    """The guard refused the URL (scheme, host, address, userinfo, too many redirects...)."""


class SourceGone(FetchError):
    """The link expired or the object is gone (403, 404, 410, GCS 400 ExpiredToken)."""


class SourceUnavailable(FetchError):
    """A transient failure: 408, 429, 5xx, network errors, timeouts, truncated bodies."""

    retryable = True


class SourceRejected(FetchError):
    """A permanent failure that is not expiry: other 4xx, or a body larger than max_bytes."""


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        # Measured against the server's own Date header when present: immune to clock skew.
        now: float = time.time()
        date = response.headers.get("date")
        if date is not None:
            with contextlib.suppress(TypeError, ValueError):
                now = email.utils.parsedate_to_datetime(date).timestamp()
        seconds = when.timestamp() - now
    return min(max(seconds, 0.0), _RETRY_AFTER_CAP)


def _error_code(body: bytes) -> tuple[str | None, str]:
    """The provider's error code and a short message from an S3/R2/GCS XML or JSON body."""
    text = body.decode("utf-8", "replace")
    code: str | None = None
    message = ""
    xml_code = re.search(r"<Code>\s*([^<]{1,100}?)\s*</Code>", text)
    if xml_code is not None:
        code = xml_code.group(1)
        xml_message = re.search(r"<Message>\s*([^<]*?)\s*</Message>", text)
        message = xml_message.group(1) if xml_message is not None else ""
    else:
        # RecursionError: a few KB of "[[[[..." nests deeper than the parser's stack.
        with contextlib.suppress(ValueError, RecursionError):
            code, message = _json_error(json.loads(text))
    if not message:
        message = text
    # Scrubbed whole, then collapsed and cut: the rule sees each value entire, and a header
    # quoted on its own line ends there.
    excerpt = " ".join(scrub_secrets(message).split())[:_EXCERPT_LIMIT]
    if code is not None:
        # The code is the source's text too, and goes into the reason beside the excerpt.
        code = " ".join(scrub_secrets(code).split())[:_CODE_LIMIT] or None
    return code, excerpt


def _json_error(document: object) -> tuple[str | None, str]:
    # Shapes handled: {"Code": ..., "Message": ...} and GCS JSON API errors,
    # {"error": {"code": 400, "message": ..., "status": ..., "errors": [{"reason": ...}]}}.
    if not isinstance(document, dict):
        return None, ""
    error = document.get("error", document)
    if not isinstance(error, dict):
        return None, str(error)
    code: str | None = None
    for key in ("Code", "code", "status", "reason"):
        value = error.get(key)
        if isinstance(value, str) and value:
            code = value
            break
    errors = error.get("errors")
    if code is None and isinstance(errors, list) and errors and isinstance(errors[0], dict):
        reason = errors[0].get("reason")
        code = reason if isinstance(reason, str) else None
    message = error.get("Message", error.get("message", ""))
    return code, message if isinstance(message, str) else ""


async def _read_error_body(response: httpx.Response) -> bytes:
    body = b""
    # The body is only a diagnostic: a broken or trickling one must not delay the verdict.
    with contextlib.suppress(httpx.HTTPError, TimeoutError):
        async with asyncio.timeout(_ERROR_BODY_SECONDS):
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) >= _ERROR_BODY_LIMIT:
                    break
    return body[:_ERROR_BODY_LIMIT]


async def _raise_for_status(response: httpx.Response, shown: str) -> NoReturn:
    """Raise the FetchError that an unusable response means."""
    status = response.status_code
    code, excerpt = _error_code(await _read_error_body(response))
    reason = f"{shown}: HTTP {status}" + (f" {code}" if code else "")
    if excerpt:
        reason += f": {excerpt}"
    if status in _GONE_STATUSES or (status == 400 and code in _EXPIRED_CODES):
        raise SourceGone(reason, status=status, code=code)
    if status in (408, 429) or 500 <= status < 600:
        raise SourceUnavailable(
            reason, status=status, code=code, retry_after=_retry_after(response)
        )
    raise SourceRejected(reason, status=status, code=code)
