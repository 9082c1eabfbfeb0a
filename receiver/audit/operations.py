"""Operator tasks over the ledger and the archive: verify integrity, rebuild the ledger.

`verify` re-reads archived objects, recomputes their SHA-256 from the bytes and compares it with
the three places that record it: the ledger, the job's manifest and the object's own record (S3
user metadata or tag, local sidecar). It also lists uploads nobody finished (killed workers) that
are older than a lease, and with ``repair`` aborts them. `reindex` rebuilds the ledger from the
manifests in storage alone (the archive outlives the database), checking each archived asset's
SHA-256 against the object's own record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from receiver.archive.manifest import SCHEMA, manifest_key
from receiver.domain import JobState
from receiver.ledger import AssetRecord, DeliveryRecord, JobFilter, JobRecord, Ledger
from receiver.store import ObjectMissing, Store, StoreError


@dataclass
class Finding:
    provider: str
    job_id: str
    n: int
    uri: str | None
    # "missing" | "sha256 mismatch" (ledger vs bytes) | "size mismatch" | "manifest missing" |
    # "manifest mismatch" | "object record missing" | "object record unreadable" |
    # "object record mismatch"
    problem: str
    expected: str | None = None  # what the record in question says
    actual: str | None = None  # what the bytes say


@dataclass
class StaleUpload:
    """An upload started before the cut-off and never finished (a killed worker's)."""

    key: str
    upload_id: str
    initiated: str  # ISO 8601
    aborted: bool = False


@dataclass
class VerifyReport:
    checked: int = 0
    ok: int = 0
    findings: list[Finding] = field(default_factory=list)
    stale_uploads: list[StaleUpload] = field(default_factory=list)

    @property
    def has_problems(self) -> bool:
        """Any finding, or a stale upload left in place (listed, not repaired)."""
        return bool(self.findings) or any(not u.aborted for u in self.stale_uploads)


async def verify(
    ledger: Ledger,
    store: Store,
    where: JobFilter,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
    *,
    uploads_before: datetime | None = None,
    repair: bool = False,
) -> VerifyReport:
    """Check every archived asset matching ``where``; then, if ``uploads_before`` is given, list
    the store's incomplete uploads started before it (``repair``: abort them)."""
    assets = await ledger.archived_assets(where)
    report = VerifyReport()
    manifests: dict[str, dict[int, dict[str, Any]] | None] = {}
    for i, (provider, job_id, asset) in enumerate(assets, 1):
        report.checked += 1
        found = await _check(store, provider, job_id, asset, manifests)
        if found:
            report.findings.extend(found)
        else:
            report.ok += 1
        on_progress(i, len(assets))
    if uploads_before is not None:
        async for upload in store.incomplete_uploads("", uploads_before):
            stale = StaleUpload(upload.key, upload.upload_id, upload.initiated.isoformat())
            if repair:
                await store.abort_upload(upload)
                stale.aborted = True
            report.stale_uploads.append(stale)
    return report


async def _check(
    store: Store,
    provider: str,
    job_id: str,
    asset: AssetRecord,
    manifests: dict[str, dict[int, dict[str, Any]] | None],
) -> list[Finding]:
    def finding(problem: str, expected: str | None = None, actual: str | None = None) -> Finding:
        return Finding(provider, job_id, asset.n, asset.uri, problem, expected, actual)

    digest = hashlib.sha256()
    size = 0
    try:
        async for chunk in store.read(asset.key):
            digest.update(chunk)
            size += len(chunk)
    except ObjectMissing:
        return [finding("missing")]
    actual = digest.hexdigest()
    found: list[Finding] = []
    if actual != asset.sha256:
        found.append(finding("sha256 mismatch", asset.sha256, actual))
    if size != asset.size:
        found.append(finding("size mismatch", str(asset.size), str(size)))
    listed = await _manifest_assets(store, manifest_key(asset.key), manifests)
    if listed is None:
        found.append(finding("manifest missing"))
    else:
        entry = listed.get(asset.n)
        recorded = entry.get("sha256") if entry and entry.get("state") == "archived" else None
        if recorded != actual:
            found.append(finding("manifest mismatch", recorded, actual))
    try:
        info = await store.head(asset.key)
    except StoreError as exc:
        found.append(finding("object record unreadable", str(exc), actual))
        return found
    if info is None or info.sha256 is None:
        found.append(finding("object record missing", None, actual))
    elif info.sha256 != actual:
        found.append(finding("object record mismatch", info.sha256, actual))
    return found


async def _manifest_assets(
    store: Store, key: str, cache: dict[str, dict[int, dict[str, Any]] | None]
) -> dict[int, dict[str, Any]] | None:
    """The assets a job's manifest lists, by number (read once per job); None if unreadable."""
    if key not in cache:
        try:
            manifest = json.loads(await _read(store, key))
            cache[key] = {int(a["n"]): a for a in manifest["assets"]}
        except (ObjectMissing, ValueError, KeyError, TypeError):
            cache[key] = None
    return cache[key]


async def check_asset(
    store: Store, provider: str, job_id: str, asset: AssetRecord
) -> list[Finding]:
    """Re-read one archived asset and compare its SHA-256 with the ledger, its manifest and the
    object's own record: every disagreement found (empty: intact).

    The one check `verify` runs per asset; `receiver.audit.fixity` runs it on a schedule and the
    console's Verify button on demand."""
    return await _check(store, provider, job_id, asset, {})


@dataclass
class ReindexReport:
    manifests: int = 0
    restored: int = 0
    already_known: int = 0
    unreadable: list[str] = field(default_factory=list)
    # archived assets whose object does not carry the manifest's SHA-256 (or is gone)
    mismatches: list[str] = field(default_factory=list)


async def reindex(ledger: Ledger, store: Store) -> ReindexReport:
    report = ReindexReport()
    jobs: list[JobRecord] = []
    async for key in store.list_keys():
        if not key.endswith("/manifest.json"):
            continue
        report.manifests += 1
        try:
            job = job_from_manifest(json.loads(await _read(store, key)))
        except (ValueError, KeyError, TypeError) as exc:
            report.unreadable.append(f"{key}: {type(exc).__name__}: {exc}")
            continue
        jobs.append(job)
        for asset in job.assets:
            if asset.state == "archived":
                problem = await _record_disagrees(store, asset)
                if problem:
                    report.mismatches.append(f"{asset.key}: {problem}")
    # Restore oldest first, so the ledger's newest-first order matches the original.
    for job in sorted(jobs, key=lambda j: j.first_seen_at):
        if await ledger.restore(job):
            report.restored += 1
        else:
            report.already_known += 1
    return report


async def _record_disagrees(store: Store, asset: AssetRecord) -> str | None:
    """Why the object's own SHA-256 record does not confirm the manifest's, or None."""
    try:
        info = await store.head(asset.key)
    except StoreError as exc:
        return f"object record unreadable: {exc}"
    if info is None:
        return "object missing"
    if info.sha256 != asset.sha256:
        return f"manifest says sha256 {asset.sha256}, the object records {info.sha256}"
    return None


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
                body_mismatch=bool(d.get("body_mismatch", False)),  # absent in older manifests
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
