"""Operator tasks over the ledger and the archive: verify integrity, rebuild the ledger.

`verify` re-reads archived objects and recomputes their SHA-256. `reindex` rebuilds the ledger
from the manifests in storage alone: the archive outlives the database.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from receiver.archive.manifest import SCHEMA
from receiver.domain import JobState
from receiver.ledger import AssetRecord, DeliveryRecord, JobFilter, JobRecord, Ledger
from receiver.store import ObjectMissing, Store


@dataclass
class Finding:
    provider: str
    job_id: str
    n: int
    uri: str | None
    problem: str  # "missing" | "sha256 mismatch" | "size mismatch"
    expected: str | None = None
    actual: str | None = None


@dataclass
class VerifyReport:
    checked: int = 0
    ok: int = 0
    findings: list[Finding] = field(default_factory=list)


async def verify(
    ledger: Ledger,
    store: Store,
    where: JobFilter,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
) -> VerifyReport:
    assets = await ledger.archived_assets(where)
    report = VerifyReport()
    for i, (provider, job_id, asset) in enumerate(assets, 1):
        report.checked += 1
        finding = await _check(store, provider, job_id, asset)
        if finding is None:
            report.ok += 1
        else:
            report.findings.append(finding)
        on_progress(i, len(assets))
    return report


async def verify_asset(
    store: Store, provider: str, job_id: str, asset: AssetRecord
) -> Finding | None:
    """Re-read one archived asset and recompute its SHA-256 (the console's Verify button)."""
    return await _check(store, provider, job_id, asset)


async def _check(store: Store, provider: str, job_id: str, asset: AssetRecord) -> Finding | None:
    digest = hashlib.sha256()
    size = 0
    try:
        async for chunk in store.read(asset.key):
            digest.update(chunk)
            size += len(chunk)
    except ObjectMissing:
        return Finding(provider, job_id, asset.n, asset.uri, "missing")
    if digest.hexdigest() != asset.sha256:
        return Finding(
            provider,
            job_id,
            asset.n,
            asset.uri,
            "sha256 mismatch",
            asset.sha256,
            digest.hexdigest(),
        )
    if size != asset.size:
        return Finding(
            provider, job_id, asset.n, asset.uri, "size mismatch", str(asset.size), str(size)
        )
    return None


async def check_asset(
    store: Store, provider: str, job_id: str, asset: AssetRecord
) -> Finding | None:
    """Re-read one archived asset and compare it with the ledger (None: intact).

    The one check `verify` runs per asset; `receiver.audit.fixity` runs it on a schedule."""
    return await _check(store, provider, job_id, asset)


@dataclass
class ReindexReport:
    manifests: int = 0
    restored: int = 0
    already_known: int = 0
    unreadable: list[str] = field(default_factory=list)


async def reindex(ledger: Ledger, store: Store) -> ReindexReport:
    report = ReindexReport()
    jobs: list[JobRecord] = []
    async for key in store.list_keys():
        if not key.endswith("/manifest.json"):
            continue
        report.manifests += 1
        try:
            jobs.append(job_from_manifest(json.loads(await _read(store, key))))
        except (ValueError, KeyError, TypeError) as exc:
            report.unreadable.append(f"{key}: {type(exc).__name__}: {exc}")
    # Restore oldest first, so the ledger's newest-first order matches the original.
    for job in sorted(jobs, key=lambda j: j.first_seen_at):
        if await ledger.restore(job):
            report.restored += 1
        else:
            report.already_known += 1
    return report


async def _read(store: Store, key: str) -> bytes:
    return b"".join([chunk async for chunk in store.read(key)])


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _required_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


UNRECOVERABLE = "restored from the archive's manifest: the download link was not kept"


def job_from_manifest(manifest: dict[str, Any]) -> JobRecord:
    """The job a manifest describes. Assets it lists as not yet archived come back dead: the
    manifest keeps links without their signatures, so nothing could copy them any more."""
    if manifest.get("schema") != SCHEMA:
        raise ValueError(f"not a {SCHEMA} manifest")
    job = manifest["job"]
    first_seen = _required_time(job["first_seen_at"])
    unfinished = any(a["state"] == "pending" for a in manifest["assets"])
    state = JobState(job["state"])
    if unfinished and state is JobState.QUEUED:
        state = JobState.DEAD
    return JobRecord(
        provider=manifest["provider"],
        job_id=manifest["job_id"],
        state=state,
        job_type=job["type"],
        first_seen_at=first_seen,
        updated_at=_time(job.get("updated_at")) or first_seen,
        completed_at=_time(job["completed_at"]),
        failed_at=_time(job["failed_at"]),
        archived_at=_time(job["archived_at"]),
        deadline=None,
        error=job["error"] or (UNRECOVERABLE if unfinished else None),
        credits_refunded=job["credits_refunded"],
        metadata=job["metadata"],
        tracking=job.get("tracking"),
        deliveries=[
            DeliveryRecord(
                seq=0,
                delivery_id=d["delivery_id"],
                received_at=_required_time(d["received_at"]),
                source=d["source"],
                auth=d["auth"],
                event=d["event"],
                payload_sha256=d["payload_sha256"],
                outcome=d["outcome"],
                # The payload as the manifest keeps it: URL query strings already removed.
                body=json.dumps(d["payload"]).encode(),
            )
            for d in manifest["deliveries"]
        ],
        assets=[
            AssetRecord(
                n=a["n"],
                name=a["name"],
                key=a["key"],
                source_url=a["source"],
                content_type=a["content_type"],
                deadline=_required_time(a["deadline"]),
                state="dead" if a["state"] == "pending" else a["state"],
                uri=a["uri"],
                size=a["size"],
                sha256=a["sha256"],
                archived_at=_time(a["archived_at"]),
                error=UNRECOVERABLE if a["state"] == "pending" else a["error"],
            )
            for a in manifest["assets"]
        ],
    )
