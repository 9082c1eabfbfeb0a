"""Property: every correctly signed input ends well (issue 12).

Hypothesis generates Apex and Fliki webhooks with arbitrary JSON in them (extreme and
non-finite numbers, deep nesting, odd unicode, extra fields, odd dates, odd job ids and output
names), signs them and posts them to the real app (ASGI harness, SQLite ledger, local store,
a real HTTP source on loopback). For each:

- the answer is never a 5xx;
- a rejection (4xx) writes nothing;
- an acceptance ends, within a bounded number of archive attempts (the clock is moved past
  every backoff and lease), with every asset archived or ended with a reason; no task is left;
  `GET /jobs/{p}/{id}` renders it as strict JSON (no NaN), and a written manifest is strict
  JSON too.

The example count is bounded so that it runs in seconds.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from receiver.archive.manifest import manifest_key
from tests.conftest import FakeClock, Harness, make_settings
from tests.payloads import APEX_SECRET, FLIKI_SECRET, signed
from tests.sources import SourceServer

OPERATOR = {"Authorization": "Bearer operator-token"}
MAX_ARCHIVE_ROUNDS = 40  # attempts are capped at 3 below; a few tasks per job at most
ODD_NAMES = [
    "out.png",
    "a.meta.json",
    "manifest.json",
    "MANIFEST.JSON",
    ".hidden",
    "x" * 300 + ".mp4",
    "出力" * 40 + ".png",
    "%2e%2e",
    "a b;c.mp4",
]


def strict_json(text: str | bytes) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} in output JSON")

    return json.loads(text, parse_constant=refuse)


# --- strategies --------------------------------------------------------------------------------

# Tame values pass the edge (and must then go all the way); wild ones are what the edge must
# refuse or survive. Each case draws one of both families for its free-form parts, so that
# both sides of the edge are reached often.
tame_numbers = st.one_of(
    st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e18, max_value=1e18),
)
wild_numbers = st.one_of(
    tame_numbers,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63 - 1, 2**63, -(2**63), 10**30, 1e300, float("nan"), float("inf")]),
)
tame_text = st.text(max_size=40)  # any Unicode but surrogates
odd_text = st.text(
    alphabet=st.characters(codec=None, exclude_categories=()),  # surrogates and controls too
    max_size=40,
)
scalars = st.one_of(st.none(), st.booleans(), wild_numbers, odd_text)


def json_values(wild: bool) -> st.SearchStrategy[Any]:
    text = odd_text if wild else tame_text
    leaves = st.one_of(st.none(), st.booleans(), wild_numbers if wild else tame_numbers, text)
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4), st.dictionaries(text, children, max_size=4)
        ),
        max_leaves=20,
    )


@st.composite
def nested(draw: st.DrawFn) -> Any:
    """A JSON value, wild or tame; wild ones are sometimes wrapped in many levels of lists (the
    depth limit is 32)."""
    wild = draw(st.booleans())
    value = draw(json_values(wild))
    depth = draw(st.sampled_from([0, 0, 0, 5, 31, 40, 200])) if wild else draw(st.integers(0, 25))
    for _ in range(depth):
        value = [value]
    return value


OFFSETS = st.sampled_from([UTC, timezone(timedelta(hours=14)), timezone(-timedelta(hours=12))])


def _dates_between(low: datetime, high: datetime) -> st.SearchStrategy[str]:
    return st.builds(
        lambda d, tz: d.replace(tzinfo=tz).isoformat(),
        st.datetimes(min_value=low, max_value=high),
        OFFSETS,
    )


tame_dates = _dates_between(datetime(2000, 1, 2), datetime(2099, 12, 30))
wild_dates = st.one_of(
    tame_dates,
    _dates_between(datetime(1, 1, 1), datetime(9999, 12, 31)),
    st.sampled_from(
        ["2026-03-16T12:00:00Z", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00"]
    ),
    scalars,
)
tame_ids = st.one_of(
    st.uuids().map(str),
    st.text(
        alphabet=st.characters(categories=["L", "N", "P", "S", "Zs"], exclude_characters="/\\"),
        min_size=1,
        max_size=128,
    ).filter(lambda t: t not in (".", "..")),
)
wild_ids = st.one_of(
    tame_ids,
    st.sampled_from([".", "..", "a/b", "x" * 128, "x" * 129, "出" * 128, "a\x00b", "%2e"]),
    odd_text,
    wild_numbers,
)


class Draw:
    """One case's draws: tame (every part valid, so the case must go all the way) or wild."""

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw
        self.wild = draw(st.booleans())

    def __call__(self, tame: st.SearchStrategy[Any], wild: st.SearchStrategy[Any]) -> Any:
        return self.draw(wild if self.wild else tame)


