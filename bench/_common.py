"""What the benchmarks share: child processes with their peak RSS, S3 set-up, a static file source.

Every measured side runs in a child process of its own, so that its peak RSS (``ru_maxrss``
from ``wait4``) is its alone and neither side warms caches for the other inside one interpreter.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import httpx

MiB = 2**20

#: Where benchmark files and databases go: a real disk, so that fsync costs what it costs.
WORKDIR = os.environ.get("BENCH_TMPDIR") or None


@dataclass
class ChildResult:
    out: dict[str, Any]  # the JSON object the child printed last
    wall_s: float  # the whole process, start-up included
    peak_rss_mib: float
    cpu_s: float  # the child's own figure for its copy, else its whole life's (user + system)


def vm_hwm_mib(pid: int | str = "self") -> float:
    """The peak RSS of a process's own address space (``VmHWM``), 0 if unknown.

    Not ``ru_maxrss``: Linux carries a parent's peak over fork/vfork and exec into the child's
    ``ru_maxrss``, so every child of a 100 MiB benchmark process would report at least 100 MiB.
    ``VmHWM`` belongs to the address space, which exec replaces.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_child(argv: list[str], env: dict[str, str]) -> ChildResult:
    """Run ``argv`` to completion; its last stdout line, if JSON, becomes ``out``.

    Peak RSS: the child's own ``peak_rss_mib`` if it reports one (ours read their ``VmHWM`` as
    they finish), else the last ``VmHWM`` seen by polling every 5 ms while it runs.
    """
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    polled = [0.0]
    cpu = [0.0]

    def poll() -> None:
        while proc.poll() is None:
            polled[0] = max(polled[0], vm_hwm_mib(proc.pid))
            cpu[0] = max(cpu[0], cpu_seconds(proc.pid))
            time.sleep(0.005)

    watcher = threading.Thread(target=poll)
    watcher.start()
    output = proc.stdout.read().decode()
    proc.wait()
    wall = time.perf_counter() - started
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {argv[:4]} failed ({proc.returncode})")
    lines = output.strip().splitlines()
    out = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return ChildResult(
        out, wall, max(polled[0], out.get("peak_rss_mib", 0.0)), out.get("cpu_s", cpu[0])
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process so far (its last 5 ms may be missed), 0 if
    it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: The command line prefix of ``bench._children``.
CHILD = [sys.executable, "-m", "bench._children"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=1, trust_env=False)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up") from None
            time.sleep(0.05)


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="receiver-bench-", dir=WORKDIR) as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def server_process(
    argv: list[str], env: dict[str, str], port: int
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server process until the block ends; stop it as Ctrl-C would."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown (the lifespan stops parts)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class S3:
    """An S3 server (a child process: moto or SeaweedFS) and the environment that points boto3
    at it."""

    endpoint: str
    env: dict[str, str]
    pid: int
    name: str = "moto"  # "moto" | "seaweedfs"

    def cpu_seconds(self) -> float:
        """CPU time the server has used so far (Linux; 0 elsewhere): where its time goes."""
        return cpu_seconds(self.pid)

    def client(self) -> Any:
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )

    def bucket(self, *, versioned: bool = False) -> str:
        name = f"bench-{uuid.uuid4().hex[:12]}"
        client = self.client()
        client.create_bucket(Bucket=name)
        if versioned:
            client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name

    def empty(self, bucket: str) -> None:
        """Delete every object (and version): the server keeps them all, in memory or on disk."""
        client = self.client()
        for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
            for item in page.get("Versions", []) + page.get("DeleteMarkers", []):
                client.delete_object(Bucket=bucket, Key=item["Key"], VersionId=item["VersionId"])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=item["Key"])


