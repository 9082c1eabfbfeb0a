"""S3 for tests: moto's real HTTP server, so boto3 runs its whole stack (signing, checksums, HTTP).

Import the fixtures into a test module with
``from tests.s3server import moto_s3, s3_bucket  # noqa: F401``.

``moto_s3`` (session) starts the server in a thread on 127.0.0.1 and points boto3's standard
configuration at it through the environment; every client created afterwards talks to it.
``moto_server_process`` runs the same server in a child process instead, for tests that measure
this process's memory and must not count what moto keeps.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

# Everything boto3 would otherwise pick up from the developer's machine, cleared for isolation.
_CLEARED = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
)


def point_boto3_at(mp: pytest.MonkeyPatch, endpoint: str) -> None:
    for name in _CLEARED:
        mp.delenv(name, raising=False)
    mp.setenv("AWS_ENDPOINT_URL", endpoint)
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.setenv("AWS_REGION", "us-east-1")
    # No ~/.aws files and no instance metadata lookups.
    mp.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[str]:
    """The endpoint URL of a moto S3 server, with boto3's environment pointed at it."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        with pytest.MonkeyPatch.context() as mp:
            point_boto3_at(mp, endpoint)
            yield endpoint
    finally:
        server.stop()


def admin_client() -> Any:
    """A plain boto3 S3 client for test set-up and inspection, for the current AWS_ENDPOINT_URL."""
    return _client_for(os.environ["AWS_ENDPOINT_URL"])


@functools.cache
def _client_for(endpoint: str) -> Any:
    # Cached: creating a boto3 client costs about 0.1 s, and most S3 tests need one.
    return boto3.session.Session().client("s3", endpoint_url=endpoint)


@pytest.fixture
def s3_bucket(moto_s3: str) -> str:
    """A new, empty bucket on the moto server (unique name per test)."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    admin_client().create_bucket(Bucket=name)
    return name


@contextlib.contextmanager
def moto_server_process() -> Iterator[str]:
    """Run moto's S3 server in a child process; yield its endpoint URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    child = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_serving(endpoint, child)
        yield endpoint
    finally:
        stop_child(child)


def wait_until_serving(endpoint: str, child: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Block until a server child answers HTTP at `endpoint`; fail fast if it died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(endpoint, timeout=1, trust_env=False)
            return
        except httpx.TransportError:
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server at {endpoint} did not start") from None
            time.sleep(0.05)


def stop_child(child: subprocess.Popen[bytes], grace: float = 5) -> None:
    child.terminate()
    try:
        child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        # moto's request threads can outlive SIGTERM (it exits from the main thread only).
        child.kill()
        child.wait(timeout=grace)
