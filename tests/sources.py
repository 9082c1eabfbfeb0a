"""A real, misbehaving HTTP source server for tests and benchmarks.

It stands in for provider storage (R2, S3, GCS, CDNs): a stdlib socket server on 127.0.0.1 that
serves generated files of any size without holding them in memory, and misbehaves on request:
dropped connections, stalls, trickles, 429/503 with Retry-After, expired-link errors in each
provider's dialect, lying Content-Length, redirects, an ETag that changes, a Range it ignores.
Every request is recorded so tests can assert what the client sent (Range, If-Match, Host).

File content is a function of (seed, offset) -- SHAKE-128 per 64 KiB block -- so a 1 GiB file
costs nothing to register and ``expected_sha256`` / ``content`` reproduce it (the generator is
``receiver.simulator``'s, so the demo and the benchmarks serve the same bytes).

Usage::

    from tests.sources import source_server  # noqa: F401  (the pytest fixture)

    def test_x(source_server: SourceServer) -> None:
        source_server.add("/a.mp4", size=10_000_000, drop_after=1_000_000)
        url = source_server.url("/a.mp4")
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import re
import socket
import ssl
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from receiver.simulator import BLOCK, content_sha256, iter_content

R2_EXPIRED_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ExpiredRequest</Code>'
    b"<Message>Request has expired</Message></Error>"
)
S3_EXPIRED_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Request has expired</Message><X-Amz-Expires>3600</X-Amz-Expires>"
    b"<Expires>2025-01-01T00:00:00Z</Expires><RequestId>1</RequestId></Error>"
)
GCS_EXPIRED_XML = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ExpiredToken</Code>"
    b"<Message>The provided token has expired.</Message>"
    b"<Details>Request signature expired at: 2025-01-01T00:00:00+00:00</Details></Error>"
)
GCS_EXPIRED_JSON = (
    b'{"error": {"code": 400, "message": "The provided token has expired.",'
    b' "errors": [{"reason": "ExpiredToken", "message": "The provided token has expired."}]}}'
)


def content(seed: str, size: int) -> bytes:
    """The whole generated file (for small files)."""
    return b"".join(iter_content(seed, 0, size))


# The generator is the simulator's (shipped in the package), so tests, benchmarks and the demo
# all serve the same bytes; these names are what the tests have always used.
expected_sha256 = content_sha256


@dataclass
class SourceFile:
    """How one path behaves. Faults apply to the first ``fault_times`` requests of the path."""

    size: int = 0
    seed: str = ""
    content_type: str = "application/octet-stream"
    etag: bool = True
    ranges: bool = True
    content_length: bool = True  # False: no Content-Length, the body ends when the socket closes
    wrong_content_length: int = 0  # announce this many bytes more than are sent, then close
    drop_after: int | None = None  # close the connection after this many body bytes
    stall_after: int | None = None  # stop sending after this many body bytes, hold the socket
    fault_times: int = 1
    trickle: float = 0.0  # seconds to sleep between chunks
    chunk_size: int = BLOCK
    latency: float = 0.0  # seconds before the status line
    fail_times: int = 0  # answer fail_status to the first fail_times requests
    fail_status: int = 503
    retry_after: str | None = None
    status: int | None = None  # always answer this status with error_body
    error_body: bytes = b""
    error_content_type: str = "application/xml"
    redirect_to: str | None = None
    redirect_status: int = 302
    etag_changes: bool = False  # a new ETag on every request (the object is being replaced)
    ignore_range: bool = False  # advertise ranges but answer 200 with the whole body
    data: bytes | None = None  # serve these bytes (a real image or video) instead of generated ones
    # Connection reuse: close the connection, unannounced, after answering (an idle kept-alive
    # connection the server dropped), or hang up without answering a request that arrives on a
    # connection that already served one (the server closed it just as the request went out).
    close_after: bool = False
    hangup_on_reuse: bool = False
    requests: int = field(default=0, init=False)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    connection: int = 0  # which accepted connection carried it (1, 2, ...)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Silence the per-request stderr line."""

    def setup(self) -> None:
        super().setup()
        self.connection_id = self.server.owner._accepted(self.request)
        self.served = 0  # requests answered on this connection before the current one

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        owner = self.server.owner
        reused = self.served > 0
        self.served += 1
        spec, attempt = owner._record(
            RecordedRequest(
                self.command,
                self.path,
                {k.lower(): v for k, v in self.headers.items()},
                self.connection_id,
            ),
            path,
        )
        if spec is not None and spec.hangup_on_reuse and reused:
            self._hang_up()
            return
        if spec is None:
            self._simple(404, b"<Error><Code>NoSuchKey</Code></Error>", "application/xml")
            return
        if spec.latency and owner._stopping.wait(spec.latency):
            return
        if spec.redirect_to is not None:
            self._simple(spec.redirect_status, b"", "text/plain", {"Location": spec.redirect_to})
            return
        if attempt <= spec.fail_times:
            extra = {"Retry-After": spec.retry_after} if spec.retry_after is not None else {}
            self._simple(spec.fail_status, b"slow down", "text/plain", extra)
            return
        if spec.status is not None:
            self._simple(spec.status, spec.error_body, spec.error_content_type)
            return
        self._send_file(spec, attempt, body=body)
        if spec.close_after:
            self.wfile.flush()
            self._hang_up()

    def _hang_up(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _simple(
        self, status: int, payload: bytes, content_type: str, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _send_file(self, spec: SourceFile, attempt: int, *, body: bool) -> None:
        etag = f'"{spec.seed}-{spec.size}' + (f"-{attempt}" if spec.etag_changes else "") + '"'
        start, end, status = 0, spec.size, 200
        requested = self.headers.get("Range")
        if spec.ranges and requested and not spec.ignore_range:
            if_match = self.headers.get("If-Match")
            if spec.etag and if_match is not None and if_match != etag:
                self._simple(412, b"<Error><Code>PreconditionFailed</Code></Error>", "text/xml")
                return
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", requested.strip())
            if match is None or int(match.group(1)) >= spec.size:
                self._simple(416, b"", "text/plain", {"Content-Range": f"bytes */{spec.size}"})
                return
            start = int(match.group(1))
            end = min(int(match.group(2)) + 1, spec.size) if match.group(2) else spec.size
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", spec.content_type)
        if spec.content_length:
            self.send_header("Content-Length", str(end - start + spec.wrong_content_length))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        if spec.etag:
            self.send_header("ETag", etag)
        if spec.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{spec.size}")
        self.end_headers()
        if body:
            self._write_body(spec, attempt, start, end)

    def _write_body(self, spec: SourceFile, attempt: int, start: int, end: int) -> None:
        faulty = attempt <= spec.fault_times
        limit = end - start
        if faulty and spec.drop_after is not None:
            limit = min(limit, spec.drop_after)
        if faulty and spec.stall_after is not None:
            limit = min(limit, spec.stall_after)
        sent = 0
        stopping = self.server.owner._stopping
        chunks = (
            iter_content(spec.seed, start, start + limit)
            if spec.data is None
            else [spec.data[start : start + limit]]
        )
        for chunk in chunks:
            for offset in range(0, len(chunk), spec.chunk_size):
                piece = chunk[offset : offset + spec.chunk_size]
                self.wfile.write(piece)
                sent += len(piece)
                if spec.trickle and stopping.wait(spec.trickle):
                    return
        if faulty and spec.stall_after is not None and sent == spec.stall_after:
            stopping.wait()  # hold the socket open, sending nothing, until the server stops
        truncated = sent < end - start or spec.wrong_content_length
        if truncated:
            # End the body early: the client sees EOF before Content-Length is reached.
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: SourceServer
    tls: ssl.SSLContext | None = None

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        if self.tls is not None:
            # The handshake runs in the handler's thread, on its first read.
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-body is what half of these tests are about: not worth a trace.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class SourceServer:
    """A local HTTP source; register files with ``add`` and point clients at ``url(path)``."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, tls: ssl.SSLContext | None = None
    ) -> None:
        self._files: dict[str, SourceFile] = {}
        self._requests: dict[str, list[RecordedRequest]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections = 0
        # The TLS server name each connection asked for (SNI), by connection number.
        self.server_names: dict[int, str | None] = {}
        self._httpd = _Server((host, port), _Handler)
        self._httpd.owner = self
        self._httpd.tls = tls
        self.scheme = "https" if tls is not None else "http"
        self.host = host
        self.port: int = self._httpd.server_address[1]
        # A short poll interval keeps stop() (and so every test's teardown) fast.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()  # releases stalled and sleeping handlers
        if self._thread.is_alive():
            self._httpd.shutdown()  # waits for serve_forever, so only once it runs
            self._thread.join(timeout=5)
        self._httpd.server_close()

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{path}"

    def add(self, path: str, size: int = 0, *, seed: str | None = None, **behaviour: Any) -> str:
        """Register ``path`` (see SourceFile for behaviours); return its URL.

        The content is generated from ``seed`` (default: the path); check it with
        ``expected_sha256(seed, size)``.
        """
        if behaviour.get("data") is not None:
            size = len(behaviour["data"])
        spec = SourceFile(size=size, seed=path if seed is None else seed, **behaviour)
        with self._lock:
            self._files[path] = spec
            self._requests.setdefault(path, [])
        return self.url(path)

    def requests(self, path: str) -> list[RecordedRequest]:
        """Requests received for ``path`` so far (query strings ignored), oldest first."""
        with self._lock:
            return list(self._requests.get(path, []))

    @property
    def connections(self) -> int:
        """How many connections the server has accepted so far."""
        with self._lock:
            return self._connections

    def _accepted(self, sock: Any) -> int:
        name: str | None = None
        if isinstance(sock, ssl.SSLSocket):
            with contextlib.suppress(OSError, ssl.SSLError):
                sock.do_handshake()
            name = getattr(sock, "sni", None)
        with self._lock:
            self._connections += 1
            self.server_names[self._connections] = name
            return self._connections

    def _record(self, request: RecordedRequest, path: str) -> tuple[SourceFile | None, int]:
        with self._lock:
            self._requests.setdefault(path, []).append(request)
            spec = self._files.get(path)
            if spec is None:
                return None, 0
            spec.requests += 1
            return spec, spec.requests


def tls_contexts(*names: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) TLS contexts: a throwaway CA, and a certificate for ``names`` from it.

    The server context records each connection's SNI name on the socket (``sock.sni``).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "receiver test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    alt_names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert_pem = leaf.public_bytes(pem)
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # load_cert_chain takes files only.
    with tempfile.TemporaryDirectory() as tmp:
        cert_file, key_file = f"{tmp}/cert.pem", f"{tmp}/key.pem"
        with open(cert_file, "wb") as out:
            out.write(cert_pem)
        with open(key_file, "wb") as out:
            out.write(key_pem)
        server.load_cert_chain(cert_file, key_file)

    def remember_sni(sock: ssl.SSLSocket, name: str | None, _: ssl.SSLContext) -> None:
        sock.sni = name  # type: ignore[attr-defined]

    server.sni_callback = remember_sni
    client = ssl.create_default_context(cadata=ca.public_bytes(pem).decode())
    return server, client


@pytest.fixture
def source_server() -> Iterator[SourceServer]:
    """A started SourceServer, stopped after the test."""
    server = SourceServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


__all__ = [
    "GCS_EXPIRED_JSON",
    "GCS_EXPIRED_XML",
    "R2_EXPIRED_XML",
    "S3_EXPIRED_XML",
    "RecordedRequest",
    "SourceFile",
    "SourceServer",
    "content",
    "expected_sha256",
    "iter_content",
    "source_server",
    "tls_contexts",
]
