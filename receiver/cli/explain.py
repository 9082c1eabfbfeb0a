"""One readable line, with the fix, for the errors an operator meets on the command line.

`receiver` prints these instead of a traceback (`--debug` shows the traceback). Messages never
carry a signed URL's query string, a token or a key.
"""

from __future__ import annotations

import sqlite3

import httpx
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
)

from receiver.domain import scrub_secrets
from receiver.errors import ConfigurationError
from receiver.store import StoreError

CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidToken",
    "AuthFailure",
}
DENIED_CODES = {"AccessDenied", "AccessDeniedException", "Forbidden", "403"}
AWS_FIX = (
    "check AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), "
    "AWS_REGION and, for an S3-compatible store, AWS_ENDPOINT_URL"
)


def rejected(message: str, details: object) -> str:
    """A `RequestRejected` as prose: "message: field: problem; field: problem"."""
    if isinstance(details, list) and all(isinstance(d, dict) for d in details):
        parts = []
        for d in details:
            where = d.get("field") or d.get("name") or ""
            problem = d.get("problem") or d.get("message") or ""
            parts.append(f"{where}: {problem}" if where and problem else str(where or problem))
        return f"{message}: {'; '.join(p for p in parts if p)}" if parts else message
    if isinstance(details, dict):
        pairs = "; ".join(f"{k}: {v}" for k, v in details.items())
        return f"{message}: {pairs}" if pairs else message
    return f"{message}: {details}" if details else message


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def explain(exc: BaseException) -> str:
    """The line to print for `exc` (walks the cause chain to the AWS/SQLite error behind it)."""
    for cause in _causes(exc):
        line = _explain_one(cause)
        if line is not None:
            return scrub_secrets(line)
    return scrub_secrets(
        f"unexpected error: {type(exc).__name__}: {exc} (run with --debug for the traceback)"
    )


def _explain_one(exc: BaseException) -> str | None:
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return f"no usable AWS credentials ({exc}): {AWS_FIX}"
    if isinstance(exc, NoRegionError):
        return "no AWS region configured: set AWS_REGION (or a profile with a region)"
    if isinstance(exc, EndpointConnectionError):
        return f"cannot reach {exc.kwargs.get('endpoint_url', 'the AWS endpoint')}: {AWS_FIX}"
    if isinstance(exc, ClientError):
        return _client_error(exc)
    if isinstance(exc, BotoCoreError):
        return f"AWS: {exc}: {AWS_FIX}"
    if isinstance(exc, sqlite3.DatabaseError):
        return (
            f"the SQLite ledger could not be read ({exc}): check RECEIVER_LEDGER_URL points at "
            "receiver's database file and that no other program holds it"
        )
    if isinstance(exc, httpx.HTTPError):
        return f"HTTP request failed: {type(exc).__name__}: {exc}"
    if isinstance(exc, ConfigurationError):
        return str(exc)
    if isinstance(exc, PermissionError):
        where = exc.filename or exc
        return f"permission denied: {where}: run as the user that owns receiver's state"
    if isinstance(exc, StoreError) and not isinstance(exc.__cause__, Exception):
        return f"archive store: {exc}"
    return None


def _client_error(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    operation = exc.operation_name
    bucket = exc.response.get("Error", {}).get("BucketName")
    if code == "NoSuchBucket" or (code == "404" and operation == "HeadBucket"):
        name = f" {bucket!r}" if bucket else ""
        return (
            f"the archive bucket{name} does not exist (S3 {operation}: {code}): create it, "
            "or fix RECEIVER_ARCHIVE_URL=s3://bucket/prefix"
        )
    if code in ("ResourceNotFoundException",):
        return (
            f"the DynamoDB table was not found ({operation}): deploy infra/receiver.yaml, or fix "
            "RECEIVER_LEDGER_URL=dynamodb://TABLE (and AWS_REGION)"
        )
    if code in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
        return (
            f"the SQS queue was not found ({operation}): fix RECEIVER_QUEUE_URL=sqs://NAME "
            "(and AWS_REGION)"
        )
    if code in CREDENTIAL_CODES:
        return f"AWS rejected the credentials ({operation}: {code}): {AWS_FIX}"
    if code in DENIED_CODES:
        return (
            f"AWS denied {operation} ({code}): the credentials work but lack permission; use "
            "the role from infra/receiver.yaml (ServiceRoleArn) or grant it"
        )
    message = error.get("Message", "")
    return f"AWS {operation} failed: {code} {message}".rstrip() + f" ({AWS_FIX})"
