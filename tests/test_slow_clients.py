"""Slow clients against a real uvicorn server over real sockets: a body that trickles in is
answered 408 within the configured bound and its connection is closed, freeing the slot; idle
keep-alive connections are closed too."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from receiver.app import build_parts, create_app, uvicorn_options
from tests.conftest import make_settings
from tests.payloads import APEX_SECRET, apex_completed, signed

BODY_TIMEOUT = 1.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[int]:
    settings = make_settings(tmp_path, body_timeout_seconds=BODY_TIMEOUT, keep_alive_seconds=1)
    parts = build_parts(settings)
    app = create_app(parts)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", **uvicorn_options(settings)
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


def trickler(port: int, path: str = "/webhooks/apex") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: receiver\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n{".encode()
    )
    return sock


def test_a_trickling_body_gets_408_and_its_connection_is_closed(server: int) -> None:
    socks = [trickler(server) for _ in range(30)]
    socks.append(trickler(server, "/jobs"))
    started = time.monotonic()
    answers: list[bytes] = [b""] * len(socks)
    closed = [False] * len(socks)
    for s in socks:
        s.settimeout(0.05)
    while not all(closed) and time.monotonic() - started < BODY_TIMEOUT + 5:
        for i, s in enumerate(socks):
            if closed[i]:
                continue
            with contextlib.suppress(OSError):
                s.sendall(b" ")  # one byte at a time, never the whole body
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                closed[i] = True
                continue
            if chunk == b"":
                closed[i] = True
            answers[i] += chunk
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    for s in socks:
        s.close()
    still_open = {i: answers[i][:120] for i, done in enumerate(closed) if not done}
    assert not still_open, f"trickling connections left open (index: what they got): {still_open}"
    assert elapsed < BODY_TIMEOUT + 5
    for answer in answers[:-1]:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"request_timeout"' in answer
    # POST /jobs: the operator token is checked before the body is read (401), or the body
    # times out (408); either way the connection does not stay open.
    assert answers[-1].startswith((b"HTTP/1.1 401", b"HTTP/1.1 408")), answers[-1][:200]

    # The slots are free: an ordinary webhook is answered at once.
    body, headers = signed(apex_completed("after-slow"), APEX_SECRET)
    response = httpx.post(
        f"http://127.0.0.1:{server}/webhooks/apex", content=body, headers=headers, timeout=5
    )
    assert response.status_code == 202, response.text


def test_idle_keep_alive_connections_are_closed(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: receiver\r\n\r\n")
        sock.settimeout(5)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        rest = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        assert time.monotonic() - started < 4  # closed by the server after ~1 s idle
    assert json.loads(first.split(b"\r\n\r\n", 1)[1] or b"{}") in ({"status": "ok"}, {})
