"""The DynamoDB ledger's stored format: item layout, keys, encoding, and the table definition.

The layout is described in `receiver.ledger.dynamodb`; everything here is pure (no I/O) except
`query_items`, the one paging loop over a Query.
"""

from __future__ import annotations

import json
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

from boto3.dynamodb.types import Binary, TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

from receiver.backends.aws import error_code
from receiver.domain import (
    EventKind,
    JobEvent,
    JobState,
    completion_time,
    settle,
    settled_error,
)
from receiver.ledger import (
    Activity,
    ArchivedSample,
    AssetRecord,
    DeliveryRecord,
    JobSummary,
    PlannedOutput,
)
from receiver.ledger import at_ts as _at
from receiver.ledger import from_ts as _opt_at
from receiver.ledger import to_ts as _ts
from receiver.workqueue import TaskMessage

Item = dict[str, Any]

SHARDS = 4
BODY_CHUNK = 350_000  # bytes of compressed body per item (DynamoDB items: 400 KB)
_MAX_SEQ = 10**37  # DynamoDB numbers: 38 significant digits
_CONFLICTS = frozenset({"ConditionalCheckFailed", "TransactionConflict"})

_ser = TypeSerializer()
_deser = TypeDeserializer()


# --- encoding -----------------------------------------------------------------------------------


def _to_dynamo(value: Any) -> Any:
    if isinstance(value, float):
        return Decimal(repr(value))
    return value


def encode(item: Item) -> dict[str, Any]:
    """Python values to DynamoDB attribute values; None means "no attribute"."""
    return {k: _ser.serialize(_to_dynamo(v)) for k, v in item.items() if v is not None}


def decode(raw: dict[str, Any]) -> Item:
    out: Item = {}
    for key, value in raw.items():
        plain = _deser.deserialize(value)
        if isinstance(plain, Decimal):
            plain = int(plain) if plain == plain.to_integral_value() else float(plain)
        elif isinstance(plain, Binary):
            plain = bytes(plain.value)  # type: ignore[attr-defined]
        out[key] = plain
    return out


def job_pk(provider: str, job_id: str) -> str:
    return f"JOB#{provider}#{job_id}"


def asset_sk(n: int) -> str:
    return f"JOB#AST#{n:04d}"


def task_sk(n: int) -> str:
    return f"TASK#{n:04d}"


def _identity_hash(provider: str, job_id: str) -> int:
    return zlib.crc32(f"{provider}#{job_id}".encode())


def shard_of(provider: str, job_id: str) -> int:
    return _identity_hash(provider, job_id) % SHARDS


def _micros(ts: float) -> int:
    return round(ts * 1_000_000)


def job_seq(provider: str, job_id: str, first_seen_at: float) -> int:
    return _micros(first_seen_at) * 65536 + (_identity_hash(provider, job_id) >> 16)


def _seq_floor(at: datetime) -> int:
    return _micros(at.timestamp()) * 65536


def query_items(ddb: Any, table: str, **kwargs: Any) -> Iterator[Item]:
    """Every item a Query returns, following its pages."""
    args = {"TableName": table, **kwargs}
    while True:
        page = ddb.query(**args)
        for raw in page.get("Items", []):
            yield decode(raw)
        if "LastEvaluatedKey" not in page:
            return
        args["ExclusiveStartKey"] = page["LastEvaluatedKey"]


# --- item helpers -------------------------------------------------------------------------------


def _is_conflict(exc: ClientError) -> bool:
    code = error_code(exc)
    if code == "ConditionalCheckFailedException":
        return True
    if code == "TransactionConflictException":
        return True
    if code != "TransactionCanceledException":
        return False
    reasons = exc.response.get("CancellationReasons")
    if reasons:
        codes = {r.get("Code") for r in reasons} - {None, "None"}
        return bool(codes) and codes <= _CONFLICTS
    message = str(exc.response.get("Error", {}).get("Message", ""))
    return any(c in message for c in _CONFLICTS)


def _new_job(provider: str, job_id: str, now: float) -> Item:
    return {
        "pk": job_pk(provider, job_id),
        "sk": "JOB",
        "provider": provider,
        "job_id": job_id,
        "state": JobState.PROCESSING.value,
        "first_seen_at": now,
        "updated_at": now,
        "metadata": "{}",
        "version": 0,
        "seq": job_seq(provider, job_id, now),
    }


def _index(job: Item) -> None:
    """The listing indexes' keys, kept in step with the job's state."""
    shard = shard_of(job["provider"], job["job_id"])
    job["gsi1pk"] = f"JOBS#{shard}"
    job["gsi2pk"] = f"STATE#{job['state']}#{shard}"


