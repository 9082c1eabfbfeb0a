"""The poller's schedule in DynamoDB: one schedule for every replica of a scale-out deployment.

With `RECEIVER_LEDGER_URL=dynamodb://TABLE` the schedule lives in the ledger's own table (so
infra/receiver.yaml's table, IAM policy and backups cover it), one item per tracked job:

| pk                          | sk      | what                                               |
|-----------------------------|---------|----------------------------------------------------|
| `TRACK#{provider}#{job_id}` | `TRACK` | the job's schedule: the `TrackedJob` fields        |

`pollat` (the next poll) is kept in integer microseconds rather than float seconds, so that a
time read back can be compared for equality in a condition (see `claim`).

The sparse `polling` index (`pollpk`, `pollat`) answers the poller's questions without a Scan:

- an active job has `pollpk = DUE#{provider}`: "what is due" is one Query per provider
  (`pollat <= now`, oldest first), "when is the next one due" the same with `Limit 1`;
- a stopped job has `pollpk = STOPPED#{reason}`, so `resume_stopped` finds the jobs stopped for
  a missing key or a refused one (the fixes an operator makes before a restart);
- a finished job has no `pollpk`, and leaves the index.

One partition key per provider is enough: polls are bounded by each provider's rate budget (a
few per second), far below what one index partition takes.

Claims. The index is eventually consistent, so `due` may return a snapshot a moment old. A claim
is one conditional UpdateItem per job, `state = active AND pollat = <the snapshot's pollat> AND
pollat <= now` (SQLite's claim, plus the snapshot check): of two pollers that saw the same due
job exactly one moves `pollat` to the lease end, and the other's condition fails. Every write
that makes a snapshot wrong (a reschedule, a claim, a reactivation) moves `pollat` and every
other one (finish, stop) changes `state`, so a claimed job is never polled from a stale copy of
its poll count or technique either.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from botocore.exceptions import ClientError

from receiver.backends.aws import client, error_code, run_blocking
from receiver.ledger.dynamodb import Item, decode, encode
from receiver.ledger.dynamodb import table_definition as ledger_table_definition
from receiver.polling.schedule import StopReason, TrackedJob, TrackState
from receiver.providers import REGISTRY

INDEX = "polling"
INDEX_ATTRIBUTES = [
    "provider",
    "job_id",
    "technique",
    "state",
    "polls",
    "not_found",
    "last_status",
    "last_error",
    "stop_reason",
    "registered_at",
]
SK = "TRACK"
_STOP_REASONS = (StopReason.AUTH, StopReason.CONFIG, StopReason.NOT_FOUND, StopReason.GAVE_UP)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def track_pk(provider: str, job_id: str) -> str:
    return f"TRACK#{provider}#{job_id}"


def due_pk(provider: str) -> str:
    return f"DUE#{provider}"


def stopped_pk(reason: str) -> str:
    return f"STOPPED#{reason}"


def micros(at: datetime) -> int:
    """Exact integer microseconds since the epoch (no float rounding)."""
    return (at - _EPOCH) // _MICROSECOND


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def _names(*expressions: str) -> dict[str, str]:
    """`#name` placeholders for the attributes the expressions use.

    Placeholders because `state` is a reserved word; only the used ones, because DynamoDB
    refuses a request that defines a placeholder its expressions do not use.
    """
    return {f"#{n}": n for e in expressions for n in re.findall(r"#(\w+)", e)}


def _job(item: Item) -> TrackedJob:
    return TrackedJob(
        provider=item["provider"],
        job_id=item["job_id"],
        technique=item.get("technique"),
        state=item["state"],
        next_poll_at=from_micros(int(item["pollat"])),
        polls=int(item["polls"]),
        not_found=int(item["not_found"]),
        last_status=item.get("last_status"),
        last_error=item.get("last_error"),
        stop_reason=item.get("stop_reason"),
        registered_at=datetime.fromtimestamp(item["registered_at"], tz=UTC),
    )


class DynamoTrackedStore:
    """The `Tracker` port on the ledger's DynamoDB table (see the module docstring)."""

    def __init__(
        self, table: str, *, ddb: Any | None = None, providers: Iterable[str] | None = None
    ) -> None:
        self.table = table
        self.ddb = ddb if ddb is not None else client("dynamodb")
        # The providers `next_due_by_provider` asks about: those the poller can poll.
        self.providers = tuple(
            providers
            if providers is not None
            else (name for name, spec in REGISTRY.items() if spec.status_api is not None)
        )

    # -- the port -------------------------------------------------------------------------------

    async def add(
        self, provider: str, job_id: str, technique: str | None, first_poll: datetime, now: datetime
    ) -> str:
        return await run_blocking(self._add, provider, job_id, technique, first_poll, now)

    async def get(self, provider: str, job_id: str) -> TrackedJob | None:
        def read() -> TrackedJob | None:
            raw = self.ddb.get_item(
                TableName=self.table,
                Key=encode({"pk": track_pk(provider, job_id), "sk": SK}),
                ConsistentRead=True,
            ).get("Item")
            return _job(decode(raw)) if raw else None

        return await run_blocking(read)

    async def forget(self, provider: str, job_id: str) -> bool:
        # Every other write is conditional on the item (its state, or attribute_exists): none
        # of them creates it again; only `add` does.
        response = await run_blocking(
            lambda: self.ddb.delete_item(
                TableName=self.table,
                Key=encode({"pk": track_pk(provider, job_id), "sk": SK}),
                ReturnValues="ALL_OLD",
            )
        )
        return "Attributes" in response

    async def due(self, now: datetime, limit: int, *, provider: str) -> list[TrackedJob]:
        def read() -> list[TrackedJob]:
            found = self._query(
                limit,
                IndexName=INDEX,
                KeyConditionExpression="pollpk = :pk AND pollat <= :now",
                ExpressionAttributeValues=encode({":pk": due_pk(provider), ":now": micros(now)}),
            )
            return [_job(item) for item in found]

        return await run_blocking(read) if limit > 0 else []

    async def next_due_by_provider(self) -> dict[str, datetime]:
        def read() -> dict[str, datetime]:
            found: dict[str, datetime] = {}
            for provider in self.providers:
                for item in self._query(
                    1,
                    IndexName=INDEX,
                    KeyConditionExpression="pollpk = :pk",
                    ExpressionAttributeValues=encode({":pk": due_pk(provider)}),
                ):
                    found[provider] = from_micros(int(item["pollat"]))
            return found

        return await run_blocking(read)

    async def claim(
        self, jobs: list[TrackedJob], until: datetime, now: datetime
    ) -> set[tuple[str, str]]:
        # Independent conditional writes: in parallel, so a tick's claims cost one round trip.
        won = await asyncio.gather(*(run_blocking(self._claim, job, until, now) for job in jobs))
        return {(job.provider, job.job_id) for job, ok in zip(jobs, won, strict=True) if ok}

    async def reschedule(
        self,
        provider: str,
        job_id: str,
        at: datetime,
        now: datetime,
        *,
        counted: bool,
        status: str | None = None,
        error: str | None = None,
        not_found: bool = False,
    ) -> None:
        sets = [
            "#pollat = :at",
            "#polls = #polls + :counted",
            "#not_found = #not_found + :one" if not_found else "#not_found = :zero",
            "#updated_at = :now",
        ]
        values: Item = {
            ":at": micros(at),
            ":counted": 1 if counted else 0,
            ":now": now.timestamp(),
            ":active": TrackState.ACTIVE,
            (":one" if not_found else ":zero"): 1 if not_found else 0,
        }
        removes: list[str] = []
        if status is not None:
            sets.append("#last_status = :status")
            values[":status"] = status
        if error is not None:
            sets.append("#last_error = :error")
            values[":error"] = error
        else:
            removes.append("#last_error")
        # Only an active job: one stopped or finished meanwhile (by another process) stays so.
        await run_blocking(
            self._update, provider, job_id, sets, removes, "#state = :active", values
        )

    async def finish(
        self, provider: str, job_id: str, now: datetime, *, status: str | None, polled: bool
    ) -> None:
        sets = ["#state = :done", "#polls = #polls + :polled", "#updated_at = :now"]
        values: Item = {
            ":done": TrackState.DONE,
            ":polled": 1 if polled else 0,
            ":now": now.timestamp(),
        }
        if status is not None:
            sets.append("#last_status = :status")
            values[":status"] = status
        # Out of the index: nothing left to poll or to resume.
        await run_blocking(
            self._update,
            provider,
            job_id,
            sets,
            ["#last_error", "#pollpk"],
            "attribute_exists(pk)",
            values,
        )

    async def stop(
        self, provider: str, job_id: str | None, reason: str, error: str, now: datetime
    ) -> int:
        def write() -> int:
            if job_id is not None:
                return int(self._stop(provider, job_id, reason, error, now))
            # Every active job of the provider. A registration the index has not shown yet is
            # missed here, but stopped by the poller when it comes due (the provider's problem
            # stands until a restart).
            stopped = 0
            for item in self._query(
                None,
                IndexName=INDEX,
                KeyConditionExpression="pollpk = :pk",
                ExpressionAttributeValues=encode({":pk": due_pk(provider)}),
            ):
                stopped += self._stop(provider, item["job_id"], reason, error, now)
            return stopped

        return await run_blocking(write)

    async def stopped(self, limit: int) -> list[TrackedJob]:
        # One sparse-index partition per stop reason; a console page, not the request path.
        def read() -> list[TrackedJob]:
            found = [
                _job(item)
                for reason in _STOP_REASONS
                for item in self._query(
                    None,
                    IndexName=INDEX,
                    KeyConditionExpression="pollpk = :pk",
                    ExpressionAttributeValues=encode({":pk": stopped_pk(reason)}),
                )
            ]
            found.sort(key=lambda j: (-j.registered_at.timestamp(), j.provider, j.job_id))
            return found[:limit]

        return await run_blocking(read)

    async def resume_stopped(self, reasons: tuple[str, ...], now: datetime) -> int:
        def write() -> int:
            resumed = 0
            for reason in reasons:
                for item in self._query(
                    None,
                    IndexName=INDEX,
                    KeyConditionExpression="pollpk = :pk",
                    ExpressionAttributeValues=encode({":pk": stopped_pk(reason)}),
                ):
                    # Conditional: a poller starting at the same time resumes it only once.
                    resumed += self._update(
                        item["provider"],
                        item["job_id"],
                        [
                            "#state = :active",
                            "#pollat = :now",
                            "#updated_at = :at",
                            "#pollpk = :pk",
                        ],
                        ["#stop_reason"],
                        "#state = :stopped AND #stop_reason = :reason",
                        {
                            ":active": TrackState.ACTIVE,
                            ":now": micros(now),
                            ":at": now.timestamp(),
                            ":pk": due_pk(item["provider"]),
                            ":stopped": TrackState.STOPPED,
                            ":reason": reason,
                        },
                    )
            return resumed

        return await run_blocking(write)

    # -- blocking helpers (run on the AWS pool) -------------------------------------------------

    def _query(self, limit: int | None, **kwargs: Any) -> Iterator[Item]:
        """Items of an index Query in key order, following pages, at most `limit` of them."""
        args: Item = {"TableName": self.table, **kwargs}
        if limit is not None:
            args["Limit"] = limit
        returned = 0
        while True:
            page = self.ddb.query(**args)
            for raw in page.get("Items", []):
                yield decode(raw)
                returned += 1
                if limit is not None and returned >= limit:
                    return
            if "LastEvaluatedKey" not in page:
                return
            args["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def _update(
        self,
        provider: str,
        job_id: str,
        sets: list[str],
        removes: list[str],
        condition: str,
        values: Item,
    ) -> bool:
        """One conditional UpdateItem; False when the condition did not hold."""
        expression = "SET " + ", ".join(sets)
        if removes:
            expression += " REMOVE " + ", ".join(removes)
        try:
            self.ddb.update_item(
                TableName=self.table,
                Key=encode({"pk": track_pk(provider, job_id), "sk": SK}),
                UpdateExpression=expression,
                ConditionExpression=condition,
                ExpressionAttributeNames=_names(expression, condition),
                ExpressionAttributeValues=encode(values),
            )
        except ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                return False
            raise
        return True

    def _add(
        self, provider: str, job_id: str, technique: str | None, first_poll: datetime, now: datetime
    ) -> str:
        item: Item = {
            "pk": track_pk(provider, job_id),
            "sk": SK,
            "provider": provider,
            "job_id": job_id,
            "technique": technique,
            "state": TrackState.ACTIVE,
            "pollat": micros(first_poll),
            "pollpk": due_pk(provider),
            "polls": 0,
            "not_found": 0,
            "registered_at": now.timestamp(),
            "updated_at": now.timestamp(),
        }
        try:
            self.ddb.put_item(
                TableName=self.table,
                Item=encode(item),
                ConditionExpression="attribute_not_exists(pk)",
            )
            return "created"
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
        # Registering a stopped job again is how an operator says "try again".
        sets = [
            "#state = :active",
            "#pollat = :first",
            "#pollpk = :pk",
            "#not_found = :zero",
            "#updated_at = :now",
        ]
        values: Item = {
            ":active": TrackState.ACTIVE,
            ":first": micros(first_poll),
            ":pk": due_pk(provider),
            ":zero": 0,
            ":now": now.timestamp(),
            ":stopped": TrackState.STOPPED,
        }
        if technique is not None:
            sets.append("#technique = :technique")
            values[":technique"] = technique
        reactivated = self._update(
            provider, job_id, sets, ["#stop_reason"], "#state = :stopped", values
        )
        return "reactivated" if reactivated else "known"

    def _claim(self, job: TrackedJob, until: datetime, now: datetime) -> bool:
        return self._update(
            job.provider,
            job.job_id,
            ["#pollat = :until", "#updated_at = :at"],
            [],
            "#state = :active AND #pollat = :seen AND #pollat <= :now",
            {
                ":until": micros(until),
                ":at": now.timestamp(),
                ":active": TrackState.ACTIVE,
                ":seen": micros(job.next_poll_at),
                ":now": micros(now),
            },
        )

    def _stop(self, provider: str, job_id: str, reason: str, error: str, now: datetime) -> bool:
        return self._update(
            provider,
            job_id,
            [
                "#state = :stopped",
                "#stop_reason = :reason",
                "#last_error = :error",
                "#updated_at = :now",
                "#pollpk = :pk",
            ],
            [],
            "#state = :active",
            {
                ":active": TrackState.ACTIVE,
                ":stopped": TrackState.STOPPED,
                ":reason": reason,
                ":error": error,
                ":now": now.timestamp(),
                ":pk": stopped_pk(reason),
            },
        )


# --- the table ----------------------------------------------------------------------------------


def table_definition(name: str) -> dict[str, Any]:
    """The ledger's CreateTable arguments plus the `polling` index: infra/receiver.yaml's table."""
    definition = ledger_table_definition(name)
    definition["AttributeDefinitions"] += [
        {"AttributeName": "pollpk", "AttributeType": "S"},
        {"AttributeName": "pollat", "AttributeType": "N"},
    ]
    definition["GlobalSecondaryIndexes"].append(
        {
            "IndexName": INDEX,
            "KeySchema": [
                {"AttributeName": "pollpk", "KeyType": "HASH"},
                {"AttributeName": "pollat", "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": "INCLUDE", "NonKeyAttributes": INDEX_ATTRIBUTES},
        }
    )
    return definition
