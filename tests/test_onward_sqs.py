"""An SQS queue as an onward destination, on moto's server: the message is the event's stored
bytes with its id and type as attributes; a FIFO queue deduplicates a resend by the event id and
keeps a job's events in one group; a queue that does not exist ends the series with a reason."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest

from receiver.ledger.events import EventFilter
from tests.conftest import LOCAL_SOURCES, Harness, HarnessFactory
from tests.sources import SourceServer
from tests.test_archiver import completed
from tests.test_onward_schema import assert_valid

pytestmark = pytest.mark.anyio


def sqs() -> Any:
    return boto3.session.Session().client("sqs")


async def harness_to(factory: HarnessFactory, queue: str) -> Harness:
    h: Harness = await factory(
        **LOCAL_SOURCES,
        onward_endpoints=json.dumps([{"name": "queue", "url": f"sqs://{queue}"}]),
        onward_retry_schedule="5,5",
    )
    return h


async def archive_and_send(h: Harness, source: SourceServer, job_id: str) -> None:
    url = source.add(f"/o/{job_id}.png", 1000, content_type="image/png")
    await completed(h, job_id, url)
    assert await h.parts.archiver.run_once()
    assert h.parts.sender is not None
    await h.parts.sender.drain()


def receive_all(url: str) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while True:
        batch = (
            sqs()
            .receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=10,
                MessageAttributeNames=["All"],
                AttributeNames=["All"],
                WaitTimeSeconds=0,
            )
            .get("Messages", [])
        )
        if not batch:
            return got
        got += batch


async def test_each_event_becomes_one_message_with_the_ledgers_bytes(
    moto_s3: str, harness_factory: HarnessFactory, source_server: SourceServer
) -> None:
    name = f"onward-{uuid.uuid4().hex[:8]}"
    url = sqs().create_queue(QueueName=name)["QueueUrl"]
    h = await harness_to(harness_factory, name)
    await archive_and_send(h, source_server, "q1")

    stored = {e.id: e.body for e in await h.parts.ledger.events(EventFilter(job_id="q1"), 10)}
    messages = receive_all(url)
    assert len(messages) == len(stored) == 2
    for m in messages:
        event_id = m["MessageAttributes"]["event_id"]["StringValue"]
        assert m["Body"].encode() == stored[event_id]
        assert m["MessageAttributes"]["event_type"]["StringValue"] == json.loads(m["Body"])["type"]
        assert_valid(m["Body"].encode())
        assert "/o/q1.png" not in m["Body"]
    (event,) = await h.parts.ledger.events(EventFilter(job_id="q1", type="job.archived"), 1)
    assert [s.state for s in event.sends] == ["delivered"]


async def test_a_fifo_queue_dedupes_a_resend_and_groups_by_job(
    moto_s3: str, harness_factory: HarnessFactory, source_server: SourceServer
) -> None:
    name = f"onward-{uuid.uuid4().hex[:8]}.fifo"
    url = sqs().create_queue(QueueName=name, Attributes={"FifoQueue": "true"})["QueueUrl"]
    h = await harness_to(harness_factory, name)
    await archive_and_send(h, source_server, "f1")
    # A replay resends the same id and bytes: the queue's deduplication drops the copy.
    replayed = await h.parts.ledger.replay(EventFilter(job_id="f1"), None, h.clock(), 10)
    assert len(replayed) == 2
    assert h.parts.sender is not None
    await h.parts.sender.drain()

    messages = receive_all(url)
    assert [json.loads(m["Body"])["type"] for m in messages] == ["asset.archived", "job.archived"]
    for m in messages:
        assert m["Attributes"]["MessageGroupId"] == "apex/f1"
        assert m["Attributes"]["MessageDeduplicationId"] == json.loads(m["Body"])["id"]


async def test_a_missing_queue_ends_the_series_with_the_reason(
    moto_s3: str, harness_factory: HarnessFactory, source_server: SourceServer
) -> None:
    h = await harness_to(harness_factory, f"missing-{uuid.uuid4().hex[:8]}")
    await archive_and_send(h, source_server, "m1")
    (event,) = await h.parts.ledger.events(EventFilter(job_id="m1", type="asset.archived"), 1)
    full = await h.parts.ledger.event(event.id)
    assert full is not None
    (send,) = full.sends
    # Final at once (no retry changes a missing queue), recorded, and said.
    assert send.state == "failed"
    assert send.attempts == 1
    assert send.last_error is not None and "NonExistentQueue" in send.last_error
    assert "AKIA" not in send.last_error and "Signature" not in send.last_error


TEMPLATE = Path(__file__).parent.parent / "infra" / "receiver.yaml"


def deploy(name: str, parameters: dict[str, str]) -> dict[str, str]:
    cfn = boto3.session.Session().client("cloudformation")
    cfn.create_stack(
        StackName=name,
        TemplateBody=TEMPLATE.read_text(),
        Capabilities=["CAPABILITY_IAM"],
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
    )
    stack = cfn.describe_stacks(StackName=name)["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
    return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}


def stack_policies(name: str) -> dict[str, list[dict[str, Any]]]:
    """The statements of each managed policy the stack made, by logical id."""
    cfn = boto3.session.Session().client("cloudformation")
    iam = boto3.session.Session().client("iam")
    found: dict[str, list[dict[str, Any]]] = {}
    for r in cfn.describe_stack_resources(StackName=name)["StackResources"]:
        if r.get("ResourceType") != "AWS::IAM::ManagedPolicy":  # moto omits unsupported ones
            continue
        policy = iam.get_policy(PolicyArn=r["PhysicalResourceId"])["Policy"]
        document = iam.get_policy_version(
            PolicyArn=policy["Arn"], VersionId=policy["DefaultVersionId"]
        )["PolicyVersion"]["Document"]
        document = json.loads(document) if isinstance(document, str) else document
        found[r["LogicalResourceId"]] = document["Statement"]
    return found


def role_policies() -> list[Any]:
    """ServiceRole's ManagedPolicyArns as the template writes them (moto's CloudFormation does
    not attach them), with the short-form intrinsic functions read by cfn-lint's decoder."""
    from cfnlint.decode import decode_str

    template, errors = decode_str(TEMPLATE.read_text())
    assert not errors
    arns: list[Any] = template["Resources"]["ServiceRole"]["Properties"]["ManagedPolicyArns"]
    return arns


