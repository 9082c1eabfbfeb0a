"""The DynamoDB ledger adapter: `record` and the other writes (reads.py: the reads; see the
package docstring for the item layout)."""

from __future__ import annotations

import json
import random
import time
import uuid
import zlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import structlog
from botocore.exceptions import ClientError

from receiver.backends.aws import client, error_code, resource_name, run_blocking
from receiver.domain import (
    DeliveryOutcome,
    EventKind,
    EventType,
    JobEvent,
    JobState,
    asset_event,
    decide,
    ended_event,
    manifest_work,
)
from receiver.ledger import (
    MANIFEST_TASK,
    MANIFEST_TASK_WINDOW_SECONDS,
    ArchivedAsset,
    AssetToCopy,
    IncomingDelivery,
    JobRecord,
    PlannedOutput,
    RecordResult,
)
from receiver.ledger import at_ts as _at
from receiver.ledger import from_ts as _opt_at
from receiver.ledger import to_ts as _ts
from receiver.ledger.dynamodb import lifecycle
from receiver.ledger.dynamodb.events import Events, event_items
from receiver.ledger.dynamodb.items import (
    BODY_CHUNK,
    TTL_ATTRIBUTE,
    Item,
    _apply_event,
    _asset_item,
    _earliest_pending,
    _index,
    _is_conflict,
    _micros,
    _new_job,
    _settle,
    _task_item,
    _task_message,
    encode,
    job_pk,
    restored_asset_item,
)
from receiver.ledger.dynamodb.outbox import Outbox, Publisher
from receiver.ledger.dynamodb.reads import Reads
from receiver.ledger.events import Subscriptions
from receiver.workqueue import TaskMessage

log = structlog.get_logger(__name__)

T = TypeVar("T")


class LedgerBusy(RuntimeError):
    """A job kept changing under us for every attempt (pathological contention)."""


# --- the adapter --------------------------------------------------------------------------------


