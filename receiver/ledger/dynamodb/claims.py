"""Claims on archive tasks: who copies an asset now, kept on the task's own item (`TASK#n`).

SQS delivers at least once and the outbox may send a task twice, so two workers can hold a
message for the same asset at once; the visibility timeout only orders receives of one message.
The claim makes "one copy at a time" hold across messages: a worker that receives a task claims
its item with a conditional update (`claim_owner`, `claim_until`), renews it with every
heartbeat and releases it when it ends the task. A claim whose owner stopped renewing lapses at
`claim_until`, so a dead worker blocks nobody for longer than one lease.

The methods block (boto3); the SQS queue calls them on its AWS worker threads.
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

from receiver.backends.aws import error_code
from receiver.ledger.dynamodb.items import job_pk, task_sk


class DynamoTaskClaims:
    def __init__(self, table: str, ddb: Any) -> None:
        self.table = table
        self.ddb = ddb

    def claim(
        self, provider: str, job_id: str, n: int, owner: str, now: float, until: float
    ) -> float | None:
        """Take (or renew) the claim; None if it is ours now, else when the live owner's ends."""
        key = {"pk": {"S": job_pk(provider, job_id)}, "sk": {"S": task_sk(n)}}
        held = now
        for _ in range(3):  # a claim that lapses between our update and our read: try again
            try:
                self.ddb.update_item(
                    TableName=self.table,
                    Key=key,
                    UpdateExpression="SET claim_owner = :me, claim_until = :until",
                    ConditionExpression=(
                        "attribute_exists(pk) AND (attribute_not_exists(claim_owner) "
                        "OR claim_owner = :me OR claim_until < :now)"
                    ),
                    ExpressionAttributeValues={
                        ":me": {"S": owner},
                        ":until": {"N": repr(until)},
                        ":now": {"N": repr(now)},
                    },
                )
                return None
            except ClientError as exc:
                if error_code(exc) != "ConditionalCheckFailedException":
                    raise
            item = self.ddb.get_item(TableName=self.table, Key=key, ConsistentRead=True).get("Item")
            if item is None:
                # No task item (a message from before claims, or a forgotten job): nothing to
                # contend on; the worker reads the asset from the ledger and decides.
                return None
            held = float(item.get("claim_until", {}).get("N", "0"))
            if held >= now:
                return held
        return held

    def release(self, provider: str, job_id: str, n: int, owner: str) -> None:
        """Drop our claim (if it is still ours): the next receive of the task may take it."""
        try:
            self.ddb.update_item(
                TableName=self.table,
                Key={"pk": {"S": job_pk(provider, job_id)}, "sk": {"S": task_sk(n)}},
                UpdateExpression="REMOVE claim_owner, claim_until",
                ConditionExpression="claim_owner = :me",
                ExpressionAttributeValues={":me": {"S": owner}},
            )
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
