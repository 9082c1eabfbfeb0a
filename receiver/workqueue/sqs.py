"""The SQS queue: archive tasks as SQS messages, the visibility timeout as the lease.

Queues (`RECEIVER_QUEUE_URL=sqs://NAME`; infra/receiver.yaml creates all three):

- `NAME-urgent`: tasks whose deadline is within `urgent_window` (3 h by default) when sent;
- `NAME`: everything else;
- `NAME-dlq`: the dead-letter queue of both lanes. SQS moves a message there by itself after
  `maxReceiveCount` receives (the redrive policy: a poison message whose worker keeps dying
  before it can answer); `dead_letter` also parks a copy there, with the reason, when the
  archiver gives up, so the DLQ depth is "tasks that need an operator".

Mapping of the port:

- `lease`: ReceiveMessage with `VisibilityTimeout = lease_for`, the urgent lane first and the
  normal lane only when the urgent one is empty. `attempt` is SQS's ApproximateReceiveCount.
- `heartbeat`: ChangeMessageVisibility (the archiver calls it every third of the lease while a
  copy runs). SQS caps one receive's visibility at 12 hours in total: a single copy may not run
  longer than that.
- `ack`: DeleteMessage. `retry`: ChangeMessageVisibility to the backoff delay (the message comes
  back then, with its receive count one higher). `requeue`: a fresh message to the back of the
  lane, then delete (the receive count starts again, so the redrive policy's `maxReceiveCount`
  never dead-letters a slow copy that keeps making progress). `dead_letter`: copy to the DLQ,
  then delete.
- `stats`: GetQueueAttributes (approximate by nature). `oldest_ready_at` is None: SQS exposes the
  age of the oldest message only as a CloudWatch metric (ApproximateAgeOfOldestMessage), which
  is where an operator on AWS should alarm.

Deadline ordering, approximated. SQLite leases strictly earliest-deadline-first; SQS has no
priorities, and FIFO queues would order by arrival, not by deadline. Two lanes get most of the
value: a Fliki output (3 h window) sent while a day-long Apex backlog waits is leased first,
because workers drain the urgent lane before touching the other. What is lost: within a lane
order is SQS's best-effort arrival order, not EDF; a task's lane is chosen once, when it is sent,
so a normal-lane task does not move to the urgent lane as its deadline approaches (refreshed
links do not re-send either); and if the urgent lane never empties, the normal lane waits — by
then capacity is short of the deadlines anyway, which the urgent lane's depth shows first.

Messages are sent by the DynamoDB ledger's outbox (`publish`), after the ledger commit; see
receiver/ledger/dynamodb/. SQS standard queues deliver at least once, and the outbox may
re-send, so two workers can hold messages for the same task at once. `claims` (the ledger's
conditional claim on the task's item, receiver/ledger/dynamodb/claims.py) settles it: `lease`
claims the task and leaves a message whose task a live worker holds invisible until that claim
ends; `heartbeat` renews the claim (a lost claim is a lost lease); ack/retry/dead_letter
release it. A later duplicate finds the asset archived in the ledger and is only acknowledged.

The DLQ also receives messages the redrive policy moves (after `maxReceiveCount` receives);
`reconcile_dead_letters`, run with the outbox relay, ends their assets in the ledger with that
reason (`on_redriven`) and parks them again with it.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from botocore.exceptions import ClientError

from receiver.backends.aws import client, error_code, resource_name, run_blocking
from receiver.workqueue import Lease, QueueStats, TaskClaims, TaskMessage

log = structlog.get_logger(__name__)

URGENT_SUFFIX = "-urgent"
DLQ_SUFFIX = "-dlq"
MAX_VISIBILITY = 12 * 3600  # SQS: at most 12 hours from the receive
_GONE = frozenset({"ReceiptHandleIsInvalid", "InvalidParameterValue", "MessageNotInflight"})


def utc_now() -> datetime:
    return datetime.now(UTC)


class SqsQueue:
    def __init__(
        self,
        name: str,
        *,
        sqs: Any | None = None,
        urgent_window: timedelta = timedelta(hours=3),
        wait_seconds: int = 1,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.name = name
        self.sqs = sqs if sqs is not None else client("sqs")
        self.urgent_window = urgent_window
        # Long-poll each lane this long when it is empty (0: short polls, for tests). The
        # archiver waits again between empty leases, so an idle worker costs few requests.
        self.wait_seconds = wait_seconds
        self.clock = clock  # `retry` gets an absolute time; SQS wants a delay
        self._urls: dict[str, str] = {}
        # Set by build_parts to the ledger's outbox relay; run on the first lease (worker start)
        # and then at most every relay_every, in the background of whoever leases.
        self.relay: Callable[[datetime], Any] | None = None
        self.relay_every = timedelta(seconds=30)
        self._relayed_at: datetime | None = None
        # Set by build_parts: the claim on the task's ledger item (one copy of an asset at a
        # time, whatever SQS delivers twice), and the ledger update for tasks the redrive policy
        # moved to the DLQ (True if that ended a pending asset). Run on the relay's cadence.
        self.claims: TaskClaims | None = None
        self.on_redriven: Callable[[str, str, int, str], Awaitable[bool]] | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SqsQueue:
        return cls(resource_name(url, "sqs", "RECEIVER_QUEUE_URL"), **options)

    # -- queue names ----------------------------------------------------------------------------

    @property
    def lanes(self) -> tuple[str, str]:
        return (self.name + URGENT_SUFFIX, self.name)

    @property
    def dlq(self) -> str:
        return self.name + DLQ_SUFFIX

    def _url(self, queue: str) -> str:
        url = self._urls.get(queue)
        if url is None:
            url = self._urls[queue] = self.sqs.get_queue_url(QueueName=queue)["QueueUrl"]
        return url

    def lane_for(self, deadline: datetime, now: datetime) -> str:
        return self.lanes[0] if deadline - now <= self.urgent_window else self.lanes[1]

    # -- sending (the ledger's outbox) ----------------------------------------------------------

    async def publish(self, tasks: Sequence[TaskMessage], now: datetime) -> None:
        """Send tasks, each to its lane; raises if any could not be sent (the outbox re-sends)."""
        if tasks:
            await run_blocking(self._publish, list(tasks), now)

    def _publish(self, tasks: list[TaskMessage], now: datetime) -> None:
        by_lane: dict[str, list[TaskMessage]] = {}
        for task in tasks:
            by_lane.setdefault(self.lane_for(task.deadline, now), []).append(task)
        for lane, batch in by_lane.items():
            for start in range(0, len(batch), 10):  # SendMessageBatch takes at most 10
                chunk = batch[start : start + 10]
                answer = self.sqs.send_message_batch(
                    QueueUrl=self._url(lane),
                    Entries=[{"Id": str(i), "MessageBody": t.body()} for i, t in enumerate(chunk)],
                )
                if answer.get("Failed"):
                    raise RuntimeError(f"SQS refused {len(answer['Failed'])} message(s) on {lane}")

    # -- the port -------------------------------------------------------------------------------

    async def lease(self, owner: str, now: datetime, lease_for: timedelta) -> Lease | None:
        self._maybe_relay(now)
        return await run_blocking(self._lease, owner, lease_for, now)

    def _lease(self, owner: str, lease_for: timedelta, now: datetime) -> Lease | None:
        for lane in self.lanes:
            answer = self.sqs.receive_message(
                QueueUrl=self._url(lane),
                MaxNumberOfMessages=1,
                VisibilityTimeout=_seconds(lease_for),
                WaitTimeSeconds=self.wait_seconds,
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            )
            for message in answer.get("Messages", []):
                try:
                    task = json.loads(message["Body"])
                    lease = Lease(
                        task_id=0,
                        provider=str(task["provider"]),
                        job_id=str(task["job_id"]),
                        n=int(task["n"]),
                        deadline=datetime.fromtimestamp(float(task["deadline"]), tz=UTC),
                        attempt=int(message["Attributes"]["ApproximateReceiveCount"]),
                        owner=owner,
                        handle=f"{lane}\n{message['ReceiptHandle']}",
                        traceparent=_text_or_none(task.get("traceparent")),
                    )
                except (KeyError, TypeError, ValueError):
                    # Not ours or corrupt: park it where an operator will see it.
                    log.error("sqs_message_unreadable", queue=lane)
                    self._to_dlq(message["Body"], "unreadable task message")
                    self.sqs.delete_message(
                        QueueUrl=self._url(lane), ReceiptHandle=message["ReceiptHandle"]
                    )
                    continue
                held = self._claim(lease, now.timestamp(), lease_for)
                if held is None:
                    return lease
                # Another worker copies this asset right now (a duplicate message): leave this
                # one for when that claim ends; by then the asset is archived or free again.
                log.info("sqs_task_claimed_elsewhere", job_id=lease.job_id, n=lease.n)
                self._change_visibility(
                    lease, _seconds(timedelta(seconds=held - now.timestamp())) + 1
                )
        return None

    def _claim(self, lease: Lease, now: float, lease_for: timedelta) -> float | None:
        if self.claims is None:
            return None
        return self.claims.claim(
            lease.provider, lease.job_id, lease.n, lease.owner, now, now + _seconds(lease_for)
        )

    def _release(self, lease: Lease) -> None:
        if self.claims is None:
            return
        try:
            self.claims.release(lease.provider, lease.job_id, lease.n, lease.owner)
        except Exception:
            # It lapses by itself at the end of the lease.
            log.warning("sqs_claim_release_failed", exc_info=True)

    async def heartbeat(self, lease: Lease, now: datetime, lease_for: timedelta) -> bool:
        def beat() -> bool:
            if not self._change_visibility(lease, _seconds(lease_for)):
                return False
            # The claim too: if it lapsed and another worker took it, this lease is lost.
            return self._claim(lease, now.timestamp(), lease_for) is None

        return await run_blocking(beat)

    async def ack(self, lease: Lease) -> None:
        def ack() -> None:
            self._delete(lease)
            self._release(lease)

        await run_blocking(ack)

    async def retry(self, lease: Lease, not_before: datetime, error: str) -> None:
        delay = (not_before - self.clock()).total_seconds()

        # The message reappears after the delay with its receive count (our attempt) one higher.
        def retry() -> None:
            self._change_visibility(lease, max(0, min(MAX_VISIBILITY - 60, math.ceil(delay))))
            self._release(lease)

        await run_blocking(retry)

    async def requeue(self, lease: Lease, note: str) -> None:
        # A fresh message at the back of the task's lane (its receive count, our attempt, starts
        # again), then the old one deleted. A crash between the two leaves a duplicate, which
        # the claim settles like any other.
        def requeue() -> None:
            body = TaskMessage(
                lease.provider,
                lease.job_id,
                lease.n,
                lease.deadline,
                gen="requeue",
                traceparent=lease.traceparent,
            ).body()
            lane = self.lane_for(lease.deadline, self.clock())
            self.sqs.send_message(QueueUrl=self._url(lane), MessageBody=body)
            self._delete(lease)
            self._release(lease)

        await run_blocking(requeue)

    async def dead_letter(self, lease: Lease, error: str) -> None:
        def park() -> None:
            body = TaskMessage(
                lease.provider, lease.job_id, lease.n, lease.deadline, gen="dead-letter"
            ).body()
            self._to_dlq(body, error)
            self._delete(lease)
            self._release(lease)

        await run_blocking(park)

    async def reconcile_dead_letters(self, limit: int = 100) -> int:
        """End in the ledger the tasks SQS's redrive policy moved to the DLQ; how many ended.

        The redrive policy moves a message after `maxReceiveCount` receives without an answer
        (its workers kept dying or stalling), without telling the ledger, whose asset would stay
        pending forever. Each such message (one without our `error` attribute) is handed to
        `on_redriven`, then parked again with the reason, so the DLQ still lists every task that
        needs an operator and the next pass skips it.
        """
        if self.on_redriven is None:
            return 0
        ended = 0
        for _ in range(max(1, limit // 10)):
            answer = await run_blocking(self._receive_dlq)
            messages = answer.get("Messages", [])
            if not messages:
                break
            for message in messages:
                if "error" in message.get("MessageAttributes", {}):
                    continue  # parked by a worker, with its reason: already in the ledger
                receives = message.get("Attributes", {}).get("ApproximateReceiveCount", "?")
                reason = (
                    f"dead-lettered by the queue's redrive policy after {receives} receives "
                    "without an answer (workers kept dying or stalling on this task)"
                )
                try:
                    task = json.loads(message["Body"])
                    provider, job_id, n = str(task["provider"]), str(task["job_id"]), int(task["n"])
                except (KeyError, TypeError, ValueError):
                    reason = "unreadable task message (moved by the redrive policy)"
                    await run_blocking(self._repark, message, reason)
                    continue
                if await self.on_redriven(provider, job_id, n, reason):
                    ended += 1
                    log.warning("sqs_redriven_task_ended", job_id=job_id, n=n, error=reason)
                    await run_blocking(self._repark, message, reason)
                else:
                    # Archived or ended meanwhile: nothing for an operator to do.
                    await run_blocking(self._delete_dlq, message)
        return ended

    def _receive_dlq(self) -> Any:
        return self.sqs.receive_message(
            QueueUrl=self._url(self.dlq),
            MaxNumberOfMessages=10,
            VisibilityTimeout=300,  # not seen again by this pass or the next few
            WaitTimeSeconds=0,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["ApproximateReceiveCount"],
        )

    def _repark(self, message: dict[str, Any], reason: str) -> None:
        self._to_dlq(message["Body"], reason)
        self._delete_dlq(message)

    def _delete_dlq(self, message: dict[str, Any]) -> None:
        self.sqs.delete_message(
            QueueUrl=self._url(self.dlq), ReceiptHandle=message["ReceiptHandle"]
        )

    async def stats(self, now: datetime) -> QueueStats:
        def read() -> QueueStats:
            ready = leased = 0
            for lane in self.lanes:
                attrs = self._attributes(lane)
                ready += attrs.get("ApproximateNumberOfMessages", 0)
                ready += attrs.get("ApproximateNumberOfMessagesDelayed", 0)
                # In flight: leased, or waiting out a retry delay (SQS cannot tell them apart).
                leased += attrs.get("ApproximateNumberOfMessagesNotVisible", 0)
            parked = self._attributes(self.dlq)
            # In flight too: the DLQ reconciliation keeps the messages it read invisible a while.
            dead = parked.get("ApproximateNumberOfMessages", 0)
            dead += parked.get("ApproximateNumberOfMessagesNotVisible", 0)
            return QueueStats(ready=ready, leased=leased, dead=dead, oldest_ready_at=None)

        return await run_blocking(read)

    # -- helpers --------------------------------------------------------------------------------

    def _attributes(self, queue: str) -> dict[str, int]:
        answer = self.sqs.get_queue_attributes(
            QueueUrl=self._url(queue),
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ],
        )
        return {k: int(v) for k, v in answer.get("Attributes", {}).items()}

    def _change_visibility(self, lease: Lease, seconds: int) -> bool:
        lane, receipt = lease.handle.split("\n", 1)
        try:
            self.sqs.change_message_visibility(
                QueueUrl=self._url(lane), ReceiptHandle=receipt, VisibilityTimeout=seconds
            )
        except ClientError as exc:
            if error_code(exc) in _GONE or "NotInflight" in error_code(exc):
                return False  # the lease lapsed and the message went back (or to someone else)
            raise
        return True

    def _delete(self, lease: Lease) -> None:
        lane, receipt = lease.handle.split("\n", 1)
        try:
            self.sqs.delete_message(QueueUrl=self._url(lane), ReceiptHandle=receipt)
        except ClientError as exc:
            if error_code(exc) not in _GONE:
                raise
            # Our lease lapsed: whoever holds the message now will end it.

    def _to_dlq(self, body: str, error: str) -> None:
        self.sqs.send_message(
            QueueUrl=self._url(self.dlq),
            MessageBody=body,
            MessageAttributes={"error": {"DataType": "String", "StringValue": error[:1000]}},
        )

    def _maybe_relay(self, now: datetime) -> None:
        """Start the outbox relay in the background when it is due (see the ledger's outbox)."""
        if self.relay is None:
            return
        if self._relayed_at is not None and now - self._relayed_at < self.relay_every:
            return
        self._relayed_at = now
        task = asyncio.get_running_loop().create_task(self._relay_once(now))
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _relay_once(self, now: datetime) -> None:
        assert self.relay is not None
        try:
            await self.relay(now)
        except Exception:
            # The next round tries again; nothing is lost while tasks sit in the outbox.
            log.exception("outbox_relay_failed")
        try:
            await self.reconcile_dead_letters()
        except Exception:
            log.exception("dlq_reconcile_failed")


_background: set[asyncio.Task[None]] = set()  # strong references to relay tasks until they finish


def _seconds(value: timedelta) -> int:
    return max(0, min(MAX_VISIBILITY, math.ceil(value.total_seconds())))


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
