"""The DynamoDB ledger's data-over-years operations: retention, erasure, fixity (no Scan).

Two sparse indexes (see `items.table_definition` and infra/receiver.yaml) make them queries:

- `bodies` (`bdpk = BODIES#{shard}`, `bdat` = received at): the first body part of every
  delivery whose raw body is still kept. Pruning deletes a delivery's body parts, which also
  takes it out of the index. The parts carry `expires_at` as well, the table's TTL attribute,
  so DynamoDB deletes them by itself (within days of expiry: the prune is the exact path).
- `fixity` (`fxpk = FIXITY#{shard}`, or `FIXITY#FAILED#{shard}` while the last check failed;
  `fxat` = last check, or archiving if never checked): every archived asset, oldest check first.

Tombstones are items of their own (`TOMB#{provider}#{job_id}` / `TOMB`), outside the job's
partition, so erasing the partition keeps them.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from datetime import datetime
from itertools import islice
from typing import Any

from botocore.exceptions import ClientError

from receiver.backends.aws import error_code, run_blocking
from receiver.domain import FINAL_STATES
from receiver.ledger import DueAsset, FixityStatus, Tombstone
from receiver.ledger import at_ts as _at
from receiver.ledger.dynamodb.items import (
    SHARDS,
    Item,
    _asset_record,
    _seq_floor,
    asset_sk,
    encode,
    job_pk,
    query_items,
    shard_of,
)

BODIES_INDEX = "bodies"
FIXITY_INDEX = "fixity"


def tomb_pk(provider: str, job_id: str) -> str:
    return f"TOMB#{provider}#{job_id}"


def split_job_pk(pk: str) -> tuple[str, str]:
    """(provider, job id) from `JOB#{provider}#{job_id}` (provider names have no '#')."""
    provider, _, job_id = pk[len("JOB#") :].partition("#")
    return provider, job_id


def body_index_keys(provider: str, job_id: str, received_at: float) -> Item:
    return {"bdpk": f"BODIES#{shard_of(provider, job_id)}", "bdat": received_at}


def fixity_index_keys(
    provider: str, job_id: str, checked_at: float, failed: bool
) -> dict[str, Any]:
    family = "FIXITY#FAILED" if failed else "FIXITY"
    return {"fxpk": f"{family}#{shard_of(provider, job_id)}", "fxat": checked_at}


def _merged(
    ddb: Any,
    table: str,
    index: str,
    pk_name: str,
    sk_name: str,
    keys: list[str],
    below: float | None,
) -> Iterator[Item]:
    """Items of `index` under every key in `keys`, merged oldest first by `sk_name`."""
    streams = []
    for key in keys:
        condition = f"{pk_name} = :pk"
        values: Item = {":pk": key}
        if below is not None:
            condition += f" AND {sk_name} < :below"
            values[":below"] = below
        streams.append(
            query_items(
                ddb,
                table,
                IndexName=index,
                KeyConditionExpression=condition,
                ExpressionAttributeValues=encode(values),
                ScanIndexForward=True,
                Limit=100,
            )
        )
    return heapq.merge(*streams, key=lambda item: float(item[sk_name]))


def prune_payloads(ddb: Any, table: str, before: float, limit: int) -> int:
    keys = [f"BODIES#{s}" for s in range(SHARDS)]
    pruned = 0
    for first in islice(_merged(ddb, table, BODIES_INDEX, "bdpk", "bdat", keys, before), limit):
        owner = first["sk"].rsplit("#", 1)[0]  # PART#{delivery sk}
        for k in range(int(first.get("parts", 1))):
            ddb.delete_item(
                TableName=table, Key=encode({"pk": first["pk"], "sk": f"{owner}#{k:03d}"})
            )
        pruned += 1
    return pruned


def _erase(ddb: Any, table: str, provider: str, job_id: str) -> bool:
    """Delete every item of the job's partition and its webhook-id markers."""
    pk = job_pk(provider, job_id)
    found = False
    while True:  # again until empty: a write that raced the first pass is erased too
        items = list(
            query_items(
                ddb,
                table,
                KeyConditionExpression="pk = :pk",
                ExpressionAttributeValues=encode({":pk": pk}),
                ConsistentRead=True,
            )
        )
        if not items:
            return found
        for item in items:
            found = found or item["sk"] == "JOB"
            if item["sk"].startswith("DLV#") and item.get("delivery_id"):
                ddb.delete_item(
                    TableName=table,
                    Key=encode({"pk": f"DLVID#{provider}#{item['delivery_id']}", "sk": "DLVID"}),
                )
            ddb.delete_item(TableName=table, Key=encode({"pk": pk, "sk": item["sk"]}))


