"""Data over years through the real app: retention, erasure, scheduled fixity, BagIt export.

Jobs are archived through the real ingest path and archiver (local store, SQLite ledger) on a fake
clock; the background loops are driven one round at a time (`once`), never slept through. The
CLI tests run the real commands; their ledger is filled relative to the real clock, which the
CLI uses.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bagit
import httpx
import pytest
from typer.testing import CliRunner

from receiver.app import build_parts, create_app, lifecycle_loops
from receiver.audit.fixity import FixityLoop, verify_due
from receiver.audit.lifecycle import ForgetReport, RetentionLoop, RetentionPolicy, forget, prune
from receiver.cli import app as cli
from tests.conftest import AUTH, LOCAL_SOURCES, FakeClock, Harness, make_settings, post_signed
from tests.payloads import APEX_SECRET, apex_completed, signed
from tests.sources import SourceServer
from tests.test_console import sign_in

pytestmark = pytest.mark.anyio


@pytest.fixture
async def h(harness_factory: Any) -> Harness:
    harness: Harness = await harness_factory(**LOCAL_SOURCES)
    return harness


async def erase(h: Harness, job_id: str, store: Any = None) -> ForgetReport:
    """`receiver forget apex/JOB_ID --yes` on the harness's parts (or another store)."""
    parts = h.parts
    return await forget(
        parts.ledger,
        parts.store if store is None else store,
        parts.tracked,
        "apex",
        job_id,
        reason="r",
        now=h.clock(),
        act=True,
    )


async def archive_job(h: Harness, source: SourceServer, job_id: str, size: int = 5000) -> bytes:
    """Deliver a completed job and archive it; the webhook's raw body."""
    url = source.add(f"/o/{job_id}/out.png", size, content_type="image/png")
    payload = apex_completed(job_id, url=url + "?X-Amz-Signature=TOPSECRET")
    body, headers = signed(payload, APEX_SECRET, timestamp=int(h.clock.wall()))
    response = await h.client.post("/webhooks/apex", content=body, headers=headers)
    assert response.status_code == 202
    assert await h.parts.archiver.run_once()
    return body


def archive_files(h: Harness) -> list[str]:
    root = Path(h.parts.settings.archive_url.removeprefix("file://"))
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# --- payload retention --------------------------------------------------------------------------


async def test_payloads_go_after_the_retention_period_and_the_audit_says_so(
    h: Harness, source_server: SourceServer
) -> None:
    body = await archive_job(h, source_server, "r1")
    loop = RetentionLoop(
        h.parts.ledger, RetentionPolicy.from_days(30, None, batch=10), clock=h.clock, interval=1
    )
    h.clock.advance(29 * 86400)
    assert (await loop.once()).payloads_removed == 0
    shown = (await h.client.get("/jobs/apex/r1", headers=AUTH)).json()
    assert shown["deliveries"][0]["payload"]["data"]["jobId"] == "r1"
    assert shown["deliveries"][0]["payload_removed"] is None

    h.clock.advance(2 * 86400)
    assert (await loop.once()).payloads_removed == 1

    shown = (await h.client.get("/jobs/apex/r1", headers=AUTH)).json()
    delivery = shown["deliveries"][0]
    assert delivery["payload"] is None
    assert delivery["payload_removed"] == "payload removed after 30 days"
    await sign_in(h)  # the console says the same where the payload was
    page = await h.client.get("/console/jobs/apex/r1")
    assert "payload removed after 30 days" in page.text and "View (redacted)" not in page.text
    # The audit row stays, with the fingerprint of what was received.
    assert delivery["payload_sha256"] == hashlib.sha256(body).hexdigest()
    assert delivery["webhook_id"].startswith("msg_")
    assert (delivery["source"], delivery["authentication"], delivery["outcome"]) == (
        "webhook",
        "signature",
        "accepted",
    )
    assert shown["state"] == "archived" and shown["assets"][0]["sha256"]
    assert h.rows("deliveries")[0]["body"] == b""