def _aws_env(endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
        AWS_CONFIG_FILE="/nonexistent/aws-config",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent/aws-credentials",
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


#: The S3 servers the archive benchmarks run against (``BENCH_S3``, comma-separated).
S3_SERVERS = ("seaweedfs", "moto")


def s3_servers() -> list[str]:
    names = [n for n in os.environ.get("BENCH_S3", ",".join(S3_SERVERS)).split(",") if n]
    unknown = set(names) - set(S3_SERVERS)
    if unknown:
        raise SystemExit(f"BENCH_S3: unknown server(s) {sorted(unknown)}; known: {S3_SERVERS}")
    return names


#: SeaweedFS's volume size for the benchmarks. The tests' 32 MB (so that they can make hundreds
#: of buckets) made a 1 GiB upload grow a new volume every 32 MB, stalls that hit either side of
#: a round; a production server's volumes are 30 GB by default. 1 GiB holds the largest object.
BENCH_VOLUME_MB = 1024


@contextlib.contextmanager
def s3_server(name: str) -> Iterator[S3]:
    """Start the named S3 server (``moto`` or ``seaweedfs``) for one benchmark."""
    if name == "moto":
        with moto_s3() as s3:
            yield s3
        return
    from tests.s3server import seaweedfs_server  # the tests' fixture, as a context manager

    with (
        tempfile.TemporaryDirectory(prefix="receiver-bench-weed-", dir=WORKDIR) as data,
        seaweedfs_server(Path(data), ("bench", "bench"), volume_size_mb=BENCH_VOLUME_MB) as (
            endpoint,
            child,
        ),
    ):
        yield S3(endpoint, _aws_env(endpoint), child.pid, "seaweedfs")


@contextlib.contextmanager
def moto_s3() -> Iterator[S3]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(endpoint)
        yield S3(endpoint, _aws_env(endpoint), server.pid)
    finally:
        server.terminate()
        server.wait(timeout=10)


def write_random_file(path: Path, size: int) -> None:
    block = os.urandom(MiB)
    with path.open("wb") as out:
        for offset in range(0, size, MiB):
            # Vary each block so no layer can deduplicate or compress it away.
            out.write(offset.to_bytes(8, "big") + block[8 : min(MiB, size - offset)])


class _FileHandler(BaseHTTPRequestHandler):
    server: _FileHttpServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """No per-request stderr line."""

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def do_GET(self) -> None:
        path = self.server.root / self.path.split("?", 1)[0].lstrip("/")
        try:
            source = path.open("rb")
        except OSError:
            self.send_error(404)
            return
        with source:
            stat = os.fstat(source.fileno())
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(stat.st_size))
            self.send_header("ETag", f'"{stat.st_ino}-{stat.st_mtime_ns}"')
            self.end_headers()
            self.connection.sendfile(source)


class _FileHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    root: Path
    lock: threading.Lock
    connections: int  # accepted so far: shows whether clients reuse kept-alive connections


@contextlib.contextmanager
def file_source(root: Path) -> Iterator[str]:
    """Serve the files under ``root`` over HTTP on 127.0.0.1 with ``sendfile``; yield the base URL.

    The provider's storage stand-in for the archive benchmarks. The baselines read the same
    files from disk, so the source must cost about as little as a disk read: the kernel copies
    the bytes (sendfile), Python only writes the headers.
    """
    with file_server(root) as httpd:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"


@contextlib.contextmanager
def file_server(root: Path) -> Iterator[_FileHttpServer]:
    """``file_source``'s server itself, for its ``connections`` count."""
    httpd = _FileHttpServer(("127.0.0.1", 0), _FileHandler)
    httpd.root = root
    httpd.lock = threading.Lock()
    httpd.connections = 0
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        thread.join()
        httpd.server_close()


def machine() -> str:
    """One line about where the numbers were measured."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB RAM"
    disk = tempfile.gettempdir() if WORKDIR is None else WORKDIR
    fs = ""
    if shutil.which("findmnt"):
        found = subprocess.run(
            ["findmnt", "-no", "FSTYPE", "--target", disk], capture_output=True, text=True
        )
        fs = f", work dir {disk} on {found.stdout.strip() or '?'}"
    return (
        f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores{memory}{fs}; "
        f"Python {platform.python_version()}"
    )