def prune_jobs(ddb: Any, table: str, ended_before: datetime, limit: int) -> list[tuple[str, str]]:
    # A job that ended before the cutoff was first seen before it: walk the listing index
    # oldest first up to there, keep the final ones, and check each job's last update.
    final = {s.value for s in FINAL_STATES}
    high = _seq_floor(ended_before) - 1
    streams = [
        query_items(
            ddb,
            table,
            IndexName="by_time",
            KeyConditionExpression="gsi1pk = :pk AND seq <= :hi",
            ExpressionAttributeValues=encode({":pk": f"JOBS#{s}", ":hi": high}),
            ScanIndexForward=True,
            Limit=100,
        )
        for s in range(SHARDS)
    ]
    removed: list[tuple[str, str]] = []
    for summary in heapq.merge(*streams, key=lambda j: int(j["seq"])):
        if len(removed) >= limit:
            break
        if summary["state"] not in final:
            continue
        raw = ddb.get_item(
            TableName=table, Key=encode({"pk": summary["pk"], "sk": "JOB"}), ConsistentRead=True
        ).get("Item")
        if raw is None:
            continue
        updated = float(raw["updated_at"]["N"])
        if updated >= ended_before.timestamp() or raw["state"]["S"] not in final:
            continue
        _erase(ddb, table, summary["provider"], summary["job_id"])
        removed.append((summary["provider"], summary["job_id"]))
    return removed


def forget(ddb: Any, table: str, provider: str, job_id: str, reason: str, now: float) -> bool:
    # The tombstone first: from this write on, `record` refuses the job (see DynamoLedger).
    ddb.put_item(
        TableName=table,
        Item=encode(
            {
                "pk": tomb_pk(provider, job_id),
                "sk": "TOMB",
                "provider": provider,
                "job_id": job_id,
                "forgotten_at": now,
                "reason": reason,
            }
        ),
    )
    return _erase(ddb, table, provider, job_id)


def tombstone(ddb: Any, table: str, provider: str, job_id: str) -> Tombstone | None:
    raw = ddb.get_item(
        TableName=table,
        Key=encode({"pk": tomb_pk(provider, job_id), "sk": "TOMB"}),
        ConsistentRead=True,
    ).get("Item")
    if raw is None:
        return None
    return Tombstone(provider, job_id, _at(float(raw["forgotten_at"]["N"])), raw["reason"]["S"])


def _fixity_keys() -> list[str]:
    return [f"{family}#{s}" for family in ("FIXITY", "FIXITY#FAILED") for s in range(SHARDS)]


def due_for_fixity(ddb: Any, table: str, before: float, limit: int) -> list[DueAsset]:
    found: list[DueAsset] = []
    for item in islice(
        _merged(ddb, table, FIXITY_INDEX, "fxpk", "fxat", _fixity_keys(), before), limit
    ):
        provider, job_id = split_job_pk(item["pk"])
        found.append(DueAsset(provider, job_id, _asset_record(item)))
    return found


def mark_verified(
    ddb: Any,
    table: str,
    provider: str,
    job_id: str,
    n: int,
    at: float,
    by: str,
    error: str | None,
) -> bool:
    keys = fixity_index_keys(provider, job_id, at, error is not None)
    values: Item = {
        ":at": at,
        ":by": by,
        ":fxpk": keys["fxpk"],
        ":archived": "archived",
    }
    update = "SET verified_at = :at, verified_by = :by, fxpk = :fxpk, fxat = :at"
    if error is None:
        update += " REMOVE fixity_error"
    else:
        update += ", fixity_error = :error"
        values[":error"] = error
    try:
        ddb.update_item(
            TableName=table,
            Key=encode({"pk": job_pk(provider, job_id), "sk": asset_sk(n)}),
            UpdateExpression=update,
            ConditionExpression="attribute_exists(pk) AND #state = :archived",
            ExpressionAttributeNames={"#state": "state"},
            ExpressionAttributeValues=encode(values),
        )
    except ClientError as exc:
        if error_code(exc) == "ConditionalCheckFailedException":
            return False
        raise
    return True