async def run_briefly(loops: list[Any], until: Any) -> None:
    """Run the background loops as `serve` does until `until()` holds (a round starts at once)."""
    tasks = [asyncio.create_task(loop) for loop in loops]
    try:
        for _ in range(200):
            if until():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the background loops did not get there")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_the_background_loops_of_serve_prune_and_verify_and_count_it(
    harness_factory: Any, source_server: SourceServer
) -> None:
    default = await harness_factory(**LOCAL_SOURCES)
    loops = lifecycle_loops(default.parts)
    assert len(loops) == 1  # retention only: background fixity is off by default
    for coroutine in loops:
        coroutine.close()

    h = await harness_factory(
        **LOCAL_SOURCES, payload_retention_days=0, fixity_days=0, fixity_per_hour=3600
    )
    await archive_job(h, source_server, "m1")
    h.clock.advance(1)
    metrics = h.parts.metrics
    await run_briefly(
        lifecycle_loops(h.parts),
        lambda: (
            metrics.value("receiver_retention_payloads_removed_total") == 1
            and metrics.value("receiver_fixity_checks_total", result="ok") == 1
        ),
    )
    job = await h.parts.ledger.job("apex", "m1")
    assert job is not None
    assert job.deliveries[0].payload_removed and job.assets[0].verified_by == "full-read"


async def test_pruning_in_small_batches_leaves_room_for_ingest(
    h: Harness, source_server: SourceServer
) -> None:
    for i in range(12):
        await post_signed(h, "apex", apex_completed(f"b{i}"), APEX_SECRET)
    h.clock.advance(86400)
    interleaved: list[int] = []

    async def ingest_between_batches() -> None:
        # Ingest still gets through between two batches of the prune.
        response = await post_signed(
            h, "apex", apex_completed(f"late{len(interleaved)}"), APEX_SECRET
        )
        interleaved.append(response.status_code)

    report = await prune(
        h.parts.ledger,
        RetentionPolicy(timedelta(hours=1), None, batch=5),
        h.clock(),
        between_batches=ingest_between_batches,
    )
    assert report.payloads_removed == 12
    assert interleaved == [202, 202]  # after the 1st and 2nd batch of 5; the 3rd had 2
    kept = [r for r in h.rows("deliveries") if r["body_removed_at"] is None]
    assert len(kept) == 2  # the deliveries ingested meanwhile are newer than the cutoff


# --- job retention ------------------------------------------------------------------------------


async def test_job_retention_removes_records_but_never_archived_objects(
    h: Harness, source_server: SourceServer
) -> None:
    await archive_job(h, source_server, "old-job")
    files = archive_files(h)
    assert any(f.endswith("manifest.json") for f in files)
    h.clock.advance(400 * 86400)
    report = await prune(h.parts.ledger, RetentionPolicy.from_days(30, 365), h.clock())
    assert report.jobs_removed == ["apex/old-job"]
    assert (await h.client.get("/jobs/apex/old-job", headers=AUTH)).status_code == 404
    assert archive_files(h) == files  # the archive keeps everything: `reindex` restores it


# --- erasure ------------------------------------------------------------------------------------


async def test_forget_is_a_dry_run_then_erases_and_a_redelivery_is_not_archived(
    h: Harness, source_server: SourceServer
) -> None:
    body = await archive_job(h, source_server, "erase-me")
    await archive_job(h, source_server, "keep-me")
    files = archive_files(h)
    ledger, store, tracked = h.parts.ledger, h.parts.store, h.parts.tracked

    dry = await forget(
        ledger, store, tracked, "apex", "erase-me", reason="x", now=h.clock(), act=False
    )
    assert dry.in_ledger and not dry.acted
    assert [k.rsplit("/", 1)[1] for k in dry.keys] == ["out.png", "manifest.json"]
    assert archive_files(h) == files and await ledger.job("apex", "erase-me") is not None

    done = await forget(
        ledger,
        store,
        tracked,
        "apex",
        "erase-me",
        reason="DSR-7 from the customer",
        now=h.clock(),
        act=True,
    )
    assert done.acted and done.not_removed == []
    assert [e.removed for e in done.erased] == [1, 1]
    assert [f for f in archive_files(h) if "erase-me" in f] == []
    assert [f for f in archive_files(h) if "keep-me" in f] == [f for f in files if "keep-me" in f]
    shown = await h.client.get("/jobs/apex/erase-me", headers=AUTH)
    assert shown.status_code == 404
    assert "erased on request" in shown.json()["error"]["message"]
    stone = await ledger.tombstone("apex", "erase-me")
    assert stone is not None and stone.reason == "DSR-7 from the customer"

    # The provider redelivers (its retry schedule): acknowledged, nothing recorded or copied.
    headers = signed(json.loads(body), APEX_SECRET, timestamp=int(h.clock.wall()))[1]
    again = await h.client.post("/webhooks/apex", content=body, headers=headers)
    assert again.status_code == 200
    assert (again.json()["status"], again.json()["tasks_queued"]) == ("forgotten", 0)
    assert not await h.parts.archiver.run_once()
    assert [f for f in archive_files(h) if "erase-me" in f] == []
    assert await ledger.job("apex", "erase-me") is None


