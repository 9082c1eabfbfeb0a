"""The console's routes: every page checks the session; every POST checks CSRF and origin."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from receiver.audit.api import decode_cursor, encode_cursor, job_filter, job_json, summary_json
from receiver.audit.console import summary
from receiver.audit.console.media import asset_response, preview_kind
from receiver.audit.console.session import COOKIE, Session, Sessions, csrf_matches, same_site
from receiver.audit.console.throttle import SignInThrottle
from receiver.audit.events import event_json
from receiver.audit.operations import check_asset
from receiver.domain import Clock, JobState
from receiver.errors import InvalidPayload, NotFound
from receiver.ledger import FULL_READ, JobRecord, Ledger
from receiver.ledger.events import EventFilter
from receiver.metrics import Metrics
from receiver.polling.schedule import Tracker
from receiver.providers import REGISTRY
from receiver.store import Store
from receiver.workqueue import WorkQueue

HERE = Path(__file__).parent
PAGE_SIZE = 50
EVENTS_LIMIT = 100  # a job's events on its page (a handful in practice: one per state change)
FORM_TYPE = "application/x-www-form-urlencoded"
MAX_FORM_BYTES = 16 * 1024
# Pages load nothing from anywhere else; inline styles and scripts are refused too.
PAGE_CSP = (
    "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
    "media-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "content-security-policy": PAGE_CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}

Handler = Callable[[Request, Session], Awaitable[Response]]


@dataclass
class ConsoleParts:
    ledger: Ledger
    store: Store
    queue: WorkQueue
    metrics: Metrics
    clock: Clock
    api_token: str | None  # None: the console only says how to enable it
    tracker: Tracker | None = None
    poll_problem: Callable[[str], str | None] = lambda provider: None
    on_requeued: Callable[[], None] = lambda: None  # wake the archive workers
    on_replayed: Callable[[], None] = lambda: None  # wake the onward sender
    payload_retention_days: int | None = None  # what "payload removed after N days" says


def _when(value: str | datetime | None) -> str:
    if value is None:
        return "—"
    at = datetime.fromisoformat(value) if isinstance(value, str) else value
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    sign, left = ("-" if seconds < 0 else ""), abs(int(seconds))
    days, left = divmod(left, 86400)
    hours, left = divmod(left, 3600)
    minutes, secs = divmod(left, 60)
    if days:
        return f"{sign}{days} d {hours} h"
    if hours:
        return f"{sign}{hours} h {minutes} min"
    if minutes:
        return f"{sign}{minutes} min {secs} s"
    return f"{sign}{secs} s"


def _size(value: int | None) -> str:
    if value is None:
        return "—"
    amount = float(value)
    for unit in ("B", "KB", "MB", "GB"):
        if amount < 1000 or unit == "GB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1000
    return f"{amount:.1f} TB"  # pragma: no cover - the loop returns


def _templates() -> Jinja2Templates:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=_when, duration=_duration, size=_size)
    return Jinja2Templates(env=env)


class Console:
    def __init__(self, parts: ConsoleParts) -> None:
        self.parts = parts
        self.sessions = Sessions(parts.api_token, parts.clock) if parts.api_token else None
        self.throttle = SignInThrottle(parts.clock)
        self.templates = _templates()

    def routes(self) -> list[BaseRoute]:
        page = self._page
        return [
            Route("/console", page(self.overview), methods=["GET"]),
            Mount(
                "/console",
                routes=[
                    Route("/", page(self.overview), methods=["GET"]),
                    Route("/signin", self.signin_form, methods=["GET"]),
                    Route("/signin", self.signin, methods=["POST"]),
                    Route("/signout", page(self.signout, post=True), methods=["POST"]),
                    Route("/jobs", page(self.jobs), methods=["GET"]),
                    Route("/problems", page(self.problems), methods=["GET"]),
                    Route("/jobs/{provider}/{job_id}", page(self.job), methods=["GET"]),
                    Route(
                        "/jobs/{provider}/{job_id}/retry",
                        page(self.retry, post=True),
                        methods=["POST"],
                    ),
                    Route(
                        "/jobs/{provider}/{job_id}/events/{event_id}/resend",
                        page(self.resend, post=True),
                        methods=["POST"],
                    ),
                    Route(
                        "/jobs/{provider}/{job_id}/assets/{n:int}",
                        page(self.asset),
                        methods=["GET"],
                    ),
                    Route(
                        "/jobs/{provider}/{job_id}/assets/{n:int}/verify",
                        page(self.verify, post=True),
                        methods=["POST"],
                    ),
                    Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
                    # Anything else under /console: the same gate, then "not found".
                    Route("/{rest:path}", page(self.not_found), methods=["GET", "POST"]),
                ],
            ),
        ]

    # -- the gate ---------------------------------------------------------------------------

    def _page(self, handler: Handler, *, post: bool = False) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            if self.sessions is None:
                return self.render(request, "unconfigured.html", {}, status=503)
            session = self.sessions.read(request)
            if session is None:
                return self._signin_page(request, status=401)
            if post:
                form = await read_form(request)
                if not same_site(request) or not csrf_matches(session, form.get("csrf")):
                    return self.render(
                        request,
                        "message.html",
                        {
                            "title": "Request refused",
                            "text": "This request did not come from a console page "
                            "(cross-site request or missing form token). Nothing was changed.",
                        },
                        status=403,
                        session=session,
                    )
            try:
                return await handler(request, session)
            except NotFound as exc:
                return self.render(
                    request,
                    "message.html",
                    {"title": "Not found", "text": exc.message},
                    status=404,
                    session=session,
                )

        return endpoint

    def render(
        self,
        request: Request,
        name: str,
        context: dict[str, Any],
        *,
        status: int = 200,
        session: Session | None = None,
    ) -> Response:
        response = self.templates.TemplateResponse(
            request,
            name,
            {"session": session, "providers": sorted(REGISTRY), **context},
            status_code=status,
            headers=PAGE_HEADERS,
        )
        return response

    def _signin_page(self, request: Request, *, status: int, error: str | None = None) -> Response:
        """The sign-in page a signed-out visitor gets for any console URL. It holds nothing read
        from the ledger: only the path the visitor asked for, to return to after signing in
        (the same page whether or not that job exists)."""
        wanted = request.url.path if request.method == "GET" else "/console/"
        if request.url.query and request.method == "GET":
            wanted += "?" + request.url.query
        return self.render(
            request, "signin.html", {"next": _local(wanted), "error": error}, status=status
        )

    # -- sign-in ----------------------------------------------------------------------------

    async def signin_form(self, request: Request) -> Response:
        if self.sessions is None:
            return self.render(request, "unconfigured.html", {}, status=503)
        return self._signin_page(request, status=200)

    async def signin(self, request: Request) -> Response:
        if self.sessions is None:
            return self.render(request, "unconfigured.html", {}, status=503)
        form = await read_form(request)
        token, wanted = form.get("token"), form.get("next")
        if not same_site(request):
            return self.render(
                request,
                "message.html",
                {"title": "Request refused", "text": "Cross-site sign-in refused."},
                status=403,
            )
        wait = self.throttle.attempt(request.client.host if request.client else "unknown")
        if wait is not None:
            refused = self.render(
                request,
                "message.html",
                {
                    "title": "Too many sign-in attempts",
                    "text": f"Too many sign-in attempts. Try again in {wait:.0f} seconds.",
                },
                status=429,
            )
            refused.headers["retry-after"] = f"{wait:.0f}"
            return refused
        if token is None or not self.sessions.token_matches(token):
            # The first visit's page with the error said: no session, and a browser that had
            # one (another operator's, an old token's) loses it.
            response = self.render(
                request,
                "signin.html",
                {"next": _local(wanted), "error": "That is not the operator token."},
                status=401,
            )
            if request.cookies.get(COOKIE) is not None:
                self.sessions.end(request, response)
            return response
        response = RedirectResponse(_local(wanted), status_code=303)
        self.sessions.start(request, response)
        return response

    async def signout(self, request: Request, session: Session) -> Response:
        assert self.sessions is not None
        response = self.render(
            request, "signin.html", {"next": "/console/", "error": None, "signed_out": True}
        )
        self.sessions.end(request, response)
        return response

    # -- pages ------------------------------------------------------------------------------

    async def not_found(self, request: Request, session: Session) -> Response:
        raise NotFound(f"no console page at {request.url.path}")

    async def overview(self, request: Request, session: Session) -> Response:
        p = self.parts
        data = await summary.overview(
            p.ledger, p.queue, p.tracker, p.metrics, p.poll_problem, p.clock()
        )
        return self.render(
            request,
            "overview.html",
            {
                "o": data,
                "nav": "overview",
                "states": [s.value for s in JobState],
                "chart_height": summary.CHART_HEIGHT,
                "bar_width": summary.BAR_WIDTH,
                "chart_width": summary.CHART_DAYS * (summary.BAR_WIDTH + summary.BAR_GAP),
            },
            session=session,
        )

    async def jobs(self, request: Request, session: Session) -> Response:
        q = request.query_params
        chosen = {k: q.get(k, "").strip() for k in ("provider", "state", "type", "since", "until")}
        search = q.get("q", "").strip()
        context: dict[str, Any] = {
            "nav": "jobs",
            "chosen": chosen,
            "search": search,
            "states": [s.value for s in JobState],
            "rows": [],
            "next_url": None,
            "errors": [],
        }
        try:
            where = job_filter(
                chosen["provider"] or None,
                chosen["state"] or None,
                chosen["type"] or None,
                chosen["since"] or None,  # a datetime-local value: read as UTC
                chosen["until"] or None,
            )
            cursor = q.get("cursor")
            before = decode_cursor(cursor) if cursor else None
        except InvalidPayload as exc:
            context["errors"] = [f"{d['field']}: {d['problem']}" for d in exc.details or []]
            return self.render(request, "jobs.html", context, status=400, session=session)
        if search:
            # Exact job id: look it up under each provider the filter allows.
            names = [where.provider] if where.provider else sorted(REGISTRY)
            for name in names:
                job = await self.parts.ledger.job(name, search)
                if job is not None:
                    context["rows"].append(job_json(job))
            return self.render(request, "jobs.html", context, session=session)
        rows = await self.parts.ledger.list_jobs(where, before_seq=before, limit=PAGE_SIZE + 1)
        context["rows"] = [summary_json(j) for j in rows[:PAGE_SIZE]]
        if len(rows) > PAGE_SIZE:
            kept = {k: v for k, v in chosen.items() if v}
            kept["cursor"] = encode_cursor(rows[PAGE_SIZE - 1].seq)
            context["next_url"] = "/console/jobs?" + urlencode(kept)
        return self.render(request, "jobs.html", context, session=session)

    async def problems(self, request: Request, session: Session) -> Response:
        p = self.parts
        found = await summary.problems(p.ledger, p.tracker, p.clock())
        return self.render(
            request, "problems.html", {"nav": "problems", "p": found}, session=session
        )

    async def _job(self, request: Request) -> JobRecord:
        provider, job_id = request.path_params["provider"], request.path_params["job_id"]
        job = await self.parts.ledger.job(provider, job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} for provider {provider!r}")
        return job

    async def job(
        self, request: Request, session: Session, notice: dict[str, Any] | None = None
    ) -> Response:
        job = await self._job(request)
        tracker = self.parts.tracker
        tracked = await tracker.get(job.provider, job.job_id) if tracker else None
        body = job_json(job, tracked, payload_retention_days=self.parts.payload_retention_days)
        base = f"/console/jobs/{job.provider}/{job.job_id}"
        for asset in body["assets"]:
            asset["preview"] = (
                preview_kind(asset["content_type"]) if asset["state"] == "archived" else None
            )
            asset["href"] = f"{base}/assets/{asset['n']}"
        for delivery in body["deliveries"]:
            delivery["payload_text"] = json.dumps(delivery["payload"], indent=2, sort_keys=True)
        retryable = any(a.state in ("dead", "expired") for a in job.assets)
        return self.render(
            request,
            "job.html",
            {
                "nav": "jobs",
                "job": body,
                "base": base,
                "retryable": retryable,
                "notice": notice,
                "events": await self._events(job),
            },
            status=200 if notice is None or notice["ok"] else 409,
            session=session,
        )

    async def _events(self, job: JobRecord) -> list[dict[str, Any]]:
        """What receiver told the application about this job: each event with its sends and
        every attempt, oldest first (the order the application got them in)."""
        ledger = self.parts.ledger
        listed = await ledger.events(
            EventFilter(provider=job.provider, job_id=job.job_id), EVENTS_LIMIT
        )
        out = []
        for listed_event in reversed(listed):
            full = await ledger.event(listed_event.id)
            if full is not None:
                out.append(event_json(full))
        return out

    async def resend(self, request: Request, session: Session) -> Response:
        job = await self._job(request)
        event_id = request.path_params["event_id"]
        where = EventFilter(event_id=event_id, provider=job.provider, job_id=job.job_id)
        replayed = await self.parts.ledger.replay(where, None, self.parts.clock(), 1)
        if replayed:
            self.parts.on_replayed()
            notice = {
                "ok": True,
                "text": f"Event {event_id} queued to send again: same id, same body.",
            }
        else:
            notice = {
                "ok": False,
                "text": f"Nothing to resend: job {job.job_id!r} has no event {event_id!r}, "
                "or no endpoint takes its type.",
            }
        return await self.job(request, session, notice)

    async def asset(self, request: Request, session: Session) -> Response:
        job = await self._job(request)
        asset = next((a for a in job.assets if a.n == request.path_params["n"]), None)
        if asset is None or asset.state != "archived":
            raise NotFound(f"job {job.job_id!r} has no archived asset {request.path_params['n']}")
        if await self.parts.store.head(asset.key) is None:
            raise NotFound(f"asset {asset.n} is missing from the store ({asset.uri}): verify it")
        download = request.query_params.get("download") == "1"
        return asset_response(
            self.parts.store, asset, request.headers.get("range"), download=download
        )

    async def verify(self, request: Request, session: Session) -> Response:
        job = await self._job(request)
        n = request.path_params["n"]
        asset = next((a for a in job.assets if a.n == n), None)
        if asset is None or asset.state != "archived":
            notice = {"ok": False, "text": f"Asset {n} is not archived: nothing to verify."}
            return await self.job(request, session, notice)
        findings = await check_asset(self.parts.store, job.provider, job.job_id, asset)
        # A check from the console is a fixity check like the scheduled ones: recorded on the
        # asset (the audit shows it; a failure lists the asset on the Problems page).
        await self.parts.ledger.mark_verified(
            job.provider,
            job.job_id,
            asset.n,
            at=self.parts.clock(),
            by=FULL_READ,
            error="; ".join(f.problem for f in findings) or None,
        )
        if not findings:
            notice = {
                "ok": True,
                "text": f"Asset {n} verified: re-read {asset.size} bytes, SHA-256 "
                f"{asset.sha256} matches the ledger, the manifest and the object's own record.",
            }
        else:
            problems = "; ".join(
                f.problem + (f" (expected {f.expected}, found {f.actual})" if f.expected else "")
                for f in findings
            )
            notice = {"ok": False, "text": f"Asset {n} failed verification: {problems}"}
        return await self.job(request, session, notice)

    async def retry(self, request: Request, session: Session) -> Response:
        job = await self._job(request)
        count = await self.parts.ledger.requeue(job.provider, job.job_id, self.parts.clock())
        if count:
            self.parts.on_requeued()
            notice = {"ok": True, "text": f"{count} asset(s) queued again with fresh attempts."}
        else:
            notice = {"ok": False, "text": "Nothing to retry: no dead or expired asset."}
        return await self.job(request, session, notice)


async def read_form(request: Request) -> dict[str, str]:
    """A small urlencoded form (the console's forms carry a token or two), first values only."""
    if request.headers.get("content-type", "").split(";")[0].strip() != FORM_TYPE:
        return {}
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return {}
    fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=20)
    return {name: values[0] for name, values in fields.items()}


def _local(wanted: Any) -> str:
    """Where to go after sign-in: a console path only (no open redirect)."""
    if (
        isinstance(wanted, str)
        and (wanted == "/console" or wanted.startswith("/console/"))
        and not any(c in wanted for c in "\\\r\n")
    ):
        return wanted
    return "/console/"