def _apply_event(job: Item, event: JobEvent, now: float) -> None:
    metadata: dict[str, Any] = json.loads(job.get("metadata", "{}"))
    metadata.update(event.metadata)
    job["metadata"] = json.dumps(metadata)
    job["job_type"] = event.job_type or job.get("job_type")
    if event.kind is EventKind.FAILED:
        job.update(
            failed_at=_ts(event.failed_at),
            error=event.error,
            credits_refunded=event.credits_refunded,
        )
    elif event.kind is EventKind.COMPLETED:
        job["completed_at"] = completion_time(event, _at(now)).timestamp()


def _asset_item(pk: str, out: PlannedOutput) -> Item:
    return {
        "pk": pk,
        "sk": asset_sk(out.n),
        "n": out.n,
        "name": out.name,
        "key": out.key,
        "source_url": out.url,
        "content_type": out.content_type,
        "deadline": out.deadline.timestamp(),
        "state": "pending",
    }


def _task_item(
    pk: str,
    provider: str,
    job_id: str,
    n: int,
    deadline: datetime,
    now: float,
    traceparent: str | None = None,
) -> Item:
    item: Item = {
        "pk": pk,
        "sk": task_sk(n),
        "provider": provider,
        "job_id": job_id,
        "n": n,
        "deadline": deadline.timestamp(),
        "gen": uuid.uuid4().hex,
        # Unsent: in the sparse outbox index until the send is confirmed.
        "obpk": f"OUTBOX#{shard_of(provider, job_id)}",
        "obat": now,
    }
    if traceparent:
        # The queuing request's trace (receiver.tracing). Not in the outbox index's projection:
        # a task re-sent by the relay after its sender died starts a trace of its own.
        item["traceparent"] = traceparent
    return item


def _task_message(item: Item) -> TaskMessage:
    return TaskMessage(
        provider=item["provider"],
        job_id=item["job_id"],
        n=int(item["n"]),
        deadline=_at(item["deadline"]),
        gen=item["gen"],
        traceparent=item.get("traceparent"),
    )


def _earliest_pending(assets: dict[int, Item]) -> float | None:
    pending = [a["deadline"] for a in assets.values() if a["state"] == "pending"]
    return min(pending) if pending else None


def _settle(job: Item, assets: dict[int, Item], now: float) -> JobState:
    """After an asset ends, the job ends too once no asset is pending (`domain.settle`)."""
    current = JobState(job["state"])
    new = settle(current, (a["state"] for a in assets.values()))
    if new is None:
        return current
    job.update(
        state=new.value,
        archived_at=now if new is JobState.ARCHIVED else None,
        updated_at=now,
        deadline=None,
        error=settled_error((a.get("error") for _, a in sorted(assets.items())), job.get("error")),
    )
    return new


def _delivery_record(item: Item, parts: list[tuple[int, bytes]]) -> DeliveryRecord:
    # Two layouts: older items hold the first compressed chunk themselves (parts 1..N-1 beside
    # them); newer ones keep every chunk in parts 0..N-1, which payload retention deletes.
    chunks = [bytes(c) for _, c in sorted(parts)]
    expected = int(item.get("parts", 1)) - (1 if "body" in item else 0)
    removed = len(chunks) < expected
    body = b"" if removed else bytes(item.get("body", b"")) + b"".join(chunks)
    return DeliveryRecord(
        seq=int(item["sk"].split("#")[1]),
        delivery_id=item.get("delivery_id"),
        received_at=_at(item["received_at"]),
        source=item["source"],
        auth=item["auth"],
        event=item["event"],
        payload_sha256=item["payload_sha256"],
        outcome=item["outcome"],
        body=b"" if removed else zlib.decompress(body),
        body_mismatch=bool(item.get("body_mismatch", False)),
        payload_removed=removed,
    )


def _asset_record(item: Item) -> AssetRecord:
    return AssetRecord(
        n=int(item["n"]),
        name=item["name"],
        key=item["key"],
        source_url=item["source_url"],
        content_type=item.get("content_type"),
        deadline=_at(item["deadline"]),
        state=item["state"],
        uri=item.get("uri"),
        size=item.get("size"),
        sha256=item.get("sha256"),
        archived_at=_opt_at(item.get("archived_at")),
        error=item.get("error"),
        verified_at=_opt_at(item.get("verified_at")),
        verified_by=item.get("verified_by"),
        fixity_error=item.get("fixity_error"),
    )


