"""The DynamoDB ledger's onward outbox (receiver/ledger/events.py), in the job's partition.

| pk                        | sk                                     | what                      |
|---------------------------|----------------------------------------|---------------------------|
| `JOB#{provider}#{job_id}` | `EVT#{created µs}#{id}`                | an event and its bytes    |
| `JOB#{provider}#{job_id}` | `SND#{created µs}#{id}#{endpoint}`     | its send to one endpoint  |
| `JOB#{provider}#{job_id}` | `ATT#{created µs}#{id}#{endpoint}#{at}`| one attempt of that send  |
| `ENDPOINT#{name}`         | `HEALTH`                               | the endpoint's health     |

`event_items` builds the event and send items that `record` and `_end_asset` add to the
TransactWriteItems of the state change they report, so an event exists exactly when its change
committed. Two sparse indexes: `events` (`evpk = EVENTS#{shard}`, `evat` = created µs) lists
events by time; `sends` (`sdpk = SENDS#{endpoint}#{shard}` while pending, `FAILED#...` once
exhausted; `sdat` = when due) is what senders claim from. A delivered send leaves the index.

A claim is a conditional update of the send item (`lease_owner`, `lease_expires`), so each
send is with one sender at a time across replicas; a send is not claimed while an earlier send
of its job to the same endpoint is pending (a Query of the job's `SND#` items), which keeps a
job's events in order per endpoint. Erasing the job's partition (`forget`, job retention)
erases its events with it.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from receiver.backends.aws import error_code, run_blocking
from receiver.domain import EventType, JobState
from receiver.ledger import at_ts as _at
from receiver.ledger import from_ts as _opt_at
from receiver.ledger.dynamodb.items import (
    SHARDS,
    Item,
    _identity_hash,
    _micros,
    encode,
    job_pk,
)
from receiver.ledger.events import (
    EndpointHealth,
    EventAsset,
    EventFilter,
    EventRecord,
    EventSubject,
    NewEvent,
    OnwardStatus,
    PendingSend,
    SendAttempt,
    SendRecord,
    Subscriptions,
    build_events,
)

RESPONSE_KEPT = 1024


def subject(job: Item, assets: dict[int, Item]) -> EventSubject:
    """The job as its events report it, from the items the transaction writes."""
    metadata: dict[str, Any] = json.loads(job.get("metadata") or "{}")
    # The caller's metadata from POST /jobs wins over what the provider echoed (as SQLite).
    metadata |= json.loads(job.get("tracking") or "{}").get("metadata") or {}
    return EventSubject(
        provider=job["provider"],
        job_id=job["job_id"],
        job_type=job.get("job_type"),
        state=JobState(job["state"]),
        metadata=metadata,
        error=job.get("error"),
        completed_at=_opt_at(job.get("completed_at")),
        failed_at=_opt_at(job.get("failed_at")),
        credits_refunded=job.get("credits_refunded"),
        assets=tuple(
            EventAsset(
                n=int(a["n"]),
                name=a["name"],
                state=a["state"],
                key=a["key"],
                uri=a.get("uri"),
                size=int(a["size"]) if a.get("size") is not None else None,
                content_type=a.get("content_type"),
                sha256=a.get("sha256"),
                deadline=_at(a["deadline"]),
                archived_at=_opt_at(a.get("archived_at")),
                error=a.get("error"),
            )
            for _, a in sorted(assets.items())
        ),
    )


def _event_stem(event: NewEvent | EventRecord) -> str:
    return f"{_micros(event.created_at.timestamp()):017d}#{event.id}"


def _shard(event_id: str) -> int:
    return _identity_hash("evt", event_id) % SHARDS


def _send_item(pk: str, stem: str, event: NewEvent | EventRecord, endpoint: str, at: float) -> Item:
    return {
        "pk": pk,
        "sk": f"SND#{stem}#{endpoint}",
        "event_id": event.id,
        "event_sk": f"EVT#{stem}",
        "endpoint": endpoint,
        "state": "pending",
        "attempts": 0,
        "next_at": at,
        "created_at": event.created_at.timestamp(),
        "sdpk": f"SENDS#{endpoint}#{_shard(event.id)}",
        "sdat": at,
    }


def event_items(
    subscriptions: Subscriptions,
    job: Item,
    assets: dict[int, Item],
    kinds: Sequence[tuple[EventType, int | None]],
    now: float,
) -> list[Item]:
    """The items (event, then a send per subscribed endpoint) of a state change's events."""
    if not kinds:
        return []
    pk = job_pk(job["provider"], job["job_id"])
    items: list[Item] = []
    for event in build_events(subject(job, assets), kinds, _at(now)):
        stem = _event_stem(event)
        items.append(
            {
                "pk": pk,
                "sk": f"EVT#{stem}",
                "id": event.id,
                "type": event.type.value,
                "provider": event.provider,
                "job_id": event.job_id,
                "created_at": event.created_at.timestamp(),
                "body": event.body,
                "evpk": f"EVENTS#{_shard(event.id)}",
                "evat": _micros(event.created_at.timestamp()),
                **({"traceparent": event.traceparent} if event.traceparent else {}),
            }
        )
        items.extend(
            _send_item(pk, stem, event, endpoint, now)
            for endpoint in subscriptions.endpoints_for(event.type)
        )
    return items


