"""A fake instance of every provider on localhost: for tests, benchmarks and the demo.

One Starlette app serves, under a prefix per provider, each documented status API:

- Apex `GET /apex/api/jobs?id=` (Bearer; 20 reads per 10 s with `X-RateLimit-*`, 429 beyond),
- Fliki `GET /fliki/v1/generate/status?fileId=` (Bearer),
- FLORA `GET /flora/api/v1/techniques/{slug}/runs/{runId}` (Bearer; several outputs per run),
- Vivid Flow `GET /vividflow/api/v1/status/{job_id}` (`X-API-Key`),

so `RECEIVER_{P}_BASE_URL=http://127.0.0.1:PORT/{p}` (Vivid Flow: `.../vividflow/api/v1`). Media
are generated on the fly from a seed (SHAKE-128 blocks, the same generator as the tests' source
server, so any size costs nothing) and served at signed-URL-style links (`X-Amz-*`, Vivid Flow
`X-Goog-*`) with Range, ETag and If-Match; an expired or tampered link answers like the real
store (R2 403 `ExpiredRequest`, GCS 400 `ExpiredToken`). Apex and Fliki jobs are announced to a
receiver by Standard Webhooks-signed callbacks, retried on Apex's documented schedule (10 s,
60 s, 300 s) divided by `retry_scale`. Fault knobs (`Faults`): latency, 429s, 5xx, dropped
downloads, expired links, lost webhooks. `POST /_sim/jobs` adds jobs over HTTP (`receiver
simulate`); `GET /_sim/jobs` shows them with their webhook attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from receiver.ingest.auth import sign

BLOCK = 64 * 1024
PROVIDERS = ("apex", "fliki", "flora", "vividflow")
APEX_RETRY_SCHEDULE = (10.0, 60.0, 300.0)  # "Retries use exponential backoff: 10s, 60s, 300s"
APEX_READ_LIMIT = (20, 10.0)  # "Read endpoints ... 20 requests / 10 seconds"

R2_EXPIRED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ExpiredRequest</Code>'
    b"<Message>Request has expired</Message></Error>"
)
GCS_EXPIRED = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ExpiredToken</Code>"
    b"<Message>The provided token has expired.</Message></Error>"
)
ACCESS_DENIED = b"<Error><Code>AccessDenied</Code><Message>Invalid signature</Message></Error>"


def iter_content(seed: str, start: int, end: int) -> Iterator[bytes]:
    """Bytes `[start, end)` of the file generated from `seed` (same as `tests.sources`)."""
    position = start
    while position < end:
        index, skip = divmod(position, BLOCK)
        block = hashlib.shake_128(f"{seed}:{index}".encode()).digest(BLOCK)
        chunk = block[skip : skip + end - position]
        position += len(chunk)
        yield chunk


def content_sha256(seed: str, size: int) -> str:
    digest = hashlib.sha256()
    for chunk in iter_content(seed, 0, size):
        digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Faults:
    """Misbehaviour on request; counters are per simulator (every Nth call, N >= 1)."""

    latency: float = 0.0  # seconds before every status answer and download
    status_429_every: int = 0  # every Nth status call answers 429 with Retry-After
    retry_after: int = 1
    status_5xx_every: int = 0  # every Nth status call answers 503
    drop_every: int = 0  # every Nth download is cut off halfway (the client must resume)
    expired_links: bool = False  # links are issued already expired


@dataclass
class SimOutput:
    name: str
    size: int
    content_type: str
    seed: str
    url: str = ""


@dataclass
class SimJob:
    provider: str
    job_id: str
    outputs: list[SimOutput]
    ready_at: float  # unix time the provider finishes
    technique: str | None = None
    fail: str | None = None  # finish as failed with this error
    webhook: bool = True  # Apex/Fliki: announce the result (False: the webhook is lost)
    created_at: float = 0.0
    status_calls: int = 0
    webhook_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    webhook_attempts: list[dict[str, Any]] = field(default_factory=list)
    webhook_done: bool = False

    def finished(self, now: float) -> bool:
        return now >= self.ready_at


class Simulator:
    def __init__(
        self,
        *,
        api_keys: dict[str, str] | None = None,
        webhook_secrets: dict[str, str] | None = None,
        receiver_url: str | None = None,
        retry_scale: float = 1.0,
        link_ttl: int = 3600,
        faults: Faults | None = None,
        clock: Callable[[], float] = time.time,
        port: int = 0,
    ) -> None:
        self.api_keys = api_keys or {p: f"sim-{p}-{secrets.token_hex(8)}" for p in PROVIDERS}
        self.webhook_secrets = webhook_secrets or {}
        self.receiver_url = receiver_url
        self.retry_scale = retry_scale
        self.link_ttl = link_ttl
        self.faults = faults or Faults()
        self.clock = clock
        self.jobs: dict[tuple[str, str], SimJob] = {}
        self.media: dict[str, SimOutput] = {}
        self._signing_key = secrets.token_bytes(32)
        self._status_calls = 0
        self._downloads = 0
        self._apex_window: tuple[float, int] = (0.0, 0)
        self._lock = threading.Lock()
        self._server: ServerThread | None = None
        self.port = port  # 0: any free port, known after `bind`

    # -- jobs -----------------------------------------------------------------------------

    def add_job(
        self,
        provider: str,
        job_id: str | None = None,
        *,
        outputs: list[tuple[int, str]] | None = None,
        after: float = 0.5,
        technique: str | None = None,
        fail: str | None = None,
        webhook: bool = True,
    ) -> SimJob:
        """A job finishing `after` seconds from now with `outputs` [(size, content type)]."""
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}; known: {PROVIDERS}")
        job_id = job_id or str(uuid.uuid4())
        if provider == "flora":
            technique = technique or "character-lock"
        now = self.clock()
        extension = {"image/png": ".png", "video/mp4": ".mp4", "audio/wav": ".wav"}
        made = [
            SimOutput(
                name=f"output-{n}{extension.get(ctype, '.bin')}",
                size=size,
                content_type=ctype,
                seed=f"{provider}:{job_id}:{n}",
            )
            for n, (size, ctype) in enumerate(outputs or [(100_000, _default_type(provider))])
        ]
        job = SimJob(
            provider,
            job_id,
            made,
            ready_at=now + after,
            technique=technique,
            fail=fail,
            webhook=webhook and provider in ("apex", "fliki"),
            created_at=now,
        )
        with self._lock:
            self.jobs[(provider, job_id)] = job
            for output in made:
                media_id = hashlib.sha256(output.seed.encode()).hexdigest()[:24]
                self.media[media_id] = output
                output.url = self._signed_url(provider, f"/media/{media_id}/{output.name}", now)
        return job

    def base_url(self, provider: str) -> str:
        suffix = "/vividflow/api/v1" if provider == "vividflow" else f"/{provider}"
        return f"http://127.0.0.1:{self.port}{suffix}"

    def _signed_url(self, provider: str, path: str, issued: float) -> str:
        if self.faults.expired_links:
            issued -= self.link_ttl + 3600
        date = datetime.fromtimestamp(int(issued), tz=UTC).strftime("%Y%m%dT%H%M%SZ")
        prefix = "X-Goog-" if provider == "vividflow" else "X-Amz-"
        signature = self._signature(path, date, str(self.link_ttl))
        query = urlencode(
            {
                f"{prefix}Date": date,
                f"{prefix}Expires": str(self.link_ttl),
                f"{prefix}Signature": signature,
            }
        )
        return f"http://127.0.0.1:{self.port}{quote(path)}?{query}"

    def _signature(self, path: str, date: str, expires: str) -> str:
        message = f"{path}\n{date}\n{expires}".encode()
        return hmac.new(self._signing_key, message, hashlib.sha256).hexdigest()

    # -- serving ----------------------------------------------------------------------------

    def bind(self) -> int:
        """Reserve the port (so URLs can be built before `start`)."""
        if self._server is None:
            self._server = ServerThread(self.app(), port=self.port)
            self.port = self._server.port
        return self.port

    def start(self) -> None:
        self.bind()
        assert self._server is not None
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()

    def app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            sender = asyncio.create_task(self._send_webhooks())
            try:
                yield
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender

        return Starlette(
            routes=[
                Route("/media/{media_id}/{name}", self._media, methods=["GET", "HEAD"]),
                Route("/apex/api/jobs", self._apex_status),
                Route("/fliki/v1/generate/status", self._fliki_status),
                Route("/flora/api/v1/techniques/{slug}/runs/{run_id}", self._flora_status),
                Route("/vividflow/api/v1/status/{job_id}", self._vividflow_status),
                Route("/_sim/jobs", self._control, methods=["GET", "POST"]),
            ],
            lifespan=lifespan,
        )

    # -- status APIs ------------------------------------------------------------------------

    async def _before_status(self, request: Request, provider: str) -> Response | None:
        """Latency, authentication and injected faults, in that order."""
        if self.faults.latency:
            await asyncio.sleep(self.faults.latency)
        expected = self.api_keys.get(provider, "")
        if provider == "vividflow":
            offered = request.headers.get("x-api-key", "")
        else:
            scheme, _, offered = request.headers.get("authorization", "").partition(" ")
            offered = offered if scheme.lower() == "bearer" else ""
        if not offered or not hmac.compare_digest(offered.encode(), expected.encode()):
            return _error(provider, 401, "UNAUTHORIZED", "Missing or invalid API key")
        with self._lock:
            self._status_calls += 1
            n = self._status_calls
        if self.faults.status_429_every and n % self.faults.status_429_every == 0:
            response = _error(provider, 429, "RATE_LIMITED", "Too many requests")
            response.headers["Retry-After"] = str(self.faults.retry_after)
            return response
        if self.faults.status_5xx_every and n % self.faults.status_5xx_every == 0:
            return _error(provider, 503, "SERVICE_UNAVAILABLE", "Temporary outage")
        return None

    def _job(self, provider: str, job_id: str) -> SimJob | None:
        with self._lock:
            job = self.jobs.get((provider, job_id))
            if job is not None:
                job.status_calls += 1
            return job

    async def _apex_status(self, request: Request) -> Response:
        limit, window = APEX_READ_LIMIT
        now = self.clock()
        with self._lock:
            start, count = self._apex_window
            if now - start >= window:
                start, count = now, 0
            count += 1
            self._apex_window = (start, count)
        headers = {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(max(0, limit - count)),
            "X-RateLimit-Reset": str(int(start + window) + 1),
        }
        if count > limit:
            response = _error("apex", 429, "RATE_LIMITED", "Too many requests")
            response.headers.update({**headers, "Retry-After": str(int(start + window - now) + 1)})
            return response
        refused = await self._before_status(request, "apex")
        if refused is not None:
            refused.headers.update(headers)
            return refused
        job = self._job("apex", request.query_params.get("id", ""))
        if job is None:
            return _error("apex", 404, "NOT_FOUND", "Job not found")
        return JSONResponse({"data": self._apex_data(job, now)}, headers=headers)

    def _apex_data(self, job: SimJob, now: float) -> dict[str, Any]:
        output = job.outputs[0]
        data: dict[str, Any] = {
            "jobId": job.job_id,
            "type": "video" if output.content_type.startswith("video/") else "image",
            "status": "processing",
            "createdAt": _iso(job.created_at),
        }
        if not job.finished(now):
            return data
        if job.fail:
            return {
                **data,
                "status": "failed",
                "error": job.fail,
                "creditsRefunded": 10,
                "failedAt": _iso(job.ready_at),
            }
        return {
            **data,
            "status": "completed",
            "outputUrl": output.url,
            "outputType": output.content_type,
            "metadata": {"model": "sim-1", "bytes": output.size},
            "completedAt": _iso(job.ready_at),
        }

    async def _fliki_status(self, request: Request) -> Response:
        refused = await self._before_status(request, "fliki")
        if refused is not None:
            return refused
        job = self._job("fliki", request.query_params.get("fileId", ""))
        if job is None:
            return _error("fliki", 404, "NOT_FOUND", "File not found")
        return JSONResponse(self._fliki_data(job, self.clock()))

    def _fliki_data(self, job: SimJob, now: float) -> dict[str, Any]:
        if not job.finished(now):
            elapsed = (now - job.created_at) / max(job.ready_at - job.created_at, 1e-6)
            return {"fileId": job.job_id, "status": "processing", "progress": int(elapsed * 100)}
        if job.fail:
            return {"fileId": job.job_id, "status": "failed", "error": job.fail}
        return {
            "fileId": job.job_id,
            "status": "completed",
            "progress": 100,
            "download": job.outputs[0].url,
        }

    async def _flora_status(self, request: Request) -> Response:
        refused = await self._before_status(request, "flora")
        if refused is not None:
            return refused
        job = self._job("flora", request.path_params["run_id"])
        if job is None or job.technique != request.path_params["slug"]:
            return _error("flora", 404, "not_found", "Bad technique slug or run ID")
        now = self.clock()
        run: dict[str, Any] = {
            "runId": job.job_id,
            "status": "running",
            "progress": 50,
            "createdAt": int(job.created_at * 1000),
        }
        if job.finished(now) and job.fail:
            run.update(status="failed", errorCode="generation_failed", errorMessage=job.fail)
        elif job.finished(now):
            run.update(
                status="completed",
                progress=100,
                completedAt=int(job.ready_at * 1000),
                chargedCost=5,
                outputs=[
                    {"outputId": f"output_{n}", "type": _flora_type(o.content_type), "url": o.url}
                    for n, o in enumerate(job.outputs)
                ],
            )
        return JSONResponse(run)

    async def _vividflow_status(self, request: Request) -> Response:
        refused = await self._before_status(request, "vividflow")
        if refused is not None:
            return refused
        job = self._job("vividflow", request.path_params["job_id"])
        if job is None:
            return _error("vividflow", 404, "NOT_FOUND", "Job not found")
        body: dict[str, Any] = {"job_id": job.job_id, "status": "PROCESSING"}
        if job.finished(self.clock()):
            if job.fail:
                body.update(status="FAILED", error=job.fail)
            else:
                body.update(status="COMPLETED", video_url=job.outputs[0].url)
        return JSONResponse(body)

    # -- media ------------------------------------------------------------------------------

    async def _media(self, request: Request) -> Response:
        if self.faults.latency:
            await asyncio.sleep(self.faults.latency)
        output = self.media.get(request.path_params["media_id"])
        if output is None or output.name != request.path_params["name"]:
            return Response(b"<Error><Code>NoSuchKey</Code></Error>", 404, media_type="text/xml")
        gcs = "X-Goog-Date" in request.query_params
        prefix = "X-Goog-" if gcs else "X-Amz-"
        date = request.query_params.get(prefix + "Date", "")
        expires = request.query_params.get(prefix + "Expires", "")
        offered = request.query_params.get(prefix + "Signature", "")
        expected = self._signature(request.url.path, date, expires)
        if not hmac.compare_digest(offered.encode(), expected.encode()):
            return Response(ACCESS_DENIED, 403, media_type="application/xml")
        issued = datetime.strptime(date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
        if self.clock() > issued + int(expires):
            if gcs:
                return Response(GCS_EXPIRED, 400, media_type="application/xml")
            return Response(R2_EXPIRED, 403, media_type="application/xml")
        etag = f'"{hashlib.sha256(output.seed.encode()).hexdigest()[:16]}-{output.size}"'
        start, end, status = 0, output.size, 200
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        requested = request.headers.get("range")
        if requested:
            if_match = request.headers.get("if-match")
            if if_match is not None and if_match != etag:
                return Response(b"<Error><Code>PreconditionFailed</Code></Error>", 412)
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", requested.strip())
            if match is None or int(match.group(1)) >= output.size:
                return Response(b"", 416, headers={"Content-Range": f"bytes */{output.size}"})
            start = int(match.group(1))
            end = min(int(match.group(2)) + 1, output.size) if match.group(2) else output.size
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{output.size}"
        headers["Content-Length"] = str(end - start)
        if request.method == "HEAD":
            return Response(b"", status, headers=headers, media_type=output.content_type)
        with self._lock:
            self._downloads += 1
            drop = bool(self.faults.drop_every) and self._downloads % self.faults.drop_every == 0
        cut = start + (end - start) // 2 if drop else end

        async def body() -> AsyncIterator[bytes]:
            for chunk in iter_content(output.seed, start, cut):
                yield chunk
            if drop:
                # Abort mid-body: the server closes the connection short of Content-Length.
                raise ConnectionAbortedError("simulated dropped connection")

        return StreamingResponse(
            body(), status_code=status, headers=headers, media_type=output.content_type
        )

    # -- webhooks ---------------------------------------------------------------------------

    async def _send_webhooks(self) -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            while True:
                now = self.clock()
                for job in list(self.jobs.values()):
                    if self._webhook_due(job, now):
                        await self._deliver(http, job)
                await asyncio.sleep(0.02)

    def _webhook_due(self, job: SimJob, now: float) -> bool:
        if not job.webhook or job.webhook_done or not job.finished(now):
            return False
        if self.receiver_url is None or job.provider not in self.webhook_secrets:
            return False
        tried = len(job.webhook_attempts)
        if tried == 0:
            return True
        if tried > len(APEX_RETRY_SCHEDULE):
            return False  # "After all retries are exhausted, the webhook is marked as failed"
        delay = APEX_RETRY_SCHEDULE[tried - 1] / self.retry_scale
        return bool(now >= job.webhook_attempts[-1]["at"] + delay)

    async def _deliver(self, http: httpx.AsyncClient, job: SimJob) -> None:
        now = self.clock()
        if job.provider == "apex":
            data = self._apex_data(job, now)
            event = "job.failed" if job.fail else "job.completed"
            payload: dict[str, Any] = {"event": event, "timestamp": _iso(now), "data": data}
        else:
            payload = self._fliki_data(job, now)
        body = json.dumps(payload).encode()
        timestamp = int(time.time())  # the receiver checks it against its own wall clock
        headers = {
            "content-type": "application/json",
            "webhook-id": job.webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(
                self.webhook_secrets[job.provider], job.webhook_id, timestamp, body
            ),
        }
        url = f"{(self.receiver_url or '').rstrip('/')}/webhooks/{job.provider}"
        attempt: dict[str, Any] = {"at": now}
        try:
            response = await http.post(url, content=body, headers=headers)
            attempt["status"] = response.status_code
            job.webhook_done = response.is_success
        except httpx.HTTPError as exc:
            attempt["error"] = type(exc).__name__
        job.webhook_attempts.append(attempt)

    # -- control ----------------------------------------------------------------------------

    async def _control(self, request: Request) -> JSONResponse:
        if request.method == "POST":
            spec = await request.json()
            outputs = [
                (int(o.get("size", 100_000)), str(o.get("content_type", "video/mp4")))
                for o in spec.get("outputs", [])
            ]
            job = self.add_job(
                spec["provider"],
                spec.get("job_id"),
                outputs=outputs or None,
                after=float(spec.get("after", 0.5)),
                technique=spec.get("technique"),
                fail=spec.get("fail"),
                webhook=bool(spec.get("webhook", True)),
            )
            return JSONResponse(self.describe(job), status_code=201)
        return JSONResponse([self.describe(j) for j in list(self.jobs.values())])

    def describe(self, job: SimJob) -> dict[str, Any]:
        described = asdict(job)
        described["outputs"] = [
            {**asdict(o), "sha256": content_sha256(o.seed, o.size)} for o in job.outputs
        ]
        return described


def _default_type(provider: str) -> str:
    return "image/png" if provider == "flora" else "video/mp4"


def _flora_type(content_type: str) -> str:
    return "videoUrl" if content_type.startswith("video/") else "imageUrl"


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, tz=UTC).isoformat().replace("+00:00", "Z")


def _error(provider: str, status: int, code: str, message: str) -> JSONResponse:
    """Each provider's documented error shape."""
    if provider == "flora":
        return JSONResponse({"error": {"code": code.lower(), "message": message}}, status)
    if provider == "apex":
        return JSONResponse({"error": message, "code": code}, status)
    return JSONResponse({"error": message}, status)


class ServerThread:
    """An ASGI app served by uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any, port: int = 0) -> None:
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", port))
        self.port: int = self.socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        self.socket.close()
