"""The console's view of onward delivery: a job's page lists its events, their sends and every
attempt, with a Resend button under the console's CSRF rules; the Problems page lists failing
endpoints and events whose retries ran out. Against a real local application endpoint."""

from __future__ import annotations

import json
import re

import pytest

from receiver.ledger.events import EventFilter
from tests.app_endpoint import AppEndpoint
from tests.conftest import APEX_SECRET, LOCAL_SOURCES, Harness, HarnessFactory, post_signed
from tests.payloads import apex_completed, apex_failed
from tests.sources import SourceServer
from tests.test_console import SAME_ORIGIN, archived_job, csrf_of, sign_in
from tests.test_onward import NEW

pytestmark = pytest.mark.anyio


@pytest.fixture
async def console(harness_factory: HarnessFactory, app_endpoint: AppEndpoint) -> Harness:
    h: Harness = await harness_factory(
        **LOCAL_SOURCES,
        max_attempts=1,
        onward_endpoints=json.dumps([{"name": "app", "url": app_endpoint.url(), "secrets": [NEW]}]),
        onward_retry_schedule="5,5",
    )
    assert (await sign_in(h)).status_code == 303
    return h


async def drain(h: Harness) -> None:
    assert h.parts.sender is not None
    await h.parts.sender.drain()


def event_ids(page: str) -> list[str]:
    return re.findall(r'<article class="event card" id="event-(evt_[0-9A-Z]+)"', page)


async def test_the_job_page_lists_its_events_and_every_attempt(
    console: Harness, app_endpoint: AppEndpoint, source_server: SourceServer
) -> None:
    h = console
    app_endpoint.answers = [(503, {}, 0.0)]  # the first try fails, the retry lands
    await archived_job(h, source_server, "j1")
    await drain(h)
    h.clock.advance(6)
    await drain(h)

    page = await h.client.get("/console/jobs/apex/j1")
    assert page.status_code == 200
    stored = await h.parts.ledger.events(EventFilter(provider="apex", job_id="j1"), 10)
    # Oldest first, as the application got them.
    assert event_ids(page.text) == [e.id for e in reversed(stored)]
    section = page.text[page.text.index('id="events-h"') : page.text.index('id="deliveries-h"')]
    assert "<code>asset.archived</code>" in section and "<code>job.archived</code>" in section
    assert section.count('<span class="state delivered">delivered</span>') == 2
    # The failed first try is on the page: its status and the first KB of the answer.
    assert "<td>503</td>" in section and "{&#34;ok&#34;: false}" in section
    assert "TOPSECRET" not in page.text


async def test_resend_posts_the_same_id_and_bytes_again(
    console: Harness, app_endpoint: AppEndpoint, source_server: SourceServer
) -> None:
    h = console
    await archived_job(h, source_server, "j2")
    await drain(h)
    page = await h.client.get("/console/jobs/apex/j2")
    first = event_ids(page.text)[0]
    before = [r for r in app_endpoint.received if r.event_id == first]
    assert len(before) == 1

    resent = await h.client.post(
        f"/console/jobs/apex/j2/events/{first}/resend",
        data={"csrf": csrf_of(page)},
        headers=SAME_ORIGIN,
    )
    assert resent.status_code == 200
    assert f"Event {first} queued to send again" in resent.text
    await drain(h)
    again = [r for r in app_endpoint.received if r.event_id == first]
    assert len(again) == 2 and again[0].body == again[1].body
    assert again[1].verify(NEW)["id"] == first