def test_the_template_lets_the_service_send_to_the_onward_queue_and_only_there(
    moto_s3: str,
) -> None:
    name = f"ow{uuid.uuid4().hex[:8]}"
    queue = sqs().create_queue(QueueName=f"{name}-app-events")["QueueUrl"]
    arn = sqs().get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    outputs = deploy(name, {"ServiceName": name, "OnwardQueueArn": arn})
    policies = stack_policies(name)
    assert policies["OnwardQueuePolicy"] == [
        {
            "Sid": "OnwardQueue",
            "Effect": "Allow",
            "Action": ["sqs:SendMessage", "sqs:GetQueueUrl"],
            "Resource": arn,
        }
    ]
    # Nothing else in the service's permissions names the application's queue.
    assert arn not in json.dumps(policies["ServicePolicy"])
    assert {
        "Fn::If": ["HasOnwardQueue", {"Ref": "OnwardQueuePolicy"}, {"Ref": "AWS::NoValue"}]
    } in (role_policies())
    assert "OnwardQueuePolicyArn" in outputs


def test_without_an_onward_queue_the_stack_grants_no_send_to_it(moto_s3: str) -> None:
    name = f"ow{uuid.uuid4().hex[:8]}"
    outputs = deploy(name, {"ServiceName": name})
    assert set(stack_policies(name)) == {"ServicePolicy", "ErasurePolicy"}
    assert "OnwardQueuePolicyArn" not in outputs
