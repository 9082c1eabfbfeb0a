"""Child processes measured by the archive benchmarks (one job each, so peak RSS is theirs alone).

    python -m bench._children receiver URL BUCKET WORKDIR  # receiver's archiver: URL -> S3
    python -m bench._children parts BUCKET WORKDIR         # receiver's set-up only, no copy
    python -m bench._children boto3 FILE BUCKET            # floor: boto3 upload_file, disk -> S3
    python -m bench._children boto3-full FILE BUCKET       # the same, with the file's CRC32
    python -m bench._children boto3-many DIR BUCKET WIDTH  # every file in DIR, WIDTH threads

Each prints one JSON line: ``seconds``, the time the copy itself took (imports and set-up
excluded), ``cpu_s``, the CPU time the process spent meanwhile (every thread), and
``peak_rss_mib``, the process's own peak RSS. The S3 endpoint and credentials come from the
environment, as boto3 always reads them.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench._common import vm_hwm_mib


def _settings(bucket: str, workdir: Path) -> Any:
    from receiver import logs
    from receiver.settings import Settings

    logs.configure("json", "warning")
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        ledger_url=f"sqlite:///{workdir / 'bench.db'}",
        archive_url=f"s3://{bucket}/bench",
        fetch_allow_http=True,
        fetch_allow_networks="127.0.0.0/8",
        apex_download_hosts="127.0.0.1",
        log_format="json",
        log_level="warning",
    )


def _time_calls(client: Any, operations: tuple[str, ...]) -> dict[str, float]:
    """Seconds spent in each of ``operations`` (botocore's before/after-call events)."""
    spent = dict.fromkeys(operations, 0.0)
    started: dict[str, float] = {}

    def before(operation: str) -> Callable[..., None]:
        return lambda **_: started.__setitem__(operation, time.perf_counter())

    def after(operation: str) -> Callable[..., None]:
        def record(**_: Any) -> None:
            spent[operation] += time.perf_counter() - started.pop(operation)

        return record

    for operation in operations:
        client.meta.events.register(f"before-call.s3.{operation}", before(operation))
        client.meta.events.register(f"after-call.s3.{operation}", after(operation))
    return spent


async def _receiver(url: str, bucket: str, workdir: Path) -> dict[str, Any]:
    from receiver.app import build_parts
    from receiver.domain import EventKind, JobEvent, Output
    from receiver.store.s3 import S3Store

    parts = build_parts(_settings(bucket, workdir))
    assert isinstance(parts.store, S3Store)
    spent = _time_calls(parts.store._client, ("CompleteMultipartUpload", "PutObjectTagging"))
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
        started, cpu = time.perf_counter(), time.process_time()
        assert await parts.archiver.run_once()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        job = await parts.ledger.job("apex", event.job_id)
        assert job is not None and job.state == "archived", job and job.assets[0].error
        return {
            "seconds": elapsed,
            "cpu_s": cpu,
            "complete_s": spent["CompleteMultipartUpload"],
            "tag_s": spent["PutObjectTagging"],
            "sha256": job.assets[0].sha256,
            "key": f"bench/{job.assets[0].key}",
        }
    finally:
        await parts.stop()


async def _parts_only(bucket: str, workdir: Path) -> dict[str, Any]:
    from receiver.app import build_parts

    parts = build_parts(_settings(bucket, workdir))
    parts.start(workers=0)
    try:
        await parts.store.ping()  # the S3 client has made a request, as in a copy
    finally:
        await parts.stop()
    return {}


def _boto3(path: str, bucket: str) -> dict[str, Any]:
    import boto3

    s3 = boto3.session.Session().client("s3")
    started, cpu = time.perf_counter(), time.process_time()
    s3.upload_file(path, bucket, f"floor/{Path(path).name}")
    return {"seconds": time.perf_counter() - started, "cpu_s": time.process_time() - cpu}


def _boto3_full(path: str, bucket: str) -> dict[str, Any]:
    """``upload_file`` asked for what receiver asks for: the whole object's CRC32, which makes
    s3transfer's multipart upload a FULL_OBJECT one the server checks on completion. The CRC32
    is computed from the file first, and that pass is timed too."""
    import base64
    import zlib

    import boto3

    s3 = boto3.session.Session().client("s3")
    started, cpu = time.perf_counter(), time.process_time()
    crc = 0
    with open(path, "rb") as source:
        while block := source.read(1 << 20):
            crc = zlib.crc32(block, crc)
    checksum = base64.b64encode(crc.to_bytes(4, "big")).decode()
    s3.upload_file(path, bucket, f"floor/{Path(path).name}", ExtraArgs={"ChecksumCRC32": checksum})
    return {"seconds": time.perf_counter() - started, "cpu_s": time.process_time() - cpu}


def _boto3_many(directory: str, bucket: str, width: int) -> dict[str, Any]:
    import boto3

    s3 = boto3.session.Session().client("s3")
    files = sorted(Path(directory).iterdir())
    started, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(width) as pool:
        for future in [
            pool.submit(s3.upload_file, str(path), bucket, f"floor/{path.name}") for path in files
        ]:
            future.result()
    return {
        "seconds": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu,
        "objects": len(files),
    }


def main() -> None:
    kind, *args = sys.argv[1:]
    if kind == "receiver":
        result = asyncio.run(_receiver(args[0], args[1], Path(args[2])))
    elif kind == "parts":
        result = asyncio.run(_parts_only(args[0], Path(args[1])))
    elif kind == "boto3":
        result = _boto3(args[0], args[1])
    elif kind == "boto3-full":
        result = _boto3_full(args[0], args[1])
    elif kind == "boto3-many":
        result = _boto3_many(args[0], args[1], int(args[2]))
    else:
        raise SystemExit(f"unknown child {kind!r}")
    print(json.dumps({**result, "peak_rss_mib": vm_hwm_mib()}))


if __name__ == "__main__":
    main()