@pytest.mark.parametrize(
    ("form", "headers"),
    [
        ({"csrf": "forged"}, SAME_ORIGIN),  # no CSRF token of this session
        (None, {"sec-fetch-site": "cross-site"}),  # a real token, posted from another site
    ],
)
async def test_resend_without_the_console_csrf_rules_sends_nothing(
    console: Harness,
    app_endpoint: AppEndpoint,
    source_server: SourceServer,
    form: dict[str, str] | None,
    headers: dict[str, str],
) -> None:
    h = console
    await archived_job(h, source_server, "j3")
    await drain(h)
    page = await h.client.get("/console/jobs/apex/j3")
    first = event_ids(page.text)[0]
    refused = await h.client.post(
        f"/console/jobs/apex/j3/events/{first}/resend",
        data=form or {"csrf": csrf_of(page)},
        headers=headers,
    )
    assert refused.status_code == 403
    await drain(h)
    assert [r.event_id for r in app_endpoint.received].count(first) == 1


async def test_resend_of_another_jobs_event_is_refused(
    console: Harness, app_endpoint: AppEndpoint, source_server: SourceServer
) -> None:
    h = console
    await archived_job(h, source_server, "mine")
    await archived_job(h, source_server, "other")
    await drain(h)
    other = event_ids((await h.client.get("/console/jobs/apex/other")).text)[0]
    page = await h.client.get("/console/jobs/apex/mine")
    wrong = await h.client.post(
        f"/console/jobs/apex/mine/events/{other}/resend",
        data={"csrf": csrf_of(page)},
        headers=SAME_ORIGIN,
    )
    assert wrong.status_code == 409
    assert f"has no event &#39;{other}&#39;" in wrong.text
    await drain(h)
    assert [r.event_id for r in app_endpoint.received].count(other) == 1


async def test_problems_lists_failing_endpoints_and_exhausted_events(
    console: Harness, app_endpoint: AppEndpoint
) -> None:
    h = console
    app_endpoint.default = (503, {}, 0.0)
    for n in range(3):
        await post_signed(h, "apex", apex_failed(f"p{n}"), APEX_SECRET)
    for _ in range(3):  # the first try and two retries ("5,5"): then the series is exhausted
        await drain(h)
        h.clock.advance(6)
    page = await h.client.get("/console/problems")
    assert page.status_code == 200
    assert 'id="endpoints-h">Onward endpoints failing' in page.text
    row = re.search(r'<tr id="endpoint-app">(.*?)</tr>', page.text, re.S)
    assert row is not None and "<td>9</td>" in row.group(1)  # 3 events x 3 attempts, in a row
    exhausted = re.findall(r"job\.failed (evt_\w+) to app: retries exhausted after 3", page.text)
    assert len(exhausted) == 3

    # Back up: a replay delivers them and the page clears.
    app_endpoint.default = (204, {}, 0.0)
    await h.parts.ledger.replay(EventFilter(type="job.failed"), None, h.clock(), 10)
    await drain(h)
    cleared = await h.client.get("/console/problems")
    assert "Onward endpoints failing" not in cleared.text
    assert "retries exhausted" not in cleared.text


async def test_without_endpoints_the_events_show_and_offer_no_resend(
    harness_factory: HarnessFactory, source_server: SourceServer
) -> None:
    h: Harness = await harness_factory(**LOCAL_SOURCES)
    assert (await sign_in(h)).status_code == 303
    await archived_job(h, source_server, "quiet")
    page = await h.client.get("/console/jobs/apex/quiet")
    assert len(event_ids(page.text)) == 2
    assert page.text.count("No endpoint takes this event type.") == 2
    assert "Resend" not in page.text
    forced = await h.client.post(
        f"/console/jobs/apex/quiet/events/{event_ids(page.text)[0]}/resend",
        data={"csrf": csrf_of(page)},
        headers=SAME_ORIGIN,
    )
    assert forced.status_code == 409 and "no endpoint takes its type" in forced.text


async def test_a_job_with_no_events_yet_says_so(
    console: Harness, app_endpoint: AppEndpoint, source_server: SourceServer
) -> None:
    url = source_server.add("/o/later.png", 10, status=500, error_body=b"x")
    await post_signed(console, "apex", apex_completed("later", url=url), APEX_SECRET)
    page = await console.client.get("/console/jobs/apex/later")
    assert page.status_code == 200
    assert "No events yet" in page.text and event_ids(page.text) == []