async def test_forget_finds_the_objects_of_a_job_the_ledger_no_longer_has(
    h: Harness, source_server: SourceServer
) -> None:
    await archive_job(h, source_server, "a:b")  # a job id that needs quoting in keys
    h.clock.advance(400 * 86400)
    await prune(h.parts.ledger, RetentionPolicy.from_days(30, 365), h.clock())
    report = await erase(h, "a:b")
    assert not report.in_ledger
    assert sorted(k.rsplit("/", 1)[1] for k in report.keys) == ["manifest.json", "out.png"]
    assert archive_files(h) == []


# --- fixity -------------------------------------------------------------------------------------


BIT_ROT = "sha256 mismatch; size mismatch; manifest mismatch; object record mismatch"


async def test_due_assets_are_checked_oldest_first_and_failures_are_recorded_and_exposed(
    h: Harness, source_server: SourceServer
) -> None:
    for job_id in ("fx1", "fx2", "fx3"):  # archived a day apart
        h.clock.advance(86400)
        await archive_job(h, source_server, job_id)
    root = Path(h.parts.settings.archive_url.removeprefix("file://"))
    (corrupt,) = [p for p in root.rglob("out.png") if "fx2" in str(p)]
    corrupt.write_bytes(b"bit rot")
    h.clock.advance(89.5 * 86400)  # fx1 and fx2 are over 90 days old, fx3 not yet

    first = await verify_due(h.parts.ledger, h.parts.store, now=h.clock, fixity_days=90, limit=2)
    assert [(c.job_id, c.result) for c in first.checks] == [
        ("fx1", "ok"),
        ("fx2", BIT_ROT),  # every record disagrees with the rotten bytes
    ]
    second = await verify_due(h.parts.ledger, h.parts.store, now=h.clock, fixity_days=90, limit=2)
    assert [c.job_id for c in second.checks] == []  # fx3 was archived under 90 days ago
    h.clock.advance(86400)
    third = await verify_due(h.parts.ledger, h.parts.store, now=h.clock, fixity_days=90, limit=5)
    assert [c.job_id for c in third.checks] == ["fx3"]
    everything = await verify_due(
        h.parts.ledger, h.parts.store, now=h.clock, fixity_days=0, limit=9
    )
    assert sorted(c.job_id for c in everything.checks) == ["fx1", "fx2", "fx3"]
    assert everything.as_json()["failed"] == 1

    shown = (await h.client.get("/jobs/apex/fx2", headers=AUTH)).json()
    fixity = shown["assets"][0]["fixity"]
    assert (fixity["ok"], fixity["problem"], fixity["verified_by"]) == (
        False,
        BIT_ROT,
        "full-read",
    )
    assert fixity["verified_at"] == h.clock().isoformat()
    metrics = (await h.client.get("/metrics")).text
    assert "receiver_fixity_failing_assets 1.0" in metrics
    assert "receiver_fixity_oldest_check_age_seconds 0.0" in metrics

    h.clock.advance(10 * 86400)
    metrics = (await h.client.get("/metrics")).text
    assert "receiver_fixity_oldest_check_age_seconds 864000.0" in metrics


async def test_the_background_fixity_loop_checks_one_asset_a_round(
    h: Harness, source_server: SourceServer
) -> None:
    await archive_job(h, source_server, "bg1")
    h.clock.advance(1)
    await archive_job(h, source_server, "bg2")
    h.clock.advance(1)
    checked: list[str] = []
    loop = FixityLoop(
        h.parts.ledger,
        h.parts.store,
        clock=h.clock,
        fixity_days=0,
        per_hour=120,
        on_checked=lambda c: checked.append(f"{c.job_id}:{c.result}"),
    )
    assert loop.pause == 30.0
    await loop.once()
    h.clock.advance(30)
    await loop.once()
    h.clock.advance(30)
    await loop.once()  # 0 days: every asset is always due; the oldest check comes first
    assert checked == ["bg1:ok", "bg2:ok", "bg1:ok"]


# --- the CLI ------------------------------------------------------------------------------------


