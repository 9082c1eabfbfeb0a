"""The whole pipeline on AWS-shaped infrastructure, with several processes at once.

infra/receiver.yaml is deployed into moto's CloudFormation (moto's server in a child process);
the stack's Outputs become the environment of two `receiver serve --no-workers` processes and
two `receiver worker` processes. A few hundred signed webhooks (every job delivered to both
receivers at once, some again under a new webhook id) must end as: one accepted delivery per job,
every job archived, one object per job in the bucket, one download per source file.

What this cannot prove (moto's limits, see DESIGN.md): bucket versioning/lifecycle/Object Lock
settings from the template, IAM enforcement, DynamoDB transaction conflicts under real load.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from receiver.ledger import JobFilter
from receiver.ledger.dynamodb import DynamoLedger
from receiver.workqueue.sqs import SqsQueue
from tests.payloads import APEX_SECRET, apex_completed, signed
from tests.s3server import point_boto3_at, stop_child, wait_until_serving
from tests.sources import SourceServer, expected_sha256

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TEMPLATE = Path(__file__).parent.parent / "infra" / "receiver.yaml"
JOBS = 100
RESENT = 50  # jobs delivered a third time, under a new webhook id
SIZE = 3000


def deploy(name: str) -> dict[str, str]:
    """Create the stack and return its Outputs."""
    session: Any = boto3.session.Session()
    cfn = session.client("cloudformation")
    cfn.create_stack(
        StackName=name,
        TemplateBody=TEMPLATE.read_text(),
        Capabilities=["CAPABILITY_IAM"],
        Parameters=[{"ParameterKey": "ServiceName", "ParameterValue": name}],
    )
    deadline = time.monotonic() + 30
    while True:
        stack = cfn.describe_stacks(StackName=name)["Stacks"][0]
        if not stack["StackStatus"].endswith("_IN_PROGRESS"):
            break
        assert time.monotonic() < deadline, "stack creation did not finish"
        time.sleep(0.1)
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
    return {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}


MOTO = """
import sys
from tests.test_contract import serialize_moto
serialize_moto()
from moto.server import main
main(["-H", "127.0.0.1", "-p", sys.argv[1]])
"""


@contextlib.contextmanager
def moto_child(logs: Path) -> Iterator[str]:
    """moto's server in a child process (made thread-safe, see serialize_moto); its endpoint."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with (logs / "moto.log").open("wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", MOTO, str(port)],
            cwd=Path(__file__).parent.parent,
            stdout=out,
            stderr=out,
        )
    try:
        wait_until_serving(endpoint, child)
        yield endpoint
    finally:
        stop_child(child)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def processes(commands: list[list[str]], env: dict[str, str], cwd: Path) -> Iterator[list[Path]]:
    """Run the commands; yield their log files; stop them (SIGTERM, then SIGKILL) afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for i, command in enumerate(commands):
            log = cwd / f"process-{i}.log"
            logs.append(log)
            with log.open("wb") as out:
                started.append(subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=out))
        yield logs
    finally:
        for child in started:
            child.terminate()
        for child in started:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs)


async def wait_healthy(ports: list[int], logs: list[Path]) -> None:
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(trust_env=False) as client:
        for port in ports:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    ready = await client.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                    if ready.status_code == 200:
                        break
                assert time.monotonic() < deadline, "a receiver did not start\n" + tails(logs)
                await asyncio.sleep(0.1)


async def test_two_receivers_and_two_workers_archive_every_job_exactly_once(
    tmp_path: Path,
) -> None:
    with contextlib.ExitStack() as stack:
        endpoint = stack.enter_context(moto_child(tmp_path))
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        point_boto3_at(mp, endpoint)
        outputs = deploy("scaleout")
        assert outputs["LedgerUrl"] == "dynamodb://scaleout-ledger"
        assert outputs["QueueUrl"] == "sqs://scaleout-tasks"
        assert outputs["ArchiveUrl"].startswith("s3://scaleout-archive-")

        bucket, _, prefix = outputs["ArchiveUrl"][len("s3://") :].partition("/")
        s3: Any = boto3.session.Session().client("s3")
        # moto ignores the template's versioning; switch it on as the real stack has it, so a
        # second write of any object would show as a second version below.
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})

        source = SourceServer()
        source.start()
        stack.callback(source.stop)

        env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
        env.update(
            RECEIVER_LEDGER_URL=outputs["LedgerUrl"],
            RECEIVER_QUEUE_URL=outputs["QueueUrl"],
            RECEIVER_ARCHIVE_URL=outputs["ArchiveUrl"],
            RECEIVER_WEBHOOK_PROVIDERS="apex",
            RECEIVER_APEX_WEBHOOK_SECRETS=APEX_SECRET,
            RECEIVER_APEX_DOWNLOAD_HOSTS="127.0.0.1",
            RECEIVER_FETCH_ALLOW_HTTP="true",
            RECEIVER_FETCH_ALLOW_NETWORKS="127.0.0.0/8",
            RECEIVER_WORKERS="8",
            RECEIVER_LOG_FORMAT="json",
            RECEIVER_LOG_LEVEL="warning",
        )
        ports = [free_port(), free_port()]
        serve = [sys.executable, "-m", "receiver", "serve", "--no-workers", "--port"]
        worker = [sys.executable, "-m", "receiver", "worker"]
        commands = [[*serve, str(p)] for p in ports] + [worker, worker]
        for i in range(len(commands)):
            (tmp_path / f"p{i}").mkdir()
        # Each process gets its own working directory (and so its own local SQLite file).
        logs = [
            stack.enter_context(processes([command], env, tmp_path / f"p{i}"))[0]
            for i, command in enumerate(commands)
        ]
        await wait_healthy(ports, logs)

        now = datetime.now(UTC)
        bodies: dict[str, list[tuple[bytes, dict[str, str]]]] = {}
        for j in range(JOBS):
            job = f"job-{j:04d}"
            path = f"/out/{job}.png"
            url = source.add(path, SIZE, content_type="image/png")
            # Half complete "now" (normal lane), half 22 h ago (due within 2 h: urgent lane).
            completed = now - timedelta(hours=22 if j % 2 else 0)
            payload = apex_completed(
                job, url=url, completed_at=completed.strftime("%Y-%m-%dT%H:%M:%SZ")
            )
            first = signed(payload, APEX_SECRET)
            bodies[job] = [first, first]  # the same webhook to both receivers at once
            if j < RESENT:
                bodies[job].append(signed(payload, APEX_SECRET))  # redelivered, new id

        limit = asyncio.Semaphore(24)
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:

            async def send(job: str, k: int, body: bytes, headers: dict[str, str]) -> int:
                async with limit:
                    port = ports[k % 2]
                    response = await client.post(
                        f"http://127.0.0.1:{port}/webhooks/apex", content=body, headers=headers
                    )
                    return response.status_code

            sends = [
                (job, send(job, k, body, headers))
                for job, deliveries in bodies.items()
                for k, (body, headers) in enumerate(deliveries)
            ]
            codes = await asyncio.gather(*(c for _, c in sends))
        by_job: dict[str, list[int]] = {}
        for (job, _), code in zip(sends, codes, strict=True):
            by_job.setdefault(job, []).append(code)
        assert all(sorted(c) == [200] * (len(c) - 1) + [202] for c in by_job.values()), (
            sorted(set(map(tuple, by_job.values()))),
            tails(logs),
        )

        ledger = DynamoLedger.from_url(outputs["LedgerUrl"])
        deadline = time.monotonic() + 60
        while True:
            archived = await ledger.list_jobs(
                JobFilter(state="archived"), before_seq=None, limit=JOBS + 1
            )
            if len(archived) == JOBS:
                break
            assert time.monotonic() < deadline, f"{len(archived)}/{JOBS} archived\n" + tails(logs)
            await asyncio.sleep(0.25)

        # The ledger: each job once, one archived asset with the source's digest, all history.
        listed = await ledger.list_jobs(JobFilter(), before_seq=None, limit=JOBS + 10)
        assert sorted(s.job_id for s in listed) == sorted(bodies)
        for job, deliveries in bodies.items():
            record = await ledger.job("apex", job)
            assert record is not None
            assert len(record.deliveries) == len(deliveries)
            assert [d.outcome for d in record.deliveries].count("accepted") == 1
            assert [(a.state, a.sha256) for a in record.assets] == [
                ("archived", expected_sha256(f"/out/{job}.png", SIZE))
            ]
            # Downloaded once: no worker copied an asset another had archived.
            gets = [r for r in source.requests(f"/out/{job}.png") if r.method == "GET"]
            assert len(gets) == 1, job

        # The bucket: one object per job (listed by version, so a second write would show), beside
        # its manifest.
        versions: list[str] = []
        for page in s3.get_paginator("list_object_versions").paginate(
            Bucket=bucket, Prefix=prefix + "/"
        ):
            versions.extend(v["Key"] for v in page.get("Versions", []))
        data = [k for k in versions if not k.endswith("/manifest.json")]
        assert len(data) == len(set(data)) == JOBS
        assert {k.rsplit("/", 1)[1] for k in data} == {f"{job}.png" for job in bodies}

        # The queues drain, nothing dead-lettered. A job is archived when its asset is recorded;
        # its manifest task and the last message's delete follow, so wait for them (bounded).
        queue = SqsQueue.from_url(outputs["QueueUrl"], wait_seconds=0)
        drained = time.monotonic() + 30
        while True:
            stats = await queue.stats(now)
            if (stats.ready, stats.leased) == (0, 0) or time.monotonic() > drained:
                break
            await asyncio.sleep(0.25)
        assert (stats.ready, stats.leased, stats.dead) == (0, 0, 0), tails(logs)