def fixity_failures(ddb: Any, table: str, limit: int) -> list[DueAsset]:
    streams = [
        query_items(
            ddb,
            table,
            IndexName=FIXITY_INDEX,
            KeyConditionExpression="fxpk = :pk",
            ExpressionAttributeValues=encode({":pk": f"FIXITY#FAILED#{s}"}),
            ScanIndexForward=False,
            Limit=100,
        )
        for s in range(SHARDS)
    ]
    newest_first = heapq.merge(*streams, key=lambda item: -float(item["fxat"]))
    found: list[DueAsset] = []
    for item in islice(newest_first, limit):
        provider, job_id = split_job_pk(item["pk"])
        found.append(DueAsset(provider, job_id, _asset_record(item)))
    return found


def fixity_status(ddb: Any, table: str) -> FixityStatus:
    oldest: float | None = None
    for key in _fixity_keys():
        page = ddb.query(
            TableName=table,
            IndexName=FIXITY_INDEX,
            KeyConditionExpression="fxpk = :pk",
            ExpressionAttributeValues=encode({":pk": key}),
            ScanIndexForward=True,
            Limit=1,
        )
        for raw in page.get("Items", []):
            at = float(raw["fxat"]["N"])
            oldest = at if oldest is None else min(oldest, at)
    failing = 0
    for s in range(SHARDS):
        args: Item = {
            "TableName": table,
            "IndexName": FIXITY_INDEX,
            "KeyConditionExpression": "fxpk = :pk",
            "ExpressionAttributeValues": encode({":pk": f"FIXITY#FAILED#{s}"}),
            "Select": "COUNT",
        }
        while True:
            page = ddb.query(**args)
            failing += int(page.get("Count", 0))
            if "LastEvaluatedKey" not in page:
                break
            args["ExclusiveStartKey"] = page["LastEvaluatedKey"]
    return FixityStatus(oldest_check=_at(oldest) if oldest is not None else None, failing=failing)


class DataOverYears:
    """The data-over-years half of the ledger port, mixed into `DynamoLedger`."""

    ddb: Any
    table: str

    async def prune_payloads(self, received_before: datetime, now: datetime, limit: int) -> int:
        return await run_blocking(
            prune_payloads, self.ddb, self.table, received_before.timestamp(), limit
        )

    async def prune_jobs(self, ended_before: datetime, limit: int) -> list[tuple[str, str]]:
        return await run_blocking(prune_jobs, self.ddb, self.table, ended_before, limit)

    async def forget(self, provider: str, job_id: str, reason: str, now: datetime) -> bool:
        return await run_blocking(
            forget, self.ddb, self.table, provider, job_id, reason, now.timestamp()
        )

    async def tombstone(self, provider: str, job_id: str) -> Tombstone | None:
        return await run_blocking(tombstone, self.ddb, self.table, provider, job_id)

    async def due_for_fixity(self, checked_before: datetime, limit: int) -> list[DueAsset]:
        return await run_blocking(
            due_for_fixity, self.ddb, self.table, checked_before.timestamp(), limit
        )

    async def mark_verified(
        self,
        provider: str,
        job_id: str,
        n: int,
        *,
        at: datetime,
        by: str,
        error: str | None,
    ) -> bool:
        return await run_blocking(
            mark_verified,
            self.ddb,
            self.table,
            provider,
            job_id,
            n,
            at.timestamp(),
            by,
            error,
        )

    async def fixity_status(self) -> FixityStatus:
        return await run_blocking(fixity_status, self.ddb, self.table)

    async def fixity_failures(self, limit: int) -> list[DueAsset]:
        return await run_blocking(fixity_failures, self.ddb, self.table, limit)

    async def compact(self) -> int:
        return 0  # deleted items free their space; nothing to give back
