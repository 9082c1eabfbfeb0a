"""The DynamoDB ledger's outbox: tasks committed with a record, then sent to the queue.

A DynamoDB commit and an SQS send cannot be one transaction, so a task is written unsent (in the
sparse `outbox` index) and sent after the commit; `relay` re-sends what a dead sender left behind.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import structlog
from botocore.exceptions import ClientError

from receiver.backends.aws import error_code, run_blocking
from receiver.ledger.dynamodb.items import (
    SHARDS,
    _task_message,
    encode,
    job_pk,
    query_items,
    task_sk,
)
from receiver.workqueue import TaskMessage

log = structlog.get_logger(__name__)

Publisher = Callable[[Sequence[TaskMessage], datetime], Awaitable[None]]
OUTBOX_GRACE = timedelta(seconds=60)  # unsent this long: the sender died, the relay re-sends


class Outbox:
    def __init__(self, table: str, ddb: Any, publish: Publisher | None) -> None:
        self.table = table
        self.ddb = ddb
        self.publish = publish  # the queue's sender; None leaves tasks in the outbox

    async def relay(self, now: datetime, *, limit: int = 500) -> int:
        """Re-send tasks that stayed unsent past OUTBOX_GRACE; how many were sent."""
        tasks = await run_blocking(self._unsent, now - OUTBOX_GRACE, limit)
        if tasks:
            log.warning("outbox_relay", tasks=len(tasks))
        return await self.send(tasks, now)

    async def send(self, tasks: list[TaskMessage], now: datetime) -> int:
        """Send committed tasks to the queue and mark them sent; failures wait for the relay."""
        if not tasks or self.publish is None:
            return 0
        try:
            await self.publish(tasks, now)
        except Exception as exc:
            log.warning("outbox_send_failed", tasks=len(tasks), error=str(exc))
            return 0
        await run_blocking(self._mark_sent, tasks, now.timestamp())
        return len(tasks)

    def _mark_sent(self, tasks: list[TaskMessage], now: float) -> None:
        for task in tasks:
            try:
                self.ddb.update_item(
                    TableName=self.table,
                    Key=encode({"pk": job_pk(task.provider, task.job_id), "sk": task_sk(task.n)}),
                    UpdateExpression="REMOVE obpk, obat SET sent_at = :now",
                    ConditionExpression="gen = :gen",
                    ExpressionAttributeValues=encode({":gen": task.gen, ":now": now}),
                )
            except ClientError as exc:
                if error_code(exc) != "ConditionalCheckFailedException":
                    raise
                # Enqueued again since (a requeue): that enqueue will be marked by its own send.

    def _unsent(self, older_than: datetime, limit: int) -> list[TaskMessage]:
        found: list[TaskMessage] = []
        for s in range(SHARDS):
            for item in query_items(
                self.ddb,
                self.table,
                IndexName="outbox",
                KeyConditionExpression="obpk = :pk AND obat < :before",
                ExpressionAttributeValues=encode(
                    {":pk": f"OUTBOX#{s}", ":before": older_than.timestamp()}
                ),
            ):
                found.append(_task_message(item))
                if len(found) >= limit:
                    return found
        return found
