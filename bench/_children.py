"""Child processes measured by the benchmarks (one job each, so peak RSS is theirs alone).

    python -m bench._children receiver URL BUCKET WORKDIR    # receiver's archiver: URL -> S3
    python -m bench._children boto3 FILE BUCKET              # floor: boto3 upload_file, disk -> S3
Prints the seconds the copy itself took (imports and set-up excluded) on stdout.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path


async def _receiver(url: str, bucket: str, workdir: Path) -> float:
    from receiver.app import build_parts
    from receiver.domain import EventKind, JobEvent, Output
    from receiver.settings import Settings

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        ledger_url=f"sqlite:///{workdir / 'bench.db'}",
        archive_url=f"s3://{bucket}/bench",
        fetch_allow_http=True,
        fetch_allow_networks="127.0.0.0/8",
        apex_download_hosts="127.0.0.1",
        log_format="json",
        log_level="warning",
    )
    parts = build_parts(settings)
    parts.start(workers=0)
    try:
        event = JobEvent(
            provider="apex",
            job_id=f"bench-{time.time_ns()}",
            kind=EventKind.COMPLETED,
            job_type="video",
            outputs=(Output(url, "video.mp4", "video/mp4"),),
        )
        await parts.ingestor.ingest(
            event, body=b"{}", source="webhook", auth="bench", delivery_id=None
        )
        started = time.perf_counter()
        assert await parts.archiver.run_once()
        elapsed = time.perf_counter() - started
        job = await parts.ledger.job("apex", event.job_id)
        assert job is not None and job.state == "archived", job and job.assets[0].error
        return elapsed
    finally:
        await parts.stop()


def _boto3(path: str, bucket: str) -> float:
    import boto3

    s3 = boto3.session.Session().client("s3")
    started = time.perf_counter()
    s3.upload_file(path, bucket, f"floor/{Path(path).name}")
    return time.perf_counter() - started


def main() -> None:
    kind, *args = sys.argv[1:]
    if kind == "receiver":
        seconds = asyncio.run(_receiver(args[0], args[1], Path(args[2])))
    elif kind == "boto3":
        seconds = _boto3(args[0], args[1])
    else:
        raise SystemExit(f"unknown child {kind!r}")
    print(f"{seconds:.6f}")


if __name__ == "__main__":
    main()