def populate(tmp_path: Path, source: SourceServer, job_ids: list[str], **settings: Any) -> None:
    """Archive jobs through the real app, 40 days ago by the real clock (which the CLI uses)."""

    async def go() -> None:
        clock = FakeClock(datetime.now(UTC) - timedelta(days=40))
        parts = build_parts(
            make_settings(tmp_path, **LOCAL_SOURCES, **settings), clock=clock, wall_clock=clock.wall
        )
        app = create_app(parts)
        parts.start(workers=0)
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://r"
            ) as client:
                for job_id in job_ids:
                    url = source.add(f"/o/{job_id}/out.png", 3000, content_type="image/png")
                    # A bulky payload, as some providers send: what retention gives back.
                    payload = apex_completed(job_id, url=url, notes=os.urandom(30_000).hex())
                    body, headers = signed(payload, APEX_SECRET, timestamp=int(clock.wall()))
                    response = await client.post("/webhooks/apex", content=body, headers=headers)
                    assert response.status_code == 202
                    clock.advance(60)
            while await parts.archiver.run_once():
                pass
        finally:
            await parts.stop()

    asyncio.run(go())


def invoke(tmp_path: Path, *args: str, **env: str) -> Any:
    settings = make_settings(tmp_path)
    return CliRunner().invoke(
        cli,
        list(args),
        env={
            "RECEIVER_LEDGER_URL": settings.ledger_url,
            "RECEIVER_ARCHIVE_URL": settings.archive_url,
            "RECEIVER_LOG_FORMAT": "json",
            **env,
        },
    )


def test_prune_command_drops_payloads_and_gives_the_space_back(
    tmp_path: Path, source_server: SourceServer
) -> None:
    populate(tmp_path, source_server, [f"p{i}" for i in range(40)])
    db = tmp_path / "receiver.db"
    kept = invoke(tmp_path, "prune")  # default: 30 days; these are 40 days old
    assert kept.exit_code == 0, kept.output
    assert "payloads removed 40 (received over 30 days ago), job retention off" in kept.output
    size_line = kept.output.strip().splitlines()[-1]
    before, after = (int(n) for n in size_line.split(": ")[1].removesuffix(" bytes").split(" -> "))
    assert after < before / 3, size_line  # 40 x 60 KB of payload given back to the filesystem
    assert db.stat().st_size == after
    shown = json.loads(invoke(tmp_path, "jobs", "show", "apex/p0", "--json").output)
    assert shown["deliveries"][0]["payload_removed"] == "payload removed after 30 days"
    human = invoke(tmp_path, "jobs", "show", "apex/p0").output
    assert "payload removed" in human
    again = invoke(tmp_path, "prune", "--no-vacuum")
    assert "payloads removed 0" in again.output


def test_prune_command_with_job_retention(tmp_path: Path, source_server: SourceServer) -> None:
    populate(tmp_path, source_server, ["q1", "q2"])
    result = invoke(tmp_path, "prune", RECEIVER_JOB_RETENTION_DAYS="35")
    assert result.exit_code == 0, result.output
    assert "jobs removed 2 (ended over 35 days)" in result.output
    assert invoke(tmp_path, "jobs", "show", "apex/q1").exit_code == 2
    assert len(list((tmp_path / "archive").rglob("out.png"))) == 2


def test_forget_command_dry_run_then_erase(tmp_path: Path, source_server: SourceServer) -> None:
    populate(tmp_path, source_server, ["f1"])
    dry = invoke(tmp_path, "forget", "apex/f1")
    assert dry.exit_code == 0
    assert "dry run" in dry.output and "out.png" in dry.output and "manifest.json" in dry.output
    assert len(list((tmp_path / "archive").rglob("out.png"))) == 1
    assert invoke(tmp_path, "forget", "apex/f1", "--yes").exit_code == 2  # a reason is required
    done = invoke(tmp_path, "forget", "apex/f1", "--yes", "--reason", "erasure request 9")
    assert done.exit_code == 0, done.output
    assert "1 version(s) removed" in done.output
    assert list((tmp_path / "archive").rglob("*.png")) == []
    assert invoke(tmp_path, "jobs", "show", "apex/f1").exit_code == 2
    assert invoke(tmp_path, "forget", "no-slash").exit_code == 2


