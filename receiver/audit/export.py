"""`receiver export --bagit DIR`: hand archived jobs to another system as a BagIt bag (RFC 8493).

The bag holds each job's archived assets under `data/<provider>/<job>/<name>` (the archive's own
layout without its date folders), `manifest-sha256.txt` with the SHA-256 the ledger recorded at
archiving (so a copy that rotted since fails the bag's validation instead of being blessed),
each job's `manifest.json` as a tag file under `receiver/<provider>/<job>/`, and
`tagmanifest-sha256.txt`. Objects are streamed from the store; nothing is held in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from receiver.archive.manifest import build_manifest, encode, manifest_key
from receiver.ledger import JobFilter, JobRecord, Ledger
from receiver.store import ObjectMissing, Store

BAGIT_TXT = b"BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n"


@dataclass
class ExportReport:
    bag: str
    jobs: list[str] = field(default_factory=list)  # exported
    files: int = 0
    octets: int = 0
    skipped: list[str] = field(default_factory=list)  # jobs without archived assets
    problems: list[str] = field(default_factory=list)  # objects missing or not as recorded


def _bag_path(path: str) -> str:
    """A path as manifests write it: only CR, LF and % are percent-encoded (RFC 8493 2.1.3)."""
    return path.replace("%", "%25").replace("\n", "%0A").replace("\r", "%0D")


_UNSAFE = re.compile(r"[^\w.-]")


def _folder(job: JobRecord) -> str:
    """`provider/job` with no character a bag tool could read differently.

    Job ids are the provider's; anything beyond letters, digits, "_", "." and "-" becomes "_" and
    a short hash of the real id keeps distinct ids apart. No "%": RFC 8493 wants it encoded as
    %25, which bagit-python (the reference validator) does not decode.
    """
    safe = _UNSAFE.sub("_", job.job_id)
    if safe != job.job_id or set(safe) <= {"."}:
        safe = f"{safe.strip('.') or 'job'}-{hashlib.sha256(job.job_id.encode()).hexdigest()[:8]}"
    return f"{job.provider}/{safe}"


async def jobs_in_range(ledger: Ledger, where: JobFilter) -> AsyncIterator[JobRecord]:
    """Every job the filter selects (first seen in the range), oldest first."""
    summaries = []
    before: int | None = None
    while True:
        page = await ledger.list_jobs(where, before_seq=before, limit=500)
        summaries.extend(page)
        if len(page) < 500:
            break
        before = page[-1].seq
    for summary in reversed(summaries):
        job = await ledger.job(summary.provider, summary.job_id)
        if job is not None:
            yield job


async def _copy(store: Store, key: str, target: Path) -> tuple[int, str]:
    """Stream one object into `target`, hashing on the way; nothing is left if it is missing."""
    digest = hashlib.sha256()
    size = 0
    chunks = store.read(key)
    try:
        first = await anext(chunks)  # ObjectMissing surfaces here, before any file exists
    except StopAsyncIteration:
        first = b""
    await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
    out = await asyncio.to_thread(target.open, "wb")
    try:
        digest.update(first)
        size += len(first)
        await asyncio.to_thread(out.write, first)
        async for chunk in chunks:
            digest.update(chunk)
            size += len(chunk)
            await asyncio.to_thread(out.write, chunk)
    finally:
        await asyncio.to_thread(out.close)
    return size, digest.hexdigest()


async def export_bagit(
    store: Store, jobs: AsyncIterator[JobRecord], dest: Path, *, now: datetime
) -> ExportReport:
    """Write the bag into `dest` (created; it must not exist or be empty)."""
    await asyncio.to_thread(_prepare, dest)
    report = ExportReport(str(dest))
    manifest_lines: list[str] = []
    tag_files: list[Path] = []
    async for job in jobs:
        archived = [a for a in job.assets if a.state == "archived" and a.sha256]
        job_ref = f"{job.provider}/{job.job_id}"
        if not archived:
            report.skipped.append(job_ref)
            continue
        folder = _folder(job)
        for asset in archived:
            relative = f"data/{folder}/{asset.name}"
            try:
                size, sha = await _copy(store, asset.key, dest / relative)
            except ObjectMissing:
                report.problems.append(f"{job_ref} asset {asset.n}: missing ({asset.uri})")
                continue
            if sha != asset.sha256:
                report.problems.append(
                    f"{job_ref} asset {asset.n}: sha256 mismatch (recorded {asset.sha256}, "
                    f"read {sha})"
                )
            # The recorded digest: a rotted copy makes the bag fail validation, as it should.
            manifest_lines.append(f"{asset.sha256}  {_bag_path(relative)}\n")
            report.files += 1
            report.octets += size
        # The job's manifest as archived beside the assets; rebuilt from the ledger if absent.
        tag = dest / "receiver" / folder / "manifest.json"
        try:
            await _copy(store, manifest_key(archived[0].key), tag)
        except ObjectMissing:
            await asyncio.to_thread(tag.write_bytes, encode(build_manifest(job)))
        tag_files.append(tag)
        report.jobs.append(job_ref)
    await asyncio.to_thread(_finish, dest, report, manifest_lines, tag_files, now)
    return report


def _prepare(dest: Path) -> None:
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty: a bag goes into a new folder")
    dest.mkdir(parents=True, exist_ok=True)


def _finish(
    dest: Path,
    report: ExportReport,
    manifest_lines: list[str],
    tag_files: list[Path],
    now: datetime,
) -> None:
    """The bag's declaration, info, payload manifest and tag manifest."""
    (dest / "data").mkdir(exist_ok=True)
    (dest / "bagit.txt").write_bytes(BAGIT_TXT)
    info = {
        "Bag-Software-Agent": "receiver export",
        "Bagging-Date": now.date().isoformat(),
        "Payload-Oxum": f"{report.octets}.{report.files}",
        "External-Description": "Archived outputs of AI media generation jobs, with each "
        "job's receiver manifest under receiver/",
        "Receiver-Jobs": str(len(report.jobs)),
    }
    (dest / "bag-info.txt").write_text("".join(f"{k}: {v}\n" for k, v in info.items()))
    (dest / "manifest-sha256.txt").write_text("".join(sorted(manifest_lines)))
    tags = [dest / "bagit.txt", dest / "bag-info.txt", dest / "manifest-sha256.txt", *tag_files]
    (dest / "tagmanifest-sha256.txt").write_text(
        "".join(
            f"{hashlib.sha256(t.read_bytes()).hexdigest()}  "
            f"{_bag_path(t.relative_to(dest).as_posix())}\n"
            for t in tags
        )
    )


def report_json(report: ExportReport) -> str:
    return json.dumps(report.__dict__, indent=2)