@st.composite
def urls(draw: st.DrawFn, source: SourceServer, wild: bool) -> Any:
    kinds = ["source"] * 6 + (["refused", "garbage"] if wild else ["refused"])
    kind = draw(st.sampled_from(kinds))
    if kind == "source":
        name = draw(st.sampled_from(ODD_NAMES))
        url = source.url("/o/" + quote(name))
        if draw(st.booleans()):
            expires = draw(st.sampled_from(["3600", "-5", "99999999999999999999", "x"]))
            url += f"?X-Amz-Date=20260316T120000Z&X-Amz-Expires={expires}&X-Amz-Signature=s"
        return url
    if kind == "refused":  # not an allowed host: the guard refuses it without any DNS
        return "https://not-allowed.invalid/" + quote(draw(odd_text), errors="surrogatepass")
    return draw(scalars)


def fields(pick: Draw, taken: dict[str, Any], most: int) -> dict[str, Any]:
    keys = (odd_text if pick.wild else tame_text).filter(lambda k: k not in taken)
    result: dict[str, Any] = pick.draw(st.dictionaries(keys, nested(), max_size=most))
    return result


@st.composite
def apex_bodies(draw: st.DrawFn, source: SourceServer) -> dict[str, Any]:
    pick = Draw(draw)
    completed = draw(st.booleans())
    data: dict[str, Any] = {
        "jobId": pick(tame_ids, wild_ids),
        "type": pick(st.sampled_from(["image", "video", "instant-ad"]), odd_text),
        "status": "completed" if completed else "failed",
    }
    if completed:
        data |= {
            "outputUrl": draw(urls(source, pick.wild)),
            "outputType": pick(st.sampled_from([None, "image/png"]), odd_text),
            "metadata": fields(pick, {}, 3),
            "completedAt": pick(tame_dates, wild_dates),
        }
    else:
        data |= {
            "error": pick(st.one_of(st.none(), tame_text), odd_text),
            "creditsRefunded": pick(st.integers(0, 2**63 - 1), wild_numbers),
            "failedAt": pick(tame_dates, wild_dates),
        }
    data |= fields(pick, data, 2)  # extra fields
    body: dict[str, Any] = {
        "event": "job.completed" if completed else "job.failed",
        "timestamp": pick(tame_dates, wild_dates),
        "data": data,
    }
    body |= fields(pick, body, 2)
    return body


@st.composite
def fliki_bodies(draw: st.DrawFn, source: SourceServer) -> dict[str, Any]:
    pick = Draw(draw)
    body: dict[str, Any] = {
        "fileId": pick(tame_ids, wild_ids),
        "status": pick(
            st.sampled_from(["completed", "completed", "failed", "processing"]),
            st.sampled_from(["completed", "weird", ""]),
        ),
        "download": draw(urls(source, pick.wild)),
        "progress": pick(st.one_of(st.none(), st.floats(0, 100)), wild_numbers),
    }
    body |= fields(pick, body, 3)  # extra fields: Fliki keeps them as metadata
    return body


# --- the property ------------------------------------------------------------------------------


def counts(h: Harness) -> dict[str, int]:
    conn = sqlite3.connect(h.parts.db.path)
    try:
        return {
            t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in ("jobs", "deliveries", "assets", "tasks")
        }
    finally:
        conn.close()


async def settle(h: Harness) -> None:
    """Run the archiver until no task is left, moving time past every backoff and lease."""
    for _ in range(MAX_ARCHIVE_ROUNDS):
        if not await h.parts.archiver.run_once():
            open_tasks = [t for t in h.rows("tasks") if t["state"] in ("ready", "leased")]
            if not open_tasks:
                return
            h.clock.advance(3600)
    raise AssertionError(f"tasks still open after {MAX_ARCHIVE_ROUNDS} archive rounds")