def test_verify_due_command_writes_an_auditors_report(
    tmp_path: Path, source_server: SourceServer
) -> None:
    populate(tmp_path, source_server, ["v1", "v2", "v3"])
    (victim,) = [p for p in (tmp_path / "archive").rglob("out.png") if "v2" in str(p)]
    victim.unlink()
    report_file = tmp_path / "fixity.json"
    not_yet = invoke(tmp_path, "verify", "--due")  # archived 40 days ago, due after 90
    assert (not_yet.exit_code, "due checks 0" in not_yet.output) == (0, True)
    result = invoke(
        tmp_path, "verify", "--due", "--limit", "2", "--report", str(report_file),
        RECEIVER_FIXITY_DAYS="30",
    )  # fmt: skip
    assert result.exit_code == 1
    report = json.loads(report_file.read_text())
    assert (report["checked"], report["ok"], report["failed"], report["limit"]) == (2, 1, 1, 2)
    assert [(c["job_id"], c["result"], c["method"]) for c in report["checks"]] == [
        ("v1", "ok", "full-read"),
        ("v2", "missing", "full-read"),
    ]
    rest = invoke(tmp_path, "verify", "--due", "--json", RECEIVER_FIXITY_DAYS="30")
    assert [c["job_id"] for c in json.loads(rest.output)["checks"]] == ["v3"]
    assert rest.exit_code == 0


def test_export_writes_a_bag_that_validates_and_catches_tampering(
    tmp_path: Path, source_server: SourceServer
) -> None:
    populate(tmp_path, source_server, ["e1", "e2", "e:3"])
    bag_dir = tmp_path / "bag-one"
    one = invoke(tmp_path, "export", "apex/e1", "--bagit", str(bag_dir))
    assert one.exit_code == 0, one.output
    bag = bagit.Bag(str(bag_dir))
    bag.validate()
    assert sorted(bag.payload_files()) == ["data/apex/e1/out.png"]
    assert "sha256" in bag.algorithms
    assert (bag_dir / "receiver/apex/e1/manifest.json").is_file()
    manifest = json.loads((bag_dir / "receiver/apex/e1/manifest.json").read_text())
    assert manifest["job_id"] == "e1"
    assert "receiver/apex/e1/manifest.json" in bag.tagfile_entries()
    assert bag.info["Payload-Oxum"] == "3000.1"

    (bag_dir / "data/apex/e1/out.png").write_bytes(b"tampered")
    with pytest.raises(bagit.BagValidationError):
        bagit.Bag(str(bag_dir)).validate()

    whole = tmp_path / "bag-range"
    since = (datetime.now(UTC) - timedelta(days=41)).isoformat()
    ranged = invoke(tmp_path, "export", "--since", since, "--bagit", str(whole))
    assert ranged.exit_code == 0, ranged.output
    ranged_bag = bagit.Bag(str(whole))
    ranged_bag.validate()
    assert sorted(ranged_bag.payload_files()) == [
        "data/apex/e1/out.png",
        "data/apex/e2/out.png",
        "data/apex/e_3-eac73897/out.png",  # e:3, made safe
    ]
    assert invoke(tmp_path, "export", "apex/e1", "--bagit", str(whole)).exit_code == 2  # not empty
    assert invoke(tmp_path, "export", "apex/none", "--bagit", str(tmp_path / "x")).exit_code == 2
    assert invoke(tmp_path, "export", "--bagit", str(tmp_path / "y")).exit_code == 2

    # An object gone from the archive: the bag leaves it out and the command says so.
    (victim,) = [p for p in (tmp_path / "archive").rglob("out.png") if "/e2/" in str(p)]
    victim.unlink()
    partial = invoke(tmp_path, "export", "apex/e2", "--bagit", str(tmp_path / "bag-e2"))
    assert partial.exit_code == 1
    assert "apex/e2 asset 0: missing" in partial.output


async def test_sqlite_gives_pruned_space_back_in_the_background(tmp_path: Path) -> None:
    from receiver.backends.sqlite import Database
    from receiver.ledger.sqlite import SqliteLedger
    from tests.test_contract import completed
    from tests.test_lifecycle_contract import record_at

    db = Database(tmp_path / "space.db")
    db.start()
    try:
        ledger = SqliteLedger(db)
        at = datetime(2026, 1, 1, tzinfo=UTC)
        for i in range(20):  # bodies beyond a page: their overflow pages can be freed
            await record_at(ledger, completed(f"s{i}"), at, os.urandom(20_000))

        def pages() -> tuple[int, int, int]:
            def read(conn: Any) -> tuple[int, int, int]:
                return tuple(  # type: ignore[return-value]
                    conn.execute(f"PRAGMA {name}").fetchone()[0]
                    for name in ("auto_vacuum", "page_count", "freelist_count")
                )

            return db.read_sync(read)

        mode, before, free = pages()
        assert (mode, free) == (2, 0)  # a new file uses incremental auto-vacuum
        assert await ledger.prune_payloads(at + timedelta(days=1), at, 100) == 20
        await ledger.compact()
        _, after, free = pages()
        assert free == 0
        assert after <= before - 20 * 4  # 4 overflow pages per 20 KB body went back
    finally:
        db.stop()


