"""What a signed-out visitor may learn from the console, and how fast anyone may guess the token.

A signed-out visitor of any console URL gets the sign-in page. It may echo the path the visitor
typed (the return path, a hidden field), since the visitor already knows it; it shows nothing
read from the ledger: no state, asset, hash, key, size, delivery or error, not even whether the
job exists (the page for a real job is byte for byte the page for an unknown id). A wrong token
answers the first visit's page with the error said, and leaves no session cookie behind. Sign-in
attempts are limited per client address and overall, with a clear 429 page.
"""

from __future__ import annotations

from typing import Any

import pytest

from receiver.audit.console.session import COOKIE
from receiver.audit.console.throttle import OVERALL, PER_ADDRESS, WINDOW_SECONDS
from tests.conftest import LOCAL_SOURCES, Harness
from tests.sources import SourceServer
from tests.test_console import SAME_ORIGIN, TOKEN, archived_job, dead_job, sign_in

pytestmark = pytest.mark.anyio


@pytest.fixture
async def console(harness_factory: Any) -> Harness:
    harness: Harness = await harness_factory(**LOCAL_SOURCES, max_attempts=1)
    return harness


def ledger_facts(page: str, job: dict[str, Any]) -> list[str]:
    """Every value from the ledger's record of the job that shows in `page`."""
    values = [job["state"], job["error"], job["type"], *map(str, job["metadata"].values())]
    for a in job["assets"]:
        values += [a["name"], a["sha256"], a["uri"], a["error"], a["source"], a["content_type"]]
        values += [str(a["size"]), a["state"]]
    for d in job["deliveries"]:
        values += [d["webhook_id"], d["payload_sha256"], d["event"]]
    return [v for v in values if v and len(v) > 3 and v in page]


def words(page: str) -> str:
    return " ".join(page.split())


@pytest.mark.parametrize("kind", ["archived", "dead"])
@pytest.mark.parametrize("suffix", ["", "/assets/0", "?tab=assets"])
async def test_a_signed_out_job_page_shows_nothing_from_the_ledger(
    console: Harness, source_server: SourceServer, kind: str, suffix: str
) -> None:
    h = console
    make = archived_job if kind == "archived" else dead_job
    await make(h, source_server, "job-1")
    record = await h.client.get("/jobs/apex/job-1", headers={"authorization": f"Bearer {TOKEN}"})
    assert record.status_code == 200
    real = await h.client.get(f"/console/jobs/apex/job-1{suffix}")
    unknown = await h.client.get(f"/console/jobs/apex/job-9{suffix}")
    assert real.status_code == unknown.status_code == 401
    assert ledger_facts(real.text, record.json()) == []
    # Not even whether the job exists: the same page, but for the path typed.
    assert real.text.replace("job-1", "job-9") == unknown.text
    assert "set-cookie" not in real.headers
    if suffix == "":  # the probe does find the ledger's facts on the signed-in page
        assert (await sign_in(h)).status_code == 303
        signed_in = await h.client.get("/console/jobs/apex/job-1")
        assert len(ledger_facts(signed_in.text, record.json())) >= 4


async def test_a_wrong_token_answers_the_first_visits_page_and_leaves_no_cookie(
    console: Harness, source_server: SourceServer
) -> None:
    h = console
    await archived_job(h, source_server, "job-1")
    first = await h.client.get("/console/jobs/apex/job-1")
    wrong = await h.client.post(
        "/console/signin",
        data={"token": "not-the-token", "next": "/console/jobs/apex/job-1"},
        headers=SAME_ORIGIN,
    )
    assert wrong.status_code == first.status_code == 401
    error = '<p class="notice bad" role="alert">That is not the operator token.</p>'
    assert error in wrong.text
    assert words(wrong.text.replace(error, "")) == words(first.text)
    assert "set-cookie" not in wrong.headers and COOKIE not in h.client.cookies


async def test_a_wrong_token_ends_a_session_the_browser_had(console: Harness) -> None:
    h = console
    assert (await sign_in(h)).status_code == 303
    assert (await h.client.get("/console/jobs")).status_code == 200
    wrong = await sign_in(h, "not-the-token")
    assert wrong.status_code == 401
    assert wrong.headers["set-cookie"].startswith(f'{COOKIE}=""; ')
    assert "max-age=0" in wrong.headers["set-cookie"].lower()
    assert (await h.client.get("/console/jobs")).status_code == 401


async def test_sign_in_attempts_are_limited_per_address_with_a_clear_429(
    console: Harness,
) -> None:
    h = console
    for _ in range(PER_ADDRESS):
        assert (await sign_in(h, "guess")).status_code == 401
    limited = await sign_in(h, "guess")
    assert limited.status_code == 429
    assert "Too many sign-in attempts" in limited.text
    assert 1 <= int(limited.headers["retry-after"]) <= WINDOW_SECONDS
    # Even the right token waits: a guesser cannot tell a hit from the limit.
    right = await sign_in(h)
    assert right.status_code == 429 and "set-cookie" not in right.headers
    h.clock.advance(WINDOW_SECONDS)
    assert (await sign_in(h)).status_code == 303


async def test_sign_in_attempts_are_limited_overall_across_addresses(console: Harness) -> None:
    h = console
    addresses = [f"10.0.{n // 250}.{n % 250}" for n in range(OVERALL + 1)]
    statuses = []
    for address in addresses:
        h.client._transport.client = (address, 40000)  # type: ignore[attr-defined]
        statuses.append((await sign_in(h, "guess")).status_code)
    assert statuses[:OVERALL] == [401] * OVERALL
    assert statuses[OVERALL] == 429
