"""The DynamoDB ledger's reads: whole jobs (one consistent Query a job), listings through the
sharded `by_time` / `by_state` indexes, the assets to verify, and the console's activity figures.
Mixed into `DynamoLedger`; the writes (ledger.py) use `_head` and `_get` for their fresh reads.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator
from datetime import datetime
from itertools import islice
from typing import Any

from receiver.backends.aws import run_blocking
from receiver.domain import JobState
from receiver.ledger import (
    Activity,
    AssetRecord,
    JobFilter,
    JobRecord,
    JobSummary,
)
from receiver.ledger import at_ts as _at
from receiver.ledger import from_ts as _opt_at
from receiver.ledger.dynamodb.items import (
    _MAX_SEQ,
    SHARDS,
    Item,
    _activity,
    _asset_record,
    _delivery_record,
    _seq_floor,
    _summary,
    decode,
    encode,
    job_pk,
    query_items,
)


class Reads:
    """The read half of the ledger port on DynamoDB (see the package docstring for the layout)."""

    ddb: Any
    table: str

    async def job(self, provider: str, job_id: str) -> JobRecord | None:
        return await run_blocking(self._job, provider, job_id)

    async def list_jobs(
        self, where: JobFilter, *, before_seq: int | None, limit: int
    ) -> list[JobSummary]:
        def read() -> list[JobSummary]:
            return [_summary(j) for j in islice(self._listing(where, before_seq), limit)]

        return await run_blocking(read)

    async def archived_assets(self, where: JobFilter) -> list[tuple[str, str, AssetRecord]]:
        # An operator command (verify), not the request path: walk the listing index, oldest
        # first like SQLite, and read each job's assets.
        def read() -> list[tuple[str, str, AssetRecord]]:
            found: list[tuple[str, str, AssetRecord]] = []
            for summary in reversed(list(self._listing(where, None))):
                record = self._job(summary["provider"], summary["job_id"])
                if record is not None:
                    found.extend(
                        (record.provider, record.job_id, a)
                        for a in record.assets
                        if a.state == "archived"
                    )
            return found

        return await run_blocking(read)

    async def activity(self, since: datetime) -> Activity:
        # The listing index from `since`, then each job's asset items (one Query a job).
        def read() -> Activity:
            jobs = self._listing(JobFilter(since=since), None)
            return _activity(since, jobs, lambda p, j: self._head(p, j)[1].values())

        return await run_blocking(read)

    # -- helpers --------------------------------------------------------------------------------

    def _query(self, **kwargs: Any) -> Iterator[Item]:
        return query_items(self.ddb, self.table, **kwargs)

    def _head(self, provider: str, job_id: str) -> tuple[Item | None, dict[int, Item]]:
        """The job item and its assets, by n (one consistent Query)."""
        job: Item | None = None
        assets: dict[int, Item] = {}
        for item in self._query(
            KeyConditionExpression="pk = :pk AND begins_with(sk, :job)",
            ExpressionAttributeValues=encode({":pk": job_pk(provider, job_id), ":job": "JOB"}),
            ConsistentRead=True,
        ):
            if item["sk"] == "JOB":
                job = item
            else:
                assets[int(item["n"])] = item
        return job, assets

    def _get(self, pk: str, sk: str) -> Item | None:
        raw = self.ddb.get_item(
            TableName=self.table, Key=encode({"pk": pk, "sk": sk}), ConsistentRead=True
        ).get("Item")
        return decode(raw) if raw else None

    def _job(self, provider: str, job_id: str) -> JobRecord | None:
        job: Item | None = None
        assets: list[Item] = []
        deliveries: list[Item] = []
        parts: dict[str, list[tuple[int, bytes]]] = {}
        for item in self._query(
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues=encode({":pk": job_pk(provider, job_id)}),
            ConsistentRead=True,
        ):
            sk: str = item["sk"]
            if sk == "JOB":
                job = item
            elif sk.startswith("JOB#AST#"):
                assets.append(item)
            elif sk.startswith("DLV#"):
                deliveries.append(item)
            elif sk.startswith("PART#"):
                owner, _, k = sk[len("PART#") :].rpartition("#")
                parts.setdefault(owner, []).append((int(k), item["chunk"]))
        if job is None:
            return None
        return JobRecord(
            provider=provider,
            job_id=job_id,
            state=JobState(job["state"]),
            job_type=job.get("job_type"),
            first_seen_at=_at(job["first_seen_at"]),
            updated_at=_at(job["updated_at"]),
            completed_at=_opt_at(job.get("completed_at")),
            failed_at=_opt_at(job.get("failed_at")),
            archived_at=_opt_at(job.get("archived_at")),
            deadline=_opt_at(job.get("deadline")),
            error=job.get("error"),
            credits_refunded=job.get("credits_refunded"),
            metadata=json.loads(job.get("metadata", "{}")),
            tracking=json.loads(job["tracking"]) if job.get("tracking") else None,
            deliveries=[
                _delivery_record(d, parts.get(d["sk"], []))
                for d in sorted(deliveries, key=lambda d: str(d["sk"]))
            ],
            assets=[_asset_record(a) for a in sorted(assets, key=lambda a: int(a["n"]))],
        )

    def _listing(self, where: JobFilter, before_seq: int | None) -> Iterator[Item]:
        """Job summaries newest first, merged from every shard of the fitting index."""
        if where.state is not None:
            index, pk_name = "by_state", "gsi2pk"
            keys = [f"STATE#{where.state}#{s}" for s in range(SHARDS)]
        else:
            index, pk_name = "by_time", "gsi1pk"
            keys = [f"JOBS#{s}" for s in range(SHARDS)]
        low = _seq_floor(where.since) if where.since is not None else 0
        high = _seq_floor(where.until) - 1 if where.until is not None else _MAX_SEQ
        if before_seq is not None:
            high = min(high, before_seq - 1)
        if low > high:
            return iter(())
        filters: list[str] = []
        values: Item = {":lo": low, ":hi": high}
        if where.provider is not None:
            filters.append("provider = :provider")
            values[":provider"] = where.provider
        if where.job_type is not None:
            filters.append("job_type = :job_type")
            values[":job_type"] = where.job_type
        streams = []
        for key in keys:
            args: Item = {
                "IndexName": index,
                "KeyConditionExpression": f"{pk_name} = :pk AND seq BETWEEN :lo AND :hi",
                "ExpressionAttributeValues": encode({**values, ":pk": key}),
                "ScanIndexForward": False,
                "Limit": 100,
            }
            if filters:
                args["FilterExpression"] = " AND ".join(filters)
            streams.append(self._query(**args))
        return heapq.merge(*streams, key=lambda j: -int(j["seq"]))