async def test_forgetting_a_job_still_being_copied_says_a_copy_may_land(h: Harness) -> None:
    await post_signed(h, "apex", apex_completed("busy"), APEX_SECRET)  # queued, not copied
    report = await erase(h, "busy")
    assert report.in_flight and report.in_ledger
    # The task went with the record: nothing is leased or copied afterwards.
    assert not await h.parts.archiver.run_once()
    assert h.counts() == {"jobs": 0, "deliveries": 0, "assets": 0, "tasks": 0}
    with pytest.raises(LookupError):  # a copy that finishes anyway is told the job is gone
        from receiver.ledger import ArchivedAsset

        await h.parts.ledger.mark_archived(
            "apex", "busy", 0, ArchivedAsset("file:///x", "x", 1, "00" * 32, "image/png"), h.clock()
        )


async def test_manifests_keep_payloads_the_ledger_dropped(
    h: Harness, source_server: SourceServer
) -> None:
    body = await archive_job(h, source_server, "mf")
    root = Path(h.parts.settings.archive_url.removeprefix("file://"))
    (manifest_file,) = root.rglob("manifest.json")
    original = json.loads(manifest_file.read_text())["deliveries"][0]["payload"]
    assert original["data"]["jobId"] == "mf"
    h.clock.advance(31 * 86400)
    await prune(h.parts.ledger, RetentionPolicy.from_days(30, None), h.clock())
    # A redelivery makes the archiver rewrite the manifest from the ledger.
    headers = signed(json.loads(body), APEX_SECRET, timestamp=int(h.clock.wall()))[1]
    assert (await h.client.post("/webhooks/apex", content=body, headers=headers)).status_code == 200
    assert await h.parts.archiver.run_once()
    rewritten = json.loads(manifest_file.read_text())["deliveries"]
    assert len(rewritten) == 2
    assert rewritten[0]["payload"] == original  # kept from the manifest it replaced
    assert rewritten[1]["payload"]["data"]["jobId"] == "mf"  # the new one, from the ledger


class BrokenStore:
    """A store whose backend fails on every read and delete (the real one for everything else)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def read(self, key: str) -> Any:
        from receiver.store import StoreError

        async def fail() -> Any:
            raise StoreError("local store: disk on fire")
            yield b""  # pragma: no cover

        return fail()

    async def delete_all_versions(self, key: str) -> Any:
        from receiver.store import StoreError

        raise StoreError("s3://bucket: AccessDenied")


async def test_a_failing_store_is_reported_not_recorded_as_rot(
    h: Harness, source_server: SourceServer
) -> None:
    await archive_job(h, source_server, "sick")
    h.clock.advance(100 * 86400)
    broken = BrokenStore(h.parts.store)
    report = await verify_due(h.parts.ledger, broken, now=h.clock, fixity_days=90, limit=5)
    assert [(c.job_id, c.result, c.actual) for c in report.checks] == [
        ("sick", "store unavailable", "StoreError")
    ]
    job = await h.parts.ledger.job("apex", "sick")
    assert job is not None and job.assets[0].verified_at is None  # still due, not "failed"
    assert (await h.parts.ledger.fixity_status()).failing == 0

    erased = await erase(h, "sick", broken)
    assert erased.acted and len(erased.not_removed) == 2
    assert all("StoreError: s3://bucket: AccessDenied" in p for p in erased.not_removed)
    # Nothing was removed, and the report says so.
    assert [f.rsplit("/", 1)[1] for f in archive_files(h) if not f.endswith(".meta.json")] == [
        "manifest.json",
        "out.png",
    ]


def test_jobs_show_tells_the_last_fixity_check(tmp_path: Path, source_server: SourceServer) -> None:
    populate(tmp_path, source_server, ["shown"])
    (victim,) = (tmp_path / "archive").rglob("out.png")
    victim.write_bytes(b"rot")
    assert invoke(tmp_path, "verify", "--due", RECEIVER_FIXITY_DAYS="0").exit_code == 1
    human = invoke(tmp_path, "jobs", "show", "apex/shown").output
    assert "(full-read): FAILED: sha256 mismatch" in human
