"""One contract for both poll schedules: SQLite (`TrackedStore`) and DynamoDB (moto's server).

Each contract test runs twice. Every `Tracker` method takes its time as an argument, so both run
on fixed times; "two processes" are two stores over one file or one table (the SQLite ones with
a writer thread each). Then the scale-out promise itself: a job registered on a
`serve --no-workers` replica is polled by a `receiver worker` replica, and by only one of two.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from typer.testing import CliRunner

from receiver.app import Parts, build_parts, create_app
from receiver.backends.sqlite import Database
from receiver.cli import app as cli
from receiver.ledger.dynamodb import DynamoLedger
from receiver.polling.schedule import StopReason, TrackedJob, Tracker
from receiver.polling.schedule.dynamodb import DynamoTrackedStore, table_definition
from receiver.polling.schedule.sqlite import TrackedStore
from receiver.simulator import Simulator, demo_settings
from tests.conftest import FakeClock
from tests.test_contract import serialize_moto

pytestmark = pytest.mark.anyio

T0 = FakeClock().now
TEMPLATE = Path(__file__).parent.parent / "infra" / "receiver.yaml"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def create_table(prefix: str) -> str:
    """The ledger's table as infra/receiver.yaml makes it (with the `polling` index)."""
    session: Any = boto3.session.Session()
    session.client("dynamodb").create_table(**table_definition(prefix))
    return prefix


def create_queues(name: str) -> str:
    """The SQS lanes `sqs://NAME` expects (no dead-letter queue: nothing here dies)."""
    sqs: Any = boto3.session.Session().client("sqs")
    for queue in (name, f"{name}-urgent"):
        sqs.create_queue(QueueName=queue)
    return name


Opener = Callable[[], Tracker]