class DynamoLedger(Reads, lifecycle.DataOverYears, Events):
    def __init__(
        self,
        table: str,
        *,
        ddb: Any | None = None,
        publish: Publisher | None = None,
        max_attempts: int = 40,
        rng: Callable[[], float] = random.random,
        payload_retention: timedelta | None = None,
        subscriptions: Subscriptions | None = None,
    ) -> None:
        self.table = table
        # Who receives which onward event: each event's sends are written with it.
        self.subscriptions = subscriptions or Subscriptions()
        # Body parts carry the table's TTL attribute: DynamoDB drops them after this.
        self.payload_retention = payload_retention
        self.ddb = ddb if ddb is not None else client("dynamodb")
        self.outbox = Outbox(table, self.ddb, publish)
        self.max_attempts = max_attempts
        self.rng = rng

    @classmethod
    def from_url(cls, url: str, **options: Any) -> DynamoLedger:
        return cls(resource_name(url, "dynamodb", "RECEIVER_LEDGER_URL"), **options)

    # -- the port -------------------------------------------------------------------------------

    async def record(
        self, event: JobEvent, delivery: IncomingDelivery, plan: list[PlannedOutput]
    ) -> RecordResult:
        result, tasks = await run_blocking(self._record, event, delivery, plan)
        await self.outbox.send(tasks, delivery.received_at)
        return result

    async def track(
        self, provider: str, job_id: str, tracking: dict[str, Any], now: datetime
    ) -> bool:
        return await run_blocking(self._track, provider, job_id, tracking, now.timestamp())

    async def end_tracking(
        self, provider: str, job_id: str, state: JobState, reason: str, now: datetime
    ) -> bool:
        if state not in (JobState.EXPIRED, JobState.DEAD):
            raise ValueError(f"tracking ends as expired or dead, not {state}")
        return await run_blocking(
            self._end_tracking, provider, job_id, state, reason, now.timestamp()
        )

    async def asset_to_copy(self, provider: str, job_id: str, n: int) -> AssetToCopy | None:
        def read() -> AssetToCopy | None:
            job, assets = self._head(provider, job_id)
            asset = assets.get(n)
            if job is None or asset is None:
                return None
            return AssetToCopy(
                provider=provider,
                job_id=job_id,
                n=n,
                url=asset["source_url"],
                name=asset["name"],
                key=asset["key"],
                content_type=asset.get("content_type"),
                job_type=job.get("job_type"),
                deadline=_at(asset["deadline"]),
                state=asset["state"],
                completed_at=_opt_at(job.get("completed_at")),
                sha256=asset.get("sha256"),
            )

        return await run_blocking(read)

    async def mark_archived(
        self, provider: str, job_id: str, n: int, asset: ArchivedAsset, now: datetime
    ) -> JobState:
        def change(a: Item) -> Item | None:
            a.update(
                # Due for its first fixity check counting from now (the `fixity` index).
                **lifecycle.fixity_index_keys(provider, job_id, now.timestamp(), False),
                state="archived",
                uri=asset.uri,
                key=asset.key,
                size=asset.size,
                sha256=asset.sha256,
                content_type=asset.content_type,
                archived_at=now.timestamp(),
                error=None,
            )
            return a

        return await run_blocking(self._end_asset, provider, job_id, n, change, now.timestamp())

    async def mark_asset_ended(
        self, provider: str, job_id: str, n: int, state: JobState, error: str, now: datetime
    ) -> JobState:
        if state not in (JobState.EXPIRED, JobState.DEAD):
            raise ValueError(f"an asset ends as expired or dead, not {state}")

        def change(a: Item) -> Item | None:
            if a["state"] != "pending":
                return None
            a.update(state=state.value, error=error)
            return a

        return await run_blocking(self._end_asset, provider, job_id, n, change, now.timestamp())

    async def mark_asset_invalid(
        self, provider: str, job_id: str, n: int, error: str, now: datetime
    ) -> JobState:
        def change(a: Item) -> Item | None:
            if a["state"] != "pending":
                return None
            a.update(state="invalid", error=error)
            return a

        return await run_blocking(self._end_asset, provider, job_id, n, change, now.timestamp())

    async def note_asset_error(
        self, provider: str, job_id: str, n: int, error: str, now: datetime
    ) -> None:
        def change(a: Item) -> Item | None:
            a.update(error=error)
            return a

        await run_blocking(self._end_asset, provider, job_id, n, change, now.timestamp())

    async def requeue(self, provider: str, job_id: str, now: datetime) -> int:
        count, tasks = await run_blocking(self._requeue, provider, job_id, now.timestamp())
        await self.outbox.send(tasks, now)
        return count

    async def restore(self, job: JobRecord) -> bool:
        return await run_blocking(self._restore, job)

    async def ping(self) -> None:
        await run_blocking(
            lambda: self.ddb.get_item(
                TableName=self.table, Key=encode({"pk": "PING", "sk": "PING"})
            )
        )

    async def relay_outbox(self, now: datetime, *, limit: int = 500) -> int:
        """Re-send tasks that stayed unsent past the outbox's grace; how many were sent."""
        return await self.outbox.relay(now, limit=limit)

    # -- writes ---------------------------------------------------------------------------------

    def _transact(self, build: Callable[[], tuple[list[Item], T]]) -> T:
        """Build a transaction from a fresh read and commit it; on a conflict, read again."""
        for attempt in range(self.max_attempts):
            items, result = build()
            if not items:
                return result
            try:
                self.ddb.transact_write_items(
                    TransactItems=items, ClientRequestToken=uuid.uuid4().hex
                )
                return result
            except ClientError as exc:
                if not _is_conflict(exc):
                    raise
            # Jittered exponential backoff: contenders spread out instead of colliding again.
            time.sleep(min(0.2, 0.002 * 2**attempt) * (0.5 + self.rng()))
        raise LedgerBusy(f"gave up after {self.max_attempts} conflicting attempts")

    def _put(self, item: Item, condition: str | None = None, values: Item | None = None) -> Item:
        put: Item = {"TableName": self.table, "Item": encode(item)}
        if condition:
            put["ConditionExpression"] = condition
        if values:
            put["ExpressionAttributeValues"] = encode(values)
        return {"Put": put}

    def _reopen(self, task: Item) -> Item:
        """Queue `task` again through the outbox, in place: a worker's claim on the item (it
        may still be writing the manifest) stays, so the new message waits for it to end."""
        key = {"pk": task["pk"], "sk": task["sk"]}
        fields = {k: v for k, v in task.items() if k not in key}
        return {
            "Update": {
                "TableName": self.table,
                "Key": encode(key),
                "UpdateExpression": "SET " + ", ".join(f"#{k} = :{k}" for k in fields),
                "ExpressionAttributeNames": {f"#{k}": k for k in fields},
                "ExpressionAttributeValues": encode({f":{k}": v for k, v in fields.items()}),
            }
        }

    def _put_job(self, new: Item, seen: Item | None) -> Item:
        """The job item, written only if nobody changed it since we read it."""
        _index(new)
        if seen is None:
            return self._put(new, "attribute_not_exists(pk)")
        return self._put(new, "version = :seen", {":seen": seen["version"]})

    def _record(
        self, event: JobEvent, delivery: IncomingDelivery, plan: list[PlannedOutput]
    ) -> tuple[RecordResult, list[TaskMessage]]:
        pk = job_pk(event.provider, event.job_id)
        now = delivery.received_at.timestamp()
        marker = f"DLVID#{event.provider}#{delivery.delivery_id}" if delivery.delivery_id else None

        def build() -> tuple[list[Item], tuple[RecordResult, list[TaskMessage]]]:
            job, assets = self._head(event.provider, event.job_id)
            tomb = lifecycle.tomb_pk(event.provider, event.job_id)
            # Only an unknown job can have a tombstone (`forget` erases the partition).
            if job is None and self._get(tomb, "TOMB") is not None:
                decision = decide(None, (), event, seen_id=False, forgotten=True)
                return [], (RecordResult(decision.outcome, decision.state, 0, 0), [])
            current = JobState(job["state"]) if job else None
            current_urls = tuple(assets[n]["source_url"] for n in sorted(assets))
            first = self._get(marker, "DLVID") if marker is not None else None
            seen_id = first is not None
            # Markers written before the hash was kept have none: no claim either way.
            first_sha = first.get("payload_sha256") if first is not None else None
            body_mismatch = first_sha is not None and first_sha != delivery.payload_sha256
            decision = decide(current, current_urls, event, seen_id=seen_id)

            new = dict(job) if job else _new_job(event.provider, event.job_id, now)
            new["state"] = decision.state.value
            new["updated_at"] = now
            if decision.outcome is DeliveryOutcome.ACCEPTED:
                _apply_event(new, event, now)
            items: list[Item] = []
            tasks: list[TaskMessage] = []
            if decision.queue_outputs:
                for out in plan:
                    assets[out.n] = _asset_item(pk, out)
                    items.append(self._put(assets[out.n]))
                    task = _task_item(
                        pk,
                        event.provider,
                        event.job_id,
                        out.n,
                        out.deadline,
                        now,
                        delivery.traceparent,
                    )
                    items.append(self._put(task))
                    tasks.append(_task_message(task))
            if decision.refresh_outputs:
                for out in plan:
                    old = assets.get(out.n)
                    if old is not None and old["state"] == "pending":
                        # Never later: the window counts from the original completion.
                        deadline = min(float(old["deadline"]), out.deadline.timestamp())
                        old.update(source_url=out.url, deadline=deadline)
                        items.append(self._put(old))
            if decision.queue_outputs or decision.refresh_outputs:
                new["deadline"] = _earliest_pending(assets)
            until = datetime.fromtimestamp(now + MANIFEST_TASK_WINDOW_SECONDS, tz=UTC)
            reopened: list[TaskMessage] = []  # manifest rewrites: not new copies
            work = manifest_work(current, decision)
            if work is not None:
                # A new manifest task carries the delivery's trace; a reopened one keeps its own.
                trace = delivery.traceparent if work.new else None
                task = _task_item(pk, event.provider, event.job_id, work.n, until, now, trace)
                if work.new:
                    items.append(self._put(task))
                    tasks.append(_task_message(task))
                else:
                    # The task is handed back to the archiver, which rewrites the manifest and
                    # copies nothing (see Archiver._process). Unlike SQLite, the item does not
                    # say whether its last message was handled, so a delivery before that can
                    # cost one spare manifest rewrite, never a missing one.
                    items.append(self._reopen(task))
                    reopened.append(_task_message(task))
            if decision.outcome is DeliveryOutcome.ACCEPTED and decision.state is JobState.FAILED:
                failed = [(EventType.JOB_FAILED, None)]
                items.extend(
                    self._put(i) for i in event_items(self.subscriptions, new, assets, failed, now)
                )
            # Duplicates and ignored news change nothing a decision depends on: they keep the
            # version, so concurrent duplicates do not conflict with each other.
            changed = job is None or decision.outcome in (
                DeliveryOutcome.ACCEPTED,
                DeliveryOutcome.REFRESHED,
            )
            new["version"] = int(new["version"]) + (1 if changed else 0)
            items.insert(0, self._put_job(new, job))
            if job is None:
                # A `forget` between our read and this commit must win: its tombstone fails us.
                items.append(
                    {
                        "ConditionCheck": {
                            "TableName": self.table,
                            "Key": encode({"pk": tomb, "sk": "TOMB"}),
                            "ConditionExpression": "attribute_not_exists(pk)",
                        }
                    }
                )
            seq = _micros(now)
            dlv_sk = f"DLV#{seq:017d}#{uuid.uuid4().hex[:12]}"
            items.extend(
                self._delivery_items(
                    pk, dlv_sk, event, delivery, decision.outcome, body_mismatch=body_mismatch
                )
            )
            if marker is not None and not seen_id:
                marker_item = {
                    "pk": marker,
                    "sk": "DLVID",
                    "job": pk,
                    "at": now,
                    "payload_sha256": delivery.payload_sha256,
                }
                items.append(self._put(marker_item))
            result = RecordResult(
                outcome=decision.outcome,
                job_state=decision.state,
                delivery_seq=seq,
                tasks_queued=sum(1 for t in tasks if t.n != MANIFEST_TASK),
                body_mismatch=body_mismatch,
            )
            return items, (result, tasks + reopened)

        return self._transact(build)

    def _delivery_items(
        self,
        pk: str,
        sk: str,
        event: JobEvent,
        delivery: IncomingDelivery,
        outcome: DeliveryOutcome,
        *,
        body_mismatch: bool = False,
    ) -> list[Item]:
        body = zlib.compress(delivery.body)
        chunks = [body[i : i + BODY_CHUNK] for i in range(0, len(body), BODY_CHUNK)] or [b""]
        received = delivery.received_at.timestamp()
        expires = (
            int(received + self.payload_retention.total_seconds()) + 1
            if self.payload_retention is not None
            else None
        )
        provider, job_id = lifecycle.split_job_pk(pk)
        # The row (audit) and the body (parts 0..N-1) are separate items: payload retention
        # deletes the parts, by TTL or by `prune_payloads` through the `bodies` index.
        items = [
            self._put(
                {
                    "pk": pk,
                    "sk": sk,
                    "delivery_id": delivery.delivery_id,
                    "received_at": delivery.received_at.timestamp(),
                    "source": delivery.source,
                    "auth": delivery.auth,
                    "event": event.kind.value,
                    "payload_sha256": delivery.payload_sha256,
                    "outcome": outcome.value,
                    "parts": len(chunks),
                    # same delivery id as an earlier delivery, another body
                    "body_mismatch": True if body_mismatch else None,
                }
            )
        ]
        for k, chunk in enumerate(chunks):
            part: Item = {"pk": pk, "sk": f"PART#{sk}#{k:03d}", "chunk": chunk}
            part[TTL_ATTRIBUTE] = expires
            if k == 0:
                part.update(
                    lifecycle.body_index_keys(provider, job_id, received), parts=len(chunks)
                )
            items.append(self._put(part))
        return items

    def _track(self, provider: str, job_id: str, tracking: dict[str, Any], now: float) -> bool:
        def build() -> tuple[list[Item], bool]:
            job = self._get(job_pk(provider, job_id), "JOB")
            if job is None and self._get(lifecycle.tomb_pk(provider, job_id), "TOMB"):
                return [], False  # erased on request: not recorded again
            if job is None:
                new = _new_job(provider, job_id, now)
                new.update(state=JobState.TRACKING.value, tracking=json.dumps(tracking))
                new["version"] = 1
                return [self._put_job(new, None)], True
            reopen = job["state"] in ("dead", "expired") and not (
                job.get("completed_at") or job.get("failed_at")
            )  # ended by polling, never finished by the provider: a new registration reopens it
            if job.get("tracking") and not reopen:
                return [], False
            # Known already (a webhook may have come first): keep its state, add the caller's
            # registration.
            new = dict(job, version=int(job["version"]) + 1)
            if not new.get("tracking"):
                new["tracking"] = json.dumps(tracking)
            if reopen:
                new.update(state=JobState.TRACKING.value, error=None, updated_at=now)
            return [self._put_job(new, job)], False

        return self._transact(build)

    def _end_tracking(
        self, provider: str, job_id: str, state: JobState, reason: str, now: float
    ) -> bool:
        def build() -> tuple[list[Item], bool]:
            job = self._get(job_pk(provider, job_id), "JOB")
            if job is None or job["state"] not in ("tracking", "processing"):
                return [], False
            new = dict(job, state=state.value, error=reason, updated_at=now)
            new["version"] = int(job["version"]) + 1
            kind = ended_event(state)
            kinds: list[tuple[EventType, int | None]] = [(kind, None)] if kind else []
            events = event_items(self.subscriptions, new, {}, kinds, now)
            return [self._put_job(new, job), *(self._put(i) for i in events)], True

        return self._transact(build)

    def _end_asset(
        self,
        provider: str,
        job_id: str,
        n: int,
        change: Callable[[Item], Item | None],
        now: float,
    ) -> JobState:
        def build() -> tuple[list[Item], JobState]:
            job, assets = self._head(provider, job_id)
            if job is None:
                raise LookupError(f"no job {provider}/{job_id} in the ledger")
            items: list[Item] = []
            kinds: list[tuple[EventType, int | None]] = []
            if n in assets:
                before = assets[n]["state"]
                changed = change(dict(assets[n]))
                if changed is not None:
                    assets[n] = changed
                    items.append(self._put(changed))
                    news = asset_event(before, changed["state"])
                    if news is not None:
                        kinds.append((news, n))
            new = dict(job, version=int(job["version"]) + 1)
            state = _settle(new, assets, now)
            ended = ended_event(state) if state.value != job["state"] else None
            if ended is not None:
                kinds.append((ended, None))
            items.insert(0, self._put_job(new, job))
            items.extend(
                self._put(i) for i in event_items(self.subscriptions, new, assets, kinds, now)
            )
            return items, state

        return self._transact(build)

    def _requeue(self, provider: str, job_id: str, now: float) -> tuple[int, list[TaskMessage]]:
        pk = job_pk(provider, job_id)

        def build() -> tuple[list[Item], tuple[int, list[TaskMessage]]]:
            job, assets = self._head(provider, job_id)
            if job is None:
                return [], (0, [])
            items: list[Item] = []
            tasks: list[TaskMessage] = []
            for n, asset in sorted(assets.items()):
                if asset["state"] in ("dead", "expired"):
                    asset.update(state="pending", error=None)
                    items.append(self._put(asset))
                    task = _task_item(pk, provider, job_id, n, _at(asset["deadline"]), now)
                    items.append(self._put(task))
                    tasks.append(_task_message(task))
            if not tasks:
                return [], (0, [])
            new = dict(job, version=int(job["version"]) + 1)
            new.update(
                state=JobState.QUEUED.value,
                error=None,
                updated_at=now,
                deadline=_earliest_pending(assets),
            )
            items.insert(0, self._put_job(new, job))
            return items, (len(tasks), tasks)

        return self._transact(build)

    def _restore(self, job: JobRecord) -> bool:
        pk = job_pk(job.provider, job.job_id)
        if self._get(pk, "JOB") is not None:
            return False
        if self._get(lifecycle.tomb_pk(job.provider, job.job_id), "TOMB") is not None:
            return False  # erased on request: a manifest Object Lock kept does not bring it back
        # Children first, the job item last and conditionally: a crash in between leaves no job
        # item, so running reindex again completes the restore.
        for d in job.deliveries:
            sk = f"DLV#{_micros(d.received_at.timestamp()):017d}#{uuid.uuid4().hex[:12]}"
            delivery = IncomingDelivery(
                received_at=d.received_at,
                source=d.source,
                auth=d.auth,
                body=d.body,
                payload_sha256=d.payload_sha256,
                delivery_id=d.delivery_id,
            )
            event = JobEvent(job.provider, job.job_id, EventKind(d.event))
            for put in self._delivery_items(
                pk, sk, event, delivery, DeliveryOutcome(d.outcome), body_mismatch=d.body_mismatch
            ):
                self.ddb.put_item(**put["Put"])
            if d.delivery_id:
                self.ddb.put_item(
                    TableName=self.table,
                    Item=encode(
                        {
                            "pk": f"DLVID#{job.provider}#{d.delivery_id}",
                            "sk": "DLVID",
                            "job": pk,
                            "at": d.received_at.timestamp(),
                        }
                    ),
                )
        for a in job.assets:
            self.ddb.put_item(
                TableName=self.table,
                Item=encode(
                    {
                        **restored_asset_item(pk, a),
                        **(
                            lifecycle.fixity_index_keys(
                                job.provider, job.job_id, a.archived_at.timestamp(), False
                            )
                            if a.state == "archived" and a.archived_at is not None
                            else {}
                        ),
                    }
                ),
            )
        new = _new_job(job.provider, job.job_id, job.first_seen_at.timestamp())
        new.update(
            state=job.state.value,
            job_type=job.job_type,
            updated_at=job.updated_at.timestamp(),
            completed_at=_ts(job.completed_at),
            failed_at=_ts(job.failed_at),
            archived_at=_ts(job.archived_at),
            deadline=_ts(job.deadline),
            error=job.error,
            credits_refunded=job.credits_refunded,
            metadata=json.dumps(job.metadata),
            tracking=json.dumps(job.tracking) if job.tracking is not None else None,
            version=1,
        )
        try:
            self.ddb.put_item(**self._put_job(new, None)["Put"])
        except ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                return False  # restored concurrently by someone else
            raise
        return True