def _activity(
    since: datetime,
    jobs: Iterable[Item],
    assets_of: Callable[[str, str], Iterable[Item]],
) -> Activity:
    """`Ledger.activity` from job summaries and a reader of a job's asset items."""
    states: dict[str, int] = {}
    samples: list[ArchivedSample] = []
    for job in jobs:
        states[job["state"]] = states.get(job["state"], 0) + 1
        if job["state"] in _NO_ASSETS:
            continue
        samples.extend(
            ArchivedSample(
                job["provider"],
                job["job_id"],
                int(a["n"]),
                int(a.get("size") or 0),
                _at(a["archived_at"]),
                _at(a["deadline"]),
            )
            for a in assets_of(job["provider"], job["job_id"])
            if a["state"] == "archived"
        )
    return Activity.build(since, states, samples)


# Jobs in these states have no archived asset: the overview skips reading their assets.
_NO_ASSETS = frozenset({JobState.TRACKING, JobState.PROCESSING, JobState.FAILED})


def _summary(job: Item) -> JobSummary:
    return JobSummary(
        seq=int(job["seq"]),
        provider=job["provider"],
        job_id=job["job_id"],
        state=JobState(job["state"]),
        job_type=job.get("job_type"),
        first_seen_at=_at(job["first_seen_at"]),
        completed_at=_opt_at(job.get("completed_at")),
        archived_at=_opt_at(job.get("archived_at")),
        deadline=_opt_at(job.get("deadline")),
        error=job.get("error"),
    )


# --- the table ----------------------------------------------------------------------------------

SUMMARY_ATTRIBUTES = [
    "provider",
    "job_id",
    "state",
    "job_type",
    "first_seen_at",
    "completed_at",
    "archived_at",
    "deadline",
    "error",
]


def table_definition(name: str) -> dict[str, Any]:
    """CreateTable arguments matching infra/receiver.yaml (for tests and local set-ups)."""

    def index(name: str, pk: str, sk: str, attributes: list[str]) -> dict[str, Any]:
        return {
            "IndexName": name,
            "KeySchema": [
                {"AttributeName": pk, "KeyType": "HASH"},
                {"AttributeName": sk, "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": "INCLUDE", "NonKeyAttributes": attributes},
        }

    return {
        "TableName": name,
        "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": [
            {"AttributeName": a, "AttributeType": t}
            for a, t in (
                ("pk", "S"),
                ("sk", "S"),
                ("gsi1pk", "S"),
                ("gsi2pk", "S"),
                ("seq", "N"),
                ("obpk", "S"),
                ("obat", "N"),
                ("bdpk", "S"),
                ("bdat", "N"),
                ("fxpk", "S"),
                ("fxat", "N"),
                ("evpk", "S"),
                ("evat", "N"),
                ("sdpk", "S"),
                ("sdat", "N"),
            )
        ],
        "KeySchema": [
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        "GlobalSecondaryIndexes": [
            index("by_time", "gsi1pk", "seq", SUMMARY_ATTRIBUTES),
            index("by_state", "gsi2pk", "seq", SUMMARY_ATTRIBUTES),
            index("outbox", "obpk", "obat", ["provider", "job_id", "n", "deadline", "gen"]),
            # Data over years (receiver.ledger.dynamodb.lifecycle): kept bodies, fixity due.
            index("bodies", "bdpk", "bdat", ["parts"]),
            {
                "IndexName": "fixity",
                "KeySchema": [
                    {"AttributeName": "fxpk", "KeyType": "HASH"},
                    {"AttributeName": "fxat", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            },
            # Onward events (receiver.ledger.dynamodb.events): by time, and the sends to claim.
            {
                "IndexName": "events",
                "KeySchema": [
                    {"AttributeName": "evpk", "KeyType": "HASH"},
                    {"AttributeName": "evat", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            },
            {
                "IndexName": "sends",
                "KeySchema": [
                    {"AttributeName": "sdpk", "KeyType": "HASH"},
                    {"AttributeName": "sdat", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            },
        ],
    }


def restored_asset_item(pk: str, a: AssetRecord) -> Item:
    """An asset item rebuilt from a manifest (`receiver reindex`)."""
    return {
        "pk": pk,
        "sk": asset_sk(a.n),
        "n": a.n,
        "name": a.name,
        "key": a.key,
        "source_url": a.source_url,
        "content_type": a.content_type,
        "deadline": a.deadline.timestamp(),
        "state": a.state,
        "uri": a.uri,
        "size": a.size,
        "sha256": a.sha256,
        "archived_at": _ts(a.archived_at),
        "error": a.error,
    }


#: The table's TTL attribute (epoch seconds): set on delivery body parts under payload retention.
TTL_ATTRIBUTE = "expires_at"