@pytest.fixture(params=["sqlite", "dynamodb"])
async def open_tracker(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens another store over the same schedule: each is one more poller process."""
    if request.param == "sqlite":
        databases: list[Database] = []

        def open_sqlite() -> Tracker:
            db = Database(tmp_path / "tracked.db")
            db.start()
            databases.append(db)
            return TrackedStore(db)

        try:
            yield open_sqlite
        finally:
            for db in databases:
                db.stop()
        return
    serialize_moto()
    request.getfixturevalue("moto_s3")
    table = create_table(f"t-{uuid.uuid4().hex[:12]}")
    yield lambda: DynamoTrackedStore(table)


async def row(tracker: Tracker, provider: str, job_id: str) -> TrackedJob:
    found = await tracker.get(provider, job_id)
    assert found is not None
    return found


async def due_ids(tracker: Tracker, now: datetime, provider: str, limit: int = 50) -> list[str]:
    return [j.job_id for j in await tracker.due(now, limit, provider=provider)]


# --- the contract --------------------------------------------------------------------------


async def test_registration_is_idempotent_and_revives_stopped_jobs(open_tracker: Opener) -> None:
    tracker = open_tracker()
    assert await tracker.add("flora", "r1", "mugshot", at(0), at(0)) == "created"
    assert await tracker.add("flora", "r1", "other", at(50), at(5)) == "known"
    first = await row(tracker, "flora", "r1")
    assert (first.state, first.technique, first.next_poll_at) == ("active", "mugshot", at(0))
    assert (first.polls, first.not_found, first.registered_at) == (0, 0, at(0))
    assert (first.last_status, first.last_error, first.stop_reason) == (None, None, None)
    assert await tracker.get("flora", "nope") is None

    await tracker.reschedule("flora", "r1", at(20), at(10), counted=True, not_found=True)
    assert await tracker.stop("flora", "r1", StopReason.NOT_FOUND, "gone", at(20)) == 1
    stopped = await row(tracker, "flora", "r1")
    assert (stopped.state, stopped.stop_reason, stopped.last_error) == (
        "stopped",
        "not_found",
        "gone",
    )

    # Registering again is the operator's "try again": no technique keeps the known one.
    assert await tracker.add("flora", "r1", None, at(30), at(30)) == "reactivated"
    again = await row(tracker, "flora", "r1")
    assert (again.state, again.technique, again.next_poll_at) == ("active", "mugshot", at(30))
    assert (again.not_found, again.stop_reason, again.polls) == (0, None, 1)
    assert await tracker.add("flora", "r1", None, at(40), at(40)) == "known"

    await tracker.stop("flora", "r1", StopReason.GAVE_UP, "too long", at(50))
    assert await tracker.add("flora", "r1", "portrait", at(60), at(60)) == "reactivated"
    assert (await row(tracker, "flora", "r1")).technique == "portrait"


async def test_due_is_per_provider_most_overdue_first_and_limited(open_tracker: Opener) -> None:
    tracker = open_tracker()
    for job_id, first in (("a3", 30), ("a1", 10), ("a2", 20), ("later", 500)):
        await tracker.add("apex", job_id, None, at(first), at(0))
    await tracker.add("fliki", "f1", None, at(5), at(0))
    await tracker.add("apex", "done", None, at(1), at(0))
    await tracker.finish("apex", "done", at(1), status="completed", polled=True)
    await tracker.add("apex", "stopped", None, at(2), at(0))
    await tracker.stop("apex", "stopped", StopReason.NOT_FOUND, "404", at(2))
    await tracker.add("flora", "only-done", "mugshot", at(0), at(0))
    await tracker.finish("flora", "only-done", at(0), status="failed", polled=True)

    assert await due_ids(tracker, at(100), "apex") == ["a1", "a2", "a3"]
    assert await due_ids(tracker, at(100), "apex", limit=2) == ["a1", "a2"]
    assert await due_ids(tracker, at(20), "apex") == ["a1", "a2"]  # due at 20 is due at 20
    assert await due_ids(tracker, at(100), "fliki") == ["f1"]
    assert await due_ids(tracker, at(100), "vividflow") == []
    assert await due_ids(tracker, at(0), "apex") == []
    assert await tracker.next_due_by_provider() == {"apex": at(10), "fliki": at(5)}


async def test_claim_is_exclusive_between_two_processes(open_tracker: Opener) -> None:
    one, two = open_tracker(), open_tracker()
    jobs = [f"v{n}" for n in range(12)]
    for job_id in jobs:
        await one.add("vividflow", job_id, None, at(0), at(0))

    # Both processes see the same due jobs and claim them all at once.
    seen_one = await one.due(at(1), 50, provider="vividflow")
    seen_two = await two.due(at(1), 50, provider="vividflow")
    assert len(seen_one) == len(seen_two) == len(jobs)
    won_one, won_two = await asyncio.gather(
        one.claim(seen_one, at(36), at(1)), two.claim(seen_two, at(36), at(1))
    )
    assert won_one.isdisjoint(won_two)
    assert won_one | won_two == {("vividflow", j) for j in jobs}

    # Claimed: nobody sees them until the lease ends, and a late claim of them fails.
    assert await due_ids(two, at(35), "vividflow") == []
    assert await two.claim(seen_two, at(70), at(2)) == set()
    assert (await row(one, "vividflow", "v0")).next_poll_at == at(36)
    assert len(await due_ids(one, at(36), "vividflow")) == len(jobs)

    # Stopped or finished after a process saw it due: not claimable either.
    snapshot = {j.job_id: j for j in await two.due(at(36), 50, provider="vividflow")}
    await one.stop("vividflow", "v0", StopReason.GAVE_UP, "late", at(37))
    await one.finish("vividflow", "v1", at(37), status="completed", polled=True)
    assert await two.claim([snapshot["v0"], snapshot["v1"]], at(90), at(38)) == set()
    rest = [snapshot[j] for j in jobs[2:]]
    assert await two.claim(rest, at(90), at(38)) == {("vividflow", j) for j in jobs[2:]}


async def test_reschedule_drives_the_backoff_and_spares_stopped_jobs(open_tracker: Opener) -> None:
    tracker = open_tracker()
    await tracker.add("fliki", "f", None, at(0), at(0))

    await tracker.reschedule("fliki", "f", at(3), at(0), counted=True, status="progress 10%")
    job = await row(tracker, "fliki", "f")
    assert (job.next_poll_at, job.polls, job.last_status, job.last_error) == (
        at(3),
        1,
        "progress 10%",
        None,
    )
    # A 429: the provider's pause, not the job's poll; the last status stays.
    await tracker.reschedule("fliki", "f", at(33), at(3), counted=False, error="429")
    job = await row(tracker, "fliki", "f")
    assert (job.next_poll_at, job.polls, job.last_status, job.last_error) == (
        at(33),
        1,
        "progress 10%",
        "429",
    )
    for n in (1, 2):
        await tracker.reschedule(
            "fliki", "f", at(40), at(33), counted=True, error="404", not_found=True
        )
        assert (await row(tracker, "fliki", "f")).not_found == n
    await tracker.reschedule("fliki", "f", at(50), at(40), counted=True, status="progress 90%")
    job = await row(tracker, "fliki", "f")
    assert (job.polls, job.not_found, job.last_error) == (4, 0, None)

    await tracker.stop("fliki", "f", StopReason.AUTH, "refused", at(50))
    await tracker.reschedule("fliki", "f", at(60), at(50), counted=True, error="late answer")
    job = await row(tracker, "fliki", "f")
    assert (job.state, job.next_poll_at, job.polls, job.last_error) == (
        "stopped",
        at(50),
        4,
        "refused",
    )


async def test_stop_by_provider_then_resume_after_a_restart(open_tracker: Opener) -> None:
    tracker, restarted = open_tracker(), open_tracker()
    for job_id in ("r1", "r2", "r3"):
        await tracker.add("flora", job_id, "mugshot", at(0), at(0))
    await tracker.finish("flora", "r3", at(1), status="completed", polled=True)
    await tracker.add("vividflow", "v", None, at(0), at(0))
    await tracker.add("vividflow", "gone", None, at(0), at(0))
    await tracker.stop("vividflow", "gone", StopReason.NOT_FOUND, "404 x5", at(1))

    assert await tracker.stop("flora", None, StopReason.AUTH, "bad key", at(2)) == 2
    assert await tracker.stop("flora", None, StopReason.AUTH, "bad key", at(3)) == 0
    for job_id in ("r1", "r2"):
        job = await row(tracker, "flora", job_id)
        assert (job.state, job.stop_reason, job.last_error) == ("stopped", "auth", "bad key")
    assert (await row(tracker, "flora", "r3")).state == "done"
    assert await due_ids(tracker, at(10), "flora") == []
    assert await due_ids(tracker, at(10), "vividflow") == ["v"]
    assert await tracker.next_due_by_provider() == {"vividflow": at(0)}

    stopped = await tracker.stopped(10)
    assert sorted((j.provider, j.job_id, j.stop_reason, j.last_error) for j in stopped) == [
        ("flora", "r1", "auth", "bad key"),
        ("flora", "r2", "auth", "bad key"),
        ("vividflow", "gone", "not_found", "404 x5"),
    ]
    assert len(await tracker.stopped(2)) == 2

    # The next start: jobs stopped for a fixable reason get one more try, the rest do not.
    reasons = (StopReason.AUTH, StopReason.CONFIG)
    assert await restarted.resume_stopped(reasons, at(100)) == 2
    assert await restarted.resume_stopped(reasons, at(101)) == 0
    assert await due_ids(restarted, at(100), "flora") == ["r1", "r2"]
    revived = await row(restarted, "flora", "r1")
    assert (revived.state, revived.stop_reason, revived.next_poll_at) == ("active", None, at(100))
    assert (await row(restarted, "vividflow", "gone")).state == "stopped"
    assert (await row(restarted, "flora", "r3")).state == "done"


async def test_finished_jobs_stay_finished(open_tracker: Opener) -> None:
    tracker = open_tracker()
    await tracker.add("apex", "a", None, at(0), at(0))
    await tracker.reschedule("apex", "a", at(5), at(0), counted=True, error="timeout")
    await tracker.finish("apex", "a", at(6), status="settled:queued", polled=False)
    job = await row(tracker, "apex", "a")
    assert (job.state, job.polls, job.last_status, job.last_error) == (
        "done",
        1,
        "settled:queued",
        None,
    )
    assert await tracker.add("apex", "a", None, at(7), at(7)) == "known"
    assert await tracker.stop("apex", None, StopReason.AUTH, "x", at(8)) == 0
    assert await tracker.resume_stopped((StopReason.AUTH,), at(9)) == 0
    assert await due_ids(tracker, at(1000), "apex") == []
    # A stopped job a webhook settles is finished too.
    await tracker.add("apex", "b", None, at(0), at(0))
    await tracker.stop("apex", "b", StopReason.GAVE_UP, "x", at(1))
    await tracker.finish("apex", "b", at(2), status="settled:archived", polled=False)
    assert (await row(tracker, "apex", "b")).state == "done"
    assert await tracker.resume_stopped((StopReason.GAVE_UP,), at(3)) == 0


async def test_forget_removes_the_entry_and_no_later_write_brings_it_back(
    open_tracker: Opener,
) -> None:
    """`receiver forget` erases the schedule entry too (its job id, technique and last errors).
    A poll claimed before the erasure ends with a reschedule, finish or stop: none of them may
    write the entry again (in DynamoDB an unconditional update would create it)."""
    tracker = open_tracker()
    await tracker.add("flora", "erase", "mugshot", at(0), at(0))
    await tracker.add("flora", "keep", "mugshot", at(0), at(0))
    claimed = await tracker.due(at(1), 10, provider="flora")
    assert await tracker.claim(claimed, at(40), at(1)) == {("flora", "erase"), ("flora", "keep")}

    assert await tracker.forget("flora", "erase") is True
    assert await tracker.get("flora", "erase") is None
    await tracker.reschedule("flora", "erase", at(50), at(2), counted=True, status="queued")
    await tracker.finish("flora", "erase", at(3), status="completed", polled=True)
    assert await tracker.stop("flora", "erase", StopReason.GAVE_UP, "x", at(4)) == 0
    assert await tracker.stop("flora", None, StopReason.AUTH, "bad key", at(5)) == 1  # "keep"
    assert await tracker.resume_stopped((StopReason.AUTH,), at(6)) == 1
    assert await tracker.get("flora", "erase") is None
    assert await due_ids(tracker, at(1000), "flora") == ["keep"]
    assert [j.job_id for j in await tracker.stopped(10)] == []
    assert await tracker.forget("flora", "erase") is False  # nothing left to remove


async def test_dynamodb_claims_only_from_a_current_snapshot(aws_names: tuple[str, str]) -> None:
    """The index may lag: a claim from a copy older than the job's last reschedule fails."""
    table, _ = aws_names
    one, two = DynamoTrackedStore(table), DynamoTrackedStore(table)
    await one.add("apex", "a", None, at(0), at(0))
    old = await two.due(at(1), 10, provider="apex")
    assert await one.claim(await one.due(at(1), 10, provider="apex"), at(36), at(1))
    await one.reschedule("apex", "a", at(2), at(1), counted=True, status="queued")
    assert await two.claim(old, at(40), at(3)) == set()
    assert await two.claim(await two.due(at(3), 10, provider="apex"), at(40), at(3)) == {
        ("apex", "a")
    }


def test_the_table_definition_matches_the_stack_template() -> None:
    """infra/receiver.yaml creates the table the tests create (attributes, keys, indexes)."""
    from cfnlint.decode import cfn_yaml

    template = cfn_yaml.load(str(TEMPLATE))
    deployed = json.loads(json.dumps(template["Resources"]["LedgerTable"]["Properties"]))
    ours = table_definition("any")

    def attributes(defs: list[dict[str, str]]) -> dict[str, str]:
        return {d["AttributeName"]: d["AttributeType"] for d in defs}

    assert attributes(deployed["AttributeDefinitions"]) == attributes(ours["AttributeDefinitions"])
    assert deployed["KeySchema"] == ours["KeySchema"]
    by_name = {i["IndexName"]: i for i in deployed["GlobalSecondaryIndexes"]}
    assert by_name == {i["IndexName"]: i for i in ours["GlobalSecondaryIndexes"]}
    assert "polling" in by_name


# --- scale-out: one schedule for every replica ---------------------------------------------


@pytest.fixture
def aws_names(moto_s3: str) -> tuple[str, str]:
    """A table and queue names for `dynamodb://` and `sqs://` (fresh ones per test)."""
    serialize_moto()
    return create_table(f"t-{uuid.uuid4().hex[:12]}"), create_queues(f"q-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def sim() -> Iterator[Simulator]:
    simulator = Simulator()
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


async def test_a_job_registered_on_a_serve_replica_is_polled_by_one_worker(
    tmp_path: Path, aws_names: tuple[str, str], sim: Simulator
) -> None:
    table, queue = aws_names

    def replica(name: str) -> Parts:
        settings = demo_settings(
            tmp_path,
            sim,
            ledger_url=f"dynamodb://{table}",
            queue_url=f"sqs://{queue}",
            local_db=str(tmp_path / f"{name}.db"),  # what each replica keeps to itself
        )
        parts = build_parts(settings)
        parts.db.start()
        return parts

    serve, worker_a, worker_b = replica("serve"), replica("worker-a"), replica("worker-b")
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(serve)), base_url="http://receiver.test"
    )
    jobs = [f"v{n}" for n in range(4)]
    try:
        for job_id in jobs:
            sim.add_job("vividflow", job_id, outputs=[(2_000, "video/mp4")], after=0)
            response = await client.post(
                "/jobs",
                json={"provider": "vividflow", "job_id": job_id, "metadata": {"n": job_id}},
                headers={"Authorization": f"Bearer {serve.settings.api_token.get_secret_value()}"},
            )
            assert response.status_code == 201, response.text

        # Two workers tick side by side until every job has its answer.
        for _ in range(50):
            assert worker_a.poller is not None and worker_b.poller is not None
            await asyncio.gather(worker_a.poller.tick(), worker_b.poller.tick())
            states = [await serve.ledger.job("vividflow", j) for j in jobs]
            if all(s is not None and s.state.value == "queued" for s in states):
                break
        assert [sim.jobs[("vividflow", j)].status_calls for j in jobs] == [1] * len(jobs)
        assert serve.poller is not None and status_calls(serve) == 0
        assert status_calls(worker_a) + status_calls(worker_b) == len(jobs)
        for job_id in jobs:
            done = await serve.poller.tracked.get("vividflow", job_id)
            assert done is not None and (done.state, done.polls) == ("done", 1)

        # And the worker archives what it found, through the shared queue.
        for _ in jobs:
            assert await worker_b.archiver.run_once()
        job = await serve.ledger.job("vividflow", jobs[0])
        assert job is not None and job.state.value == "archived"
        assert job.tracking is not None and job.tracking["metadata"] == {"n": jobs[0]}
    finally:
        await client.aclose()
        for parts in (serve, worker_a, worker_b):
            await parts.stop()