STATS: dict[str, int] = {}


def tally(key: str) -> None:
    STATS[key] = STATS.get(key, 0) + 1


async def check(h: Harness, provider: str, payload: dict[str, Any], archive: Path) -> None:
    secret = APEX_SECRET if provider == "apex" else FLIKI_SECRET
    body = json.dumps(payload, allow_nan=True).encode("utf-8", "surrogatepass")
    body, headers = signed(body, secret, timestamp=int(h.clock.wall()))
    before = counts(h)
    response = await h.client.post(f"/webhooks/{provider}", content=body, headers=headers)
    assert response.status_code < 500, response.text
    tally(f"http_{response.status_code}")
    if response.status_code >= 400:
        assert counts(h) == before, response.text  # a rejection writes nothing
        error = response.json()["error"]
        details = error["details"] if isinstance(error["details"], list) else [{}]
        tally(f"rule_{details[0].get('rule') or details[0].get('field') or error['code']}")
        return
    job_id = response.json()["job_id"]
    await settle(h)
    job = await h.parts.ledger.job(provider, job_id)
    assert job is not None
    for asset in job.assets:
        tally(f"asset_{asset.state}")
        assert asset.state in ("archived", "expired", "dead"), asset
        if asset.state != "archived":
            assert asset.error, asset  # ended with a reason
    shown = await h.client.get(f"/jobs/{provider}/{quote(job_id, safe='')}", headers=OPERATOR)
    assert shown.status_code == 200, shown.text
    rendered = strict_json(shown.text)
    assert rendered["job_id"] == job_id
    for asset in job.assets:
        if asset.state == "archived":
            manifest = archive / manifest_key(asset.key)
            assert strict_json(manifest.read_bytes())["job_id"] == job_id


def test_every_signed_input_ends_well(tmp_path: Path, source_server: SourceServer) -> None:
    import httpx

    from receiver.app import build_parts, create_app

    for name in ODD_NAMES:
        source_server.add("/o/" + quote(name), 2000, content_type="image/png")
    clock = FakeClock()
    parts = build_parts(
        make_settings(
            tmp_path,
            fetch_allow_http=True,
            fetch_allow_networks="127.0.0.0/8",
            apex_download_hosts="127.0.0.1",
            fliki_download_hosts="127.0.0.1",
            max_attempts=3,
        ),
        clock=clock,
        wall_clock=clock.wall,
    )
    app = create_app(parts)
    loop = asyncio.new_event_loop()
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://receiver.test"
    )
    h = Harness(client, parts, clock)
    loop.run_until_complete(asyncio.sleep(0))
    parts.db.start()
    STATS.clear()

    @settings(
        max_examples=120,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(
        case=st.one_of(
            st.tuples(st.just("apex"), apex_bodies(source_server)),
            st.tuples(st.just("fliki"), fliki_bodies(source_server)),
        )
    )
    def run(case: tuple[str, dict[str, Any]]) -> None:
        provider, payload = case
        loop.run_until_complete(check(h, provider, payload, tmp_path / "archive"))

    try:
        run()
        listed = loop.run_until_complete(client.get("/jobs?limit=500", headers=OPERATOR))
        assert listed.status_code == 200
        strict_json(listed.text)
    finally:
        loop.run_until_complete(client.aclose())
        loop.run_until_complete(parts.stop())
        loop.close()
    print("edge property:", sorted(STATS.items()))
    # The generator must reach both sides of the edge, or the property proves little.
    assert STATS.get("http_202", 0) > 0 and STATS.get("http_422", 0) > 0, STATS


@pytest.mark.parametrize(
    "payload",
    [
        {"event": "job.completed", "data": {"metadata": {"x": float("nan")}}},
        {"fileId": "f", "status": "completed", "download": "https://a.fliki.ai/v", "n": 2**64},
    ],
)
def test_strict_json_refuses_what_the_edge_refuses(payload: dict[str, Any]) -> None:
    from receiver.errors import InvalidPayload
    from receiver.providers.bounds import load_json

    with pytest.raises(InvalidPayload):
        load_json(json.dumps(payload, allow_nan=True).encode())