def _record(item: Item, sends: list[SendRecord]) -> EventRecord:
    return EventRecord(
        id=item["id"],
        type=item["type"],
        provider=item["provider"],
        job_id=item["job_id"],
        created_at=_at(item["created_at"]),
        body=bytes(item["body"]),
        sends=sends,
    )


class Events:
    """The onward half of the ledger port on DynamoDB (mixed into `DynamoLedger`)."""

    ddb: Any
    table: str
    subscriptions: Subscriptions

    if TYPE_CHECKING:  # from `Reads`, mixed in beside this class

        def _query(self, **kwargs: Any) -> Iterator[Item]: ...

        def _get(self, pk: str, sk: str) -> Item | None: ...

    # -- the sender -----------------------------------------------------------------------------

    async def claim_sends(
        self, endpoint: str, owner: str, now: datetime, lease: timedelta, limit: int
    ) -> list[PendingSend]:
        return await run_blocking(self._claim, endpoint, owner, now.timestamp(), lease, limit)

    def _claim(
        self, endpoint: str, owner: str, now: float, lease: timedelta, limit: int
    ) -> list[PendingSend]:
        due = heapq.merge(
            *(
                self._query(
                    IndexName="sends",
                    KeyConditionExpression="sdpk = :pk AND sdat <= :now",
                    ExpressionAttributeValues=encode(
                        {":pk": f"SENDS#{endpoint}#{shard}", ":now": now}
                    ),
                )
                for shard in range(SHARDS)
            ),
            key=lambda s: (float(s["sdat"]), str(s["sk"])),
        )
        claimed: list[PendingSend] = []
        for send in due:
            if len(claimed) >= limit:
                break
            if float(send.get("lease_expires") or 0) > now or self._earlier_pending(send):
                continue
            try:
                self.ddb.update_item(
                    TableName=self.table,
                    Key=encode({"pk": send["pk"], "sk": send["sk"]}),
                    UpdateExpression="SET lease_owner = :me, lease_expires = :until",
                    ConditionExpression="#s = :pending AND "
                    "(attribute_not_exists(lease_expires) OR lease_expires <= :now)",
                    ExpressionAttributeNames={"#s": "state"},
                    ExpressionAttributeValues=encode(
                        {
                            ":me": owner,
                            ":until": now + lease.total_seconds(),
                            ":pending": "pending",
                            ":now": now,
                        }
                    ),
                )
            except ClientError as exc:
                if error_code(exc) == "ConditionalCheckFailedException":
                    continue  # another sender took it first
                raise
            event = self._get(send["pk"], send["event_sk"])
            if event is None:
                continue
            claimed.append(
                PendingSend(
                    event_id=event["id"],
                    endpoint=endpoint,
                    type=event["type"],
                    provider=event["provider"],
                    job_id=event["job_id"],
                    body=bytes(event["body"]),
                    attempts=int(send["attempts"]),
                    created_at=_at(event["created_at"]),
                    traceparent=event.get("traceparent"),
                )
            )
        return claimed

    def _earlier_pending(self, send: Item) -> bool:
        """Whether an earlier event of the same job waits for this endpoint (order per job)."""
        for other in self._query(
            KeyConditionExpression="pk = :pk AND sk BETWEEN :first AND :this",
            ExpressionAttributeValues=encode(
                {":pk": send["pk"], ":first": "SND#", ":this": send["sk"]}
            ),
            ConsistentRead=True,
        ):
            if (
                other["sk"] != send["sk"]
                and other["endpoint"] == send["endpoint"]
                and other["state"] == "pending"
            ):
                return True
        return False

    async def finish_send(
        self, send: PendingSend, owner: str, attempt: SendAttempt, next_at: datetime | None
    ) -> None:
        await run_blocking(self._finish, send, owner, attempt, next_at)

    def _finish(
        self, send: PendingSend, owner: str, attempt: SendAttempt, next_at: datetime | None
    ) -> None:
        pk = job_pk(send.provider, send.job_id)
        stem = f"{_micros(send.created_at.timestamp()):017d}#{send.event_id}"
        at = attempt.at.timestamp()
        send_key = encode({"pk": pk, "sk": f"SND#{stem}#{send.endpoint}"})
        try:
            # The attempt only beside a send that still exists: an erased job stays erased.
            self.ddb.transact_write_items(
                TransactItems=[
                    {
                        "ConditionCheck": {
                            "TableName": self.table,
                            "Key": send_key,
                            "ConditionExpression": "attribute_exists(pk)",
                        }
                    },
                    {
                        "Put": {
                            "TableName": self.table,
                            "Item": encode(
                                {
                                    "pk": pk,
                                    "sk": f"ATT#{stem}#{send.endpoint}#{_micros(at):017d}",
                                    "endpoint": send.endpoint,
                                    "at": at,
                                    "outcome": attempt.outcome,
                                    "status": attempt.status,
                                    "duration_ms": attempt.duration_ms,
                                    "response": attempt.response[:RESPONSE_KEPT],
                                    "error": attempt.error,
                                }
                            ),
                        }
                    },
                ]
            )
        except ClientError as exc:
            if error_code(exc) == "TransactionCanceledException":
                return
            raise
        state = {"delivered": "delivered", "failed": "failed", "retry": "pending"}[attempt.outcome]
        due = next_at.timestamp() if next_at is not None else at
        shard = _shard(send.event_id)
        index = {
            "pending": f"SENDS#{send.endpoint}#{shard}",
            "failed": f"FAILED#{send.endpoint}#{shard}",
        }.get(state)
        values: dict[str, Any] = {
            ":state": state,
            ":due": due,
            ":one": 1,
            ":me": owner,
            ":pending": "pending",
        }
        sets = "#s = :state, next_at = :due"
        removed = ["lease_owner", "lease_expires"]
        if attempt.error is not None:
            sets += ", last_error = :err"
            values[":err"] = attempt.error
        else:
            removed.append("last_error")
        if state == "delivered":
            sets += ", delivered_at = :due"
        if index is not None:
            sets += ", sdpk = :index, sdat = :due"
            values[":index"] = index
        if index is None:
            removed += ["sdpk", "sdat"]
        removes = " REMOVE " + ", ".join(removed)
        try:
            # Only the lease holder moves the send (a lapsed sender keeps its attempt only).
            self.ddb.update_item(
                TableName=self.table,
                Key=send_key,
                UpdateExpression=f"SET {sets} ADD attempts :one{removes}",
                ConditionExpression="lease_owner = :me AND #s = :pending",
                ExpressionAttributeNames={"#s": "state"},
                ExpressionAttributeValues=encode(values),
            )
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
        self._note_health(send.endpoint, attempt)

    def _note_health(self, endpoint: str, attempt: SendAttempt) -> None:
        at = attempt.at.timestamp()
        if attempt.outcome == "delivered":
            update = "SET failures = :zero, last_attempt_at = :at, last_success_at = :at"
            values: dict[str, Any] = {":zero": 0, ":at": at}
        else:
            update = "SET last_attempt_at = :at, last_error = :err ADD failures :one"
            values = {":at": at, ":err": attempt.error or "failed", ":one": 1}
        self.ddb.update_item(
            TableName=self.table,
            Key=encode({"pk": f"ENDPOINT#{endpoint}", "sk": "HEALTH"}),
            UpdateExpression=update,
            ExpressionAttributeValues=encode(values),
        )

    # -- the audit --------------------------------------------------------------------------------

    def _job_events(self, pk: str, *, history: bool) -> list[EventRecord]:
        events: list[Item] = []
        sends: dict[str, list[Item]] = {}
        attempts: dict[tuple[str, str], list[SendAttempt]] = {}
        prefixes = ("EVT#", "SND#", "ATT#") if history else ("EVT#", "SND#")
        for item in (
            found
            for prefix in prefixes
            for found in self._query(
                KeyConditionExpression="pk = :pk AND begins_with(sk, :prefix)",
                ExpressionAttributeValues=encode({":pk": pk, ":prefix": prefix}),
                ConsistentRead=True,
            )
        ):
            sk: str = item["sk"]
            if sk.startswith("EVT#"):
                events.append(item)
            elif sk.startswith("SND#"):
                sends.setdefault(item["event_id"], []).append(item)
            else:
                event_id = sk.split("#")[2]
                attempts.setdefault((event_id, item["endpoint"]), []).append(
                    SendAttempt(
                        at=_at(item["at"]),
                        outcome=item["outcome"],
                        status=int(item["status"]) if item.get("status") is not None else None,
                        duration_ms=float(item["duration_ms"]),
                        response=item.get("response") or "",
                        error=item.get("error"),
                    )
                )
        return [
            _record(
                e,
                [
                    SendRecord(
                        endpoint=s["endpoint"],
                        state=s["state"],
                        attempts=int(s["attempts"]),
                        next_at=_at(s["next_at"]) if s["state"] == "pending" else None,
                        delivered_at=_opt_at(s.get("delivered_at")),
                        last_error=s.get("last_error"),
                        history=attempts.get((e["id"], s["endpoint"]), []),
                    )
                    for s in sorted(sends.get(e["id"], []), key=lambda s: str(s["endpoint"]))
                ],
            )
            for e in events
        ]

    def _matching(self, where: EventFilter, *, newest_first: bool) -> Iterator[EventRecord]:
        if where.provider is not None and where.job_id is not None:
            found = self._job_events(job_pk(where.provider, where.job_id), history=False)
            ordered = reversed(found) if newest_first else iter(found)
            yield from (e for e in ordered if where.admits(e))
            return
        # Every job: the `events` index by time, merged over its shards.
        bounds: dict[str, Any] = {":lo": 0, ":hi": 10**17}
        if where.since is not None:
            bounds[":lo"] = _micros(where.since.timestamp())
        if where.until is not None:
            bounds[":hi"] = _micros(where.until.timestamp()) - 1
        listing = heapq.merge(
            *(
                self._query(
                    IndexName="events",
                    KeyConditionExpression="evpk = :pk AND evat BETWEEN :lo AND :hi",
                    ExpressionAttributeValues=encode({":pk": f"EVENTS#{shard}", **bounds}),
                    ScanIndexForward=not newest_first,
                )
                for shard in range(SHARDS)
            ),
            key=lambda e: (int(e["evat"]), str(e["id"])),
            reverse=newest_first,
        )
        for item in listing:
            if where.event_id is not None and item["id"] != where.event_id:
                continue
            candidate = _record(item, self._sends_of(item))
            if where.admits(candidate):
                yield candidate

    def _sends_of(self, event: Item) -> list[SendRecord]:
        stem = event["sk"][len("EVT#") :]
        return [
            SendRecord(
                endpoint=s["endpoint"],
                state=s["state"],
                attempts=int(s["attempts"]),
                next_at=_at(s["next_at"]) if s["state"] == "pending" else None,
                delivered_at=_opt_at(s.get("delivered_at")),
                last_error=s.get("last_error"),
            )
            for s in self._query(
                KeyConditionExpression="pk = :pk AND begins_with(sk, :snd)",
                ExpressionAttributeValues=encode({":pk": event["pk"], ":snd": f"SND#{stem}#"}),
                ConsistentRead=True,
            )
        ]

    async def events(self, where: EventFilter, limit: int) -> list[EventRecord]:
        def read() -> list[EventRecord]:
            found = []
            for event in self._matching(where, newest_first=True):
                found.append(event)
                if len(found) >= limit:
                    break
            return found

        return await run_blocking(read)

    async def event(self, event_id: str) -> EventRecord | None:
        def read() -> EventRecord | None:
            # The id's ULID carries its creation millisecond: one narrow range of the index.
            millis = _ulid_millis(event_id)
            if millis is None:
                return None
            lo = datetime.fromtimestamp(millis / 1000, tz=UTC)
            where = EventFilter(event_id=event_id, since=lo, until=lo + timedelta(milliseconds=1))
            for found in self._matching(where, newest_first=True):
                full = self._job_events(job_pk(found.provider, found.job_id), history=True)
                return next((e for e in full if e.id == event_id), None)
            return None

        return await run_blocking(read)

    async def replay(
        self, where: EventFilter, endpoints: Sequence[str] | None, now: datetime, limit: int
    ) -> list[str]:
        def write() -> list[str]:
            at = now.timestamp()
            replayed: list[str] = []
            for event in self._matching(where, newest_first=False):
                if len(replayed) >= limit:
                    break
                targets = (
                    list(endpoints)
                    if endpoints is not None
                    else self.subscriptions.endpoints_for(event.type)
                )
                pk, stem = job_pk(event.provider, event.job_id), _event_stem(event)
                for endpoint in targets:
                    # A new series, same id and bytes (the event item is not touched).
                    self.ddb.put_item(
                        TableName=self.table,
                        Item=encode(_send_item(pk, stem, event, endpoint, at)),
                    )
                if targets:
                    replayed.append(event.id)
            return replayed

        return await run_blocking(write)

    async def onward_status(self, now: datetime) -> OnwardStatus:
        def read() -> OnwardStatus:
            names = self.subscriptions.endpoints
            pending = exhausted = 0
            oldest: float | None = None
            for name in names:
                for shard in range(SHARDS):
                    for send in self._query(
                        IndexName="sends",
                        KeyConditionExpression="sdpk = :pk",
                        ExpressionAttributeValues=encode({":pk": f"SENDS#{name}#{shard}"}),
                    ):
                        pending += 1
                        created = float(send["created_at"])
                        oldest = created if oldest is None else min(oldest, created)
                    exhausted += sum(
                        1
                        for _ in self._query(
                            IndexName="sends",
                            KeyConditionExpression="sdpk = :pk",
                            ExpressionAttributeValues=encode({":pk": f"FAILED#{name}#{shard}"}),
                        )
                    )
            health = []
            for name in names:
                item = self._get(f"ENDPOINT#{name}", "HEALTH") or {}
                health.append(
                    EndpointHealth(
                        name=name,
                        consecutive_failures=int(item.get("failures") or 0),
                        last_attempt_at=_opt_at(item.get("last_attempt_at")),
                        last_success_at=_opt_at(item.get("last_success_at")),
                        last_error=item.get("last_error"),
                    )
                )
            return OnwardStatus(pending, _opt_at(oldest), exhausted, health)

        return await run_blocking(read)


def _ulid_millis(event_id: str) -> int | None:
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    text = event_id.removeprefix("evt_")
    if len(text) != 26 or any(c not in alphabet for c in text):
        return None
    value = 0
    for c in text[:10]:
        value = value * 32 + alphabet.index(c)
    return value
