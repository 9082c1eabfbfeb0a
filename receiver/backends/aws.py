"""Shared boto3 plumbing for the AWS adapters (DynamoDB ledger, SQS queue).

boto3 is synchronous. The adapters keep their logic synchronous too (a read-decide-write loop is
easier to follow without awaits in the middle) and run each whole operation on a thread of one
shared pool, so the event loop never blocks on the network. The pool is larger than asyncio's
default (min(32, cores + 4): 6 threads on a 2-core box) because these threads spend their time
waiting on the network, not computing; it matches botocore's connection pool size.

Endpoint, region and credentials come from boto3's own configuration (`AWS_ENDPOINT_URL`,
`AWS_REGION`, profiles, instance roles), exactly as for the S3 store.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from receiver.errors import ConfigurationError

T = TypeVar("T")

POOL_SIZE = 64

_executor = ThreadPoolExecutor(max_workers=POOL_SIZE, thread_name_prefix="aws")


async def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking boto3 operation on the shared AWS pool."""
    loop = asyncio.get_running_loop()
    # In the caller's context (run_in_executor does not copy it): a botocore span is then a
    # child of the caller's (receiver.tracing), and structlog's bound context holds too.
    context = contextvars.copy_context()
    return await loop.run_in_executor(_executor, functools.partial(context.run, fn, *args))


def client(service: str) -> Any:
    """A boto3 client (typed Any: only S3 has stubs here). Clients are thread-safe."""
    config = Config(
        max_pool_connections=POOL_SIZE,
        # "standard" retries throttling and transient 5xx with jittered backoff; our own retry
        # loops handle the conditional-write conflicts, which botocore does not retry.
        retries={"mode": "standard", "max_attempts": 5},
        connect_timeout=5,
        read_timeout=30,
    )
    session: Any = boto3.session.Session()
    return session.client(service, config=config)


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def resource_name(url: str, scheme: str, variable: str) -> str:
    """`dynamodb://table` -> `table`; `sqs://queue` -> `queue` (names only, no paths)."""
    prefix = f"{scheme}://"
    name = url[len(prefix) :] if url.startswith(prefix) else ""
    if not name or "/" in name.strip("/"):
        raise ConfigurationError(f"{variable}={url!r}: expected {scheme}://NAME")
    return name.strip("/")