def test_cli_track_registers_into_the_shared_table(aws_names: tuple[str, str]) -> None:
    table, queue = aws_names
    env = {
        "RECEIVER_LEDGER_URL": f"dynamodb://{table}",
        "RECEIVER_QUEUE_URL": f"sqs://{queue}",
        "RECEIVER_ARCHIVE_URL": "s3://bucket/archive",
        "RECEIVER_FLORA_API_KEY": "k",
    }
    args = ["track", "flora", "run-1", "--technique", "mugshot", "--metadata", '{"a": 1}']
    first = CliRunner().invoke(cli, args, env=env)
    again = CliRunner().invoke(cli, args, env=env)
    assert first.exit_code == 0, first.output
    assert first.output.startswith("tracking: flora/run-1 (job tracking, polling active")
    assert again.exit_code == 0 and again.output.startswith("already_tracked")

    async def check() -> None:
        tracked = await DynamoTrackedStore(table).get("flora", "run-1")
        assert tracked is not None and (tracked.state, tracked.technique) == ("active", "mugshot")
        job = await DynamoLedger(table).job("flora", "run-1")
        assert job is not None and job.tracking is not None
        assert (job.tracking["metadata"], job.tracking["registered_by"]) == ({"a": 1}, "cli")

    asyncio.run(check())


def status_calls(parts: Any) -> float:
    """Status API calls one process made, from its own /metrics registry."""
    return sum(
        sample.value
        for metric in parts.metrics.registry.collect()
        if metric.name == "receiver_status_calls"
        for sample in metric.samples
        if sample.name == "receiver_status_calls_total"
    )
