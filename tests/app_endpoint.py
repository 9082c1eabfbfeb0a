"""A team's application for the onward tests: a real local HTTP server that receives receiver's
events, keeps every request, and misbehaves on demand (error answers, Retry-After, redirects,
slow answers, or not listening at all), on the same port across outages."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() when it arrived

    @property
    def event_id(self) -> str:
        return self.headers["webhook-id"]

    def payload(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value

    def verify(self, secret: str) -> dict[str, Any]:
        """What the application does: the official `standardwebhooks` verifier (raises if the
        signature, id or timestamp does not hold)."""
        value: dict[str, Any] = Webhook(secret).verify(self.body, self.headers)
        return value


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        if len(body) < length:
            # The sender was killed mid-request (the crash tests): like any HTTP server, the
            # application never got this request, so it neither records nor answers it.
            self.close_connection = True
            return
        status, headers, delay = owner.next_answer()
        if delay:
            time.sleep(delay)
        with owner.lock:
            owner.received.append(
                Received(
                    self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time()
                )
            )
        reply = json.dumps({"ok": 200 <= status < 300}).encode()
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the sender was killed mid-answer (the crash tests): it was received


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: AppEndpoint


class AppEndpoint:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.answers: list[tuple[int, dict[str, str], float]] = []  # then `default`
        self.default: tuple[int, dict[str, str], float] = (204, {}, 0.0)
        self.port = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def url(self, path: str = "/hooks/receiver") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def next_answer(self) -> tuple[int, dict[str, str], float]:
        with self.lock:
            return self.answers.pop(0) if self.answers else self.default

    def up(self) -> None:
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.owner = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def down(self) -> None:
        """Stop listening: connections are refused until `up` (same port)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def ids(self) -> list[str]:
        with self.lock:
            return [r.event_id for r in self.received]

    def by_type(self) -> dict[str, list[Received]]:
        found: dict[str, list[Received]] = {}
        with self.lock:
            for r in self.received:
                found.setdefault(r.payload()["type"], []).append(r)
        return found


@pytest.fixture
def app_endpoint() -> Iterator[AppEndpoint]:
    """A listening AppEndpoint, stopped after the test."""
    endpoint = AppEndpoint()
    endpoint.up()
    try:
        yield endpoint
    finally:
        endpoint.down()
